"""The worker's shutdown deadline (mikrom.shutdown_deadline): the process ends a fixed time after
its last running task finished, never while a task runs."""

from celery.worker import state

from mikrom import shutdown_deadline


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_worker_exits_the_idle_time_after_its_last_task_and_not_while_one_runs(monkeypatch):
    clock, exits = Clock(), []
    request = object()
    monkeypatch.setattr(state, "active_requests", {request})

    def sleep(seconds):
        clock.sleep(seconds)
        if clock.now >= 30:  # the task, running through the first 30 s, finishes
            state.active_requests.discard(request)

    shutdown_deadline.watch(20, clock=clock, sleep=sleep, exit=exits.append)
    assert exits == [0]
    assert 50 <= clock.now <= 50 + 2 * shutdown_deadline.POLL_SECONDS


def test_an_idle_worker_exits_after_the_idle_time(monkeypatch):
    clock, exits = Clock(), []
    monkeypatch.setattr(state, "active_requests", set())
    shutdown_deadline.watch(5, clock=clock, sleep=clock.sleep, exit=exits.append)
    assert exits == [0] and 5 <= clock.now <= 5 + 2 * shutdown_deadline.POLL_SECONDS
