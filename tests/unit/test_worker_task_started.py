"""A VM task stores its STARTED state beside its first steps, and always before its own result."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from celery import states

from mikrom.worker import tasks


class SlowBackend:
    """Stores what it is given, after `delay` seconds (a Redis that answers late)."""

    def __init__(self, delay: float):
        self.delay, self.stored, self.threads = delay, [], set()

    def store_result(self, task_id, result, state, request=None):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.stored.append((task_id, state, result))


def _task(backend, **request):
    req = SimpleNamespace(**{"id": "t-1", "hostname": "mikrom@n1", "is_eager": False, "ignore_result": False,
                             **request})
    return SimpleNamespace(name="create_vm_task", request=req, backend=backend, ignore_result=False)


def test_a_vm_task_returns_only_once_its_started_state_is_stored_so_its_result_comes_after():
    backend = SlowBackend(0.3)
    # a malformed message: the task's own work ends at once, long before the slow store
    outcome = tasks.run_vm_task(_task(backend), tasks.names.Intent.CREATE, ("positional",), {})
    assert outcome["outcome"] == "rejected"
    assert [(tid, state) for tid, state, _ in backend.stored] == [("t-1", states.STARTED)]
    assert backend.stored[0][2]["hostname"] == "mikrom@n1" and backend.stored[0][2]["pid"] > 0
    assert backend.threads == {"started-t-1"}  # stored beside the task, not in its way


def test_an_eager_or_result_less_task_stores_no_started_state():
    for request in ({"is_eager": True}, {"ignore_result": True}):
        backend = SlowBackend(0)
        tasks.run_vm_task(_task(backend, **request), tasks.names.Intent.CREATE, ("positional",), {})
        assert backend.stored == []
