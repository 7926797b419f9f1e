"""Sending a VM's task to its node's queue, with the bookkeeping of docs/protocol.md.

A dispatch is first recorded in `status.dispatch` = {intent, attempts, sentAt, taskId, key} (the
status write of `vms.reconcile`, decided by `decide`), then sent, in the same handler call, as
`app.send_task(name, kwargs=VMRef, queue="mikrom.node.<node>")` would send it (`send`): the
message carries a reference and an intent, never the spec (a new VM's create alone is sent just
before it is recorded, with its placement: `vms`, docs/protocol.md). Every send is logged first as
one JSON line with the message "dispatch" and the fields vm_uid, vm, intent, task, task_id, node, attempt,
sent_at, why and redispatch, so the messages of one VM can be counted against the log. A failed
send (Redis unreachable) is kept in memory and retried with backoff; an Event says why; the object
stays as it was recorded. While Redis has just failed, sends fail at once instead of each waiting
for the broker's timeouts. Events are recorded in the background (`note`), after the dispatches in
flight.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from mikrom import broker, metrics, names
from mikrom.models import VMRef
from mikrom.names import Intent

from . import lifecycle
from .decide import Message
from .state import SETTINGS, STATE
from .status import emit

log = logging.getLogger(__name__)

# kombu retries a publish on a broken connection (reconnecting) once; every connect and socket
# operation is bounded by the broker transport's timeouts (MIKROM_REDIS_TIMEOUT_SECONDS).
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
SEND_BACKOFF_CAP = 60.0


class DispatchRetry(Exception):
    """A send failed or must wait; try again after `delay` seconds."""

    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


def _app():
    from mikrom.celery_app import app

    return app


def send(ref: VMRef, node: str, task_id: str) -> None:
    """Publish one task message on the node's queue (raises on broker errors).

    What `app.send_task(name, kwargs=ref, queue=...)` does (the same message, routing, producer
    pool, retry policy and task-sent event), less its subscription to the task's result: the
    operator never waits for a result (the worker still stores it), and the Redis result backend
    would subscribe to one more channel per task sent, for the life of the process, one round
    trip each."""
    app = _app()
    amqp, name, kwargs = app.amqp, names.INTENT_TASK[Intent(ref.intent)], ref.model_dump(mode="json")
    options = amqp.router.route({"queue": names.node_queue(node)}, name, (), kwargs, None)
    message = amqp.create_task_message(task_id, name, (), kwargs, reply_to=app.thread_oid, ignore_result=None,
                                       create_sent_event=app.conf.task_send_sent_event, **options)
    with app.producer_or_acquire() as producer:
        amqp.send_task_message(producer, name, message, retry=True, retry_policy=RETRY_POLICY, **options)


def deliver(body: dict, msg: Message) -> None:
    """Send `msg` (a dispatch recorded in `body`'s status) to the VM's node, then record one Event
    with `msg.reason` saying `msg.because` and what was sent. Raises DispatchRetry when the broker
    refuses."""
    meta, node = body["metadata"], (body.get("status") or {})["node"]
    intent, why = msg.intent, msg.why
    task, queue = names.INTENT_TASK[intent], names.node_queue(node)
    error = BREAKER.open()
    if error is None:
        log.info("dispatch", extra={"vm_uid": meta["uid"], "vm": f"{meta['namespace']}/{meta['name']}",
                                    "intent": intent.value, "task": task, "task_id": msg.task_id, "node": node,
                                    "attempt": msg.attempt, "sent_at": msg.sent_at, "why": why,
                                    "redispatch": why != "new"})
        ref = VMRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], intent=intent)
        try:
            send(ref, node, msg.task_id)
            BREAKER.closed()
            metrics.DISPATCHES.labels(intent.value, why).inc()
        except Exception as exc:  # noqa: BLE001 - kombu and redis raise many kinds; all mean "not sent"
            error = _reason(exc)
            BREAKER.tripped(error)
    if error is not None:
        metrics.DISPATCH_FAILURES.labels(intent.value).inc()
        if msg.because and msg.reason != names.DISPATCHED:
            note(body, msg.reason, msg.because, warning=msg.warning)  # the transition happened; the message is late
        uid = meta["uid"]
        failure = STATE.mark_failed(uid, msg.task_id, lambda n: lifecycle.backoff(
            n, SETTINGS.dispatch_backoff_seconds, uid, cap=SEND_BACKOFF_CAP))
        delay = max(0.0, failure.next_try - time.monotonic())
        message = (f"could not send {task} to queue {queue}: Redis at {broker.redacted(SETTINGS.broker)}: "
                   f"{error}; the VM stays recorded as it is, retrying in {delay:.1f}s (failure {failure.count})")
        note(body, names.DISPATCH_FAILED, message, warning=True)
        raise DispatchRetry(message, delay)
    STATE.mark_delivered(meta["uid"], msg.task_id)
    again = {"new": "", "no-progress": " again: no progress", "operator-restart": " again after an operator restart",
            "send-retry": " after failed sends"}.get(why, f" again ({why})")
    because = msg.because
    note(body, msg.reason, f"{because + '; ' if because else ''}sent {task} to queue {queue}{again} "
                           f"(attempt {msg.attempt})", warning=msg.warning)


class InFlight:
    """How many dispatches are between their status write and their send (thread-safe): the
    Events wait until there are none, so that in a burst of new VMs the API server takes the
    writes that carry dispatches first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def __enter__(self) -> InFlight:
        with self._cond:
            self._count += 1
        return self

    def __exit__(self, *_) -> None:
        with self._cond:
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Until no dispatch is in flight, at most `timeout` seconds; True when none is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)


IN_FLIGHT = InFlight()


class Notes:
    """Events recorded off the handler threads: an Event is a write of its own (and a patch of the
    existing one when it repeats), worth less than the message it reports, so a handler hands it
    here and goes on. Each object's Events keep their order (one lane per object, chosen by its
    uid); each waits while dispatches are in flight (`IN_FLIGHT`), at most `MAX_DELAY` seconds;
    past `MAX_PENDING` waiting, further ones are logged only, as past the Event budget."""

    LANES = 4
    MAX_PENDING = 10000
    MAX_DELAY = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: list[ThreadPoolExecutor] = []
        self._pending = 0
        self._closed = False

    def submit(self, body: dict, reason: str, message: str, warning: bool = False) -> None:
        meta = body.get("metadata") or {}
        with self._lock:
            if self._closed:
                return
            if not self._lanes:
                self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"events-{i}") for i in range(self.LANES)]
            full = self._pending >= self.MAX_PENDING
            if not full:
                self._pending += 1
        if full:
            log.warning("%s %s/%s: %s", reason, meta.get("namespace") or "-", meta.get("name"), message,
                        extra={"reason": reason, "object_uid": meta.get("uid"), "event": "backlog, not recorded"})
            return
        lane = self._lanes[zlib.crc32((meta.get("uid") or meta.get("name") or "").encode()) % self.LANES]
        try:
            lane.submit(self._record, body, reason, message, warning)
        except RuntimeError:  # closed: the operator is stopping
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        """Drop the Events still waiting: the operator is stopping, and a backlog must not hold up its exit."""
        with self._lock:
            lanes, self._lanes, self._closed = self._lanes, [], True
        for lane in lanes:
            lane.shutdown(wait=False, cancel_futures=True)

    def _record(self, body: dict, reason: str, message: str, warning: bool) -> None:
        try:
            IN_FLIGHT.wait_idle(self.MAX_DELAY)
            emit(body, reason, message, warning=warning)
        finally:
            with self._lock:
                self._pending -= 1


NOTES = Notes()


def note(body: dict, reason: str, message: str, warning: bool = False) -> None:
    """Record an Event on `body` in the background (see `Notes`)."""
    NOTES.submit(body, reason, message, warning=warning)


class Breaker:
    """After a failed send, further sends fail at once for a short, growing pause (0.5 s doubling
    up to 10 s): a Redis that hangs must not tie up every handler thread for its timeouts, since the
    node checks run in the same pool. Each VM keeps its own retry backoff on top."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trips = 0
        self._until = 0.0
        self._error = ""

    def open(self) -> str | None:
        """The last error while the pause lasts, else None (go ahead and send)."""
        with self._lock:
            return self._error if time.monotonic() < self._until else None

    def tripped(self, error: str) -> None:
        with self._lock:
            self._trips += 1
            self._until = time.monotonic() + min(10.0, 0.5 * 2 ** (self._trips - 1))
            self._error = error

    def closed(self) -> None:
        with self._lock:
            self._trips, self._until = 0, 0.0


BREAKER = Breaker()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:300]
