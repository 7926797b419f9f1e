"""Sending a VM's task to its node's queue, with the bookkeeping of docs/protocol.md.

A dispatch is first recorded in `status.dispatch` = {intent, attempts, sentAt, taskId, key} (the
status write of `vms.reconcile`, decided by `decide`), then sent, in the same handler call, with `app.send_task(name, kwargs=VMRef, queue="mikrom.node.<node>")`: the message carries a
reference and an intent, never the spec. Every send is logged first as one JSON line with the
message "dispatch" and the fields vm_uid, vm, intent, task, task_id, node, attempt, sent_at, why and
redispatch, so
the messages of one VM can be counted against the log. A failed send (Redis unreachable) is kept
in memory and retried with backoff; an Event says why; the object stays as it was recorded. While
Redis has just failed, sends fail at once instead of each waiting for the broker's timeouts.
"""

from __future__ import annotations

import logging
import threading
import time

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
    """Publish one task message on the node's queue (raises on broker errors)."""
    intent = Intent(ref.intent)
    _app().send_task(names.INTENT_TASK[intent], kwargs=ref.model_dump(mode="json"), queue=names.node_queue(node),
                     task_id=task_id, retry=True, retry_policy=RETRY_POLICY)


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
            emit(body, msg.reason, msg.because, warning=msg.warning)  # the transition happened; the message is late
        uid = meta["uid"]
        failure = STATE.mark_failed(uid, msg.task_id, lambda n: lifecycle.backoff(
            n, SETTINGS.dispatch_backoff_seconds, uid, cap=SEND_BACKOFF_CAP))
        delay = max(0.0, failure.next_try - time.monotonic())
        message = (f"could not send {task} to queue {queue}: Redis at {broker.redacted(SETTINGS.broker)}: "
                   f"{error}; the VM stays recorded as it is, retrying in {delay:.1f}s (failure {failure.count})")
        emit(body, names.DISPATCH_FAILED, message, warning=True)
        raise DispatchRetry(message, delay)
    STATE.mark_delivered(meta["uid"], msg.task_id)
    note = {"new": "", "no-progress": " again: no progress", "operator-restart": " again after an operator restart",
            "send-retry": " after failed sends"}.get(why, f" again ({why})")
    because = msg.because
    emit(body, msg.reason, f"{because + '; ' if because else ''}sent {task} to queue {queue}{note} "
                           f"(attempt {msg.attempt})", warning=msg.warning)


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
