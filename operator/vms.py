"""One MicroVM's reconciliation, carried out: build the cluster view, let `decide` choose, write
its status patch (at most one write per decision), then send its messages; its Events are
handed to `dispatch.note`, which records them in the background once no dispatch is in flight.

Level-triggered and safe to run twice: the decision comes from the object as last seen (the newest
of kopf's body and `state`) and the view in `state`. A 409 Conflict reads the object again and
decides again, so a write never lands on a version it was not computed from. A message is sent
right after its write succeeds, in the same call: no watch round trip comes between them, and
nothing else either (the finalizer is kopf's own patch, after the handler returned).

A new VM's create is the exception: it is sent just before its placement write, since its node's
worker acts on it only once `status.node` names that node (it waits for the write). What was sent
is remembered in the view (`STATE.sent`) until the write lands, so a decision again after a 409
writes the same node and dispatch record and sends nothing; see docs/protocol.md, Dispatch.
kopf's handlers, the node checks and the placement sweep all call `reconcile`; a per-VM lock
keeps them apart.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace

from mikrom import metrics
from mikrom.names import Intent

from . import dispatch, placement, scheduler
from .heartbeats import BEATS
from .decide import ClusterView, Decision, Sent, decide
from .dispatch import DispatchRetry
from .state import SETTINGS, STATE
from .status import Conflict, reread_vm, write_vm

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 8


def _view(vm: dict, retry: int, with_placement: bool) -> ClusterView:
    uid = vm["metadata"]["uid"]
    failure = STATE.failure(uid)
    held = STATE.reservation(uid)
    nodes = STATE.nodes()
    return ClusterView(
        nodes=nodes, beats=BEATS.observe_all(nodes, time.time(), SETTINGS.node_lost_after_seconds),
        pools=STATE.pools(),
        node_views=scheduler.node_views(placement.request_of(vm.get("spec") or {}))
        if with_placement and held is None else (),
        reserved=held.node if held is not None else None,
        delivered=STATE.delivered(uid),
        failed_task=failure.task_id if failure else None,
        retry_in=max(0.0, failure.next_try - time.monotonic()) if failure else 0.0,
        progress_at=STATE.progress_at(uid),
        retry=retry,
        sent=STATE.sent(uid),
    )


def _decide(vm: dict, retry: int) -> Decision:
    """Decide; a VM that needs a node decides under the placement lock and holds what it chose."""
    st, meta = vm.get("status") or {}, vm["metadata"]
    if st.get("node") or meta.get("deletionTimestamp"):
        return decide(vm, _view(vm, retry, False), time.time(), SETTINGS)
    with STATE.placement_lock:
        for _ in range(3):
            view = _view(vm, retry, True)
            decision = decide(vm, view, time.time(), SETTINGS)
            p = decision.placement
            if p is None or scheduler.hold(meta["uid"], p, reserved=view.reserved is not None):
                return decision
    return Decision(requeue_after=1.0)  # the pool's blocks went while placing: look again soon


def reconcile(body: dict, cause: str, retry: int = 0) -> Decision:
    """Bring the operator's side of one MicroVM up to date; returns the last decision carried out.
    Raises DispatchRetry when a send failed (the VM stays recorded; the retry sends it)."""
    uid = body["metadata"]["uid"]
    with STATE.vm_lock(uid):
        vm = STATE.latest(body)
        for _ in range(2):  # a second round only after taking a VM off a lost node, to place it again
            decision, vm = _carry_out(vm, retry)
            if vm is None or decision.requeue_after != 0.0:
                return decision
        return decision


def _carry_out(vm: dict, retry: int) -> tuple[Decision, dict | None]:
    """Decide, write, send. While a decision with messages is between its write and its send it
    counts as in flight (`dispatch.IN_FLIGHT`): the Events wait for it."""
    with contextlib.ExitStack() as flight:
        decision, written, failed_send = _write(vm, retry, flight)
        if written is None:
            return decision, None
        uid = written["metadata"]["uid"]
        if decision.release:
            STATE.release(uid)
        if decision.metric == "reschedule":
            metrics.RESCHEDULES.inc()
        try:
            if failed_send is not None:
                raise failed_send  # a create sent before its write failed; the write recorded it
            for msg in decision.messages:
                dispatch.deliver(written, msg)
        except DispatchRetry:
            if not decision.finalizer_remove:
                raise
        finally:
            flight.close()
            # after the message: an Event is worth less than what it reports (kopf's finalizer
            # patch, too, comes after: it follows this handler's return)
            for e in decision.events:
                dispatch.note(written, e.reason, e.message, warning=e.warning)
    return decision, written


def _sends_first(vm: dict, decision: Decision) -> bool:
    """A fresh placement of a VM without a node: its create goes before its write."""
    return (not (vm.get("status") or {}).get("node") and decision.placement is not None
            and bool(decision.messages) and all(m.intent is Intent.CREATE for m in decision.messages))


def _send_first(vm: dict, decision: Decision) -> tuple[Decision, DispatchRetry | None]:
    """Send the create of a fresh placement, remember it (whether or not the broker took it: a
    failed send is resent with the same taskId once recorded) and return the decision left to write."""
    uid, node = vm["metadata"]["uid"], decision.placement.node
    body = {**vm, "status": {**(vm.get("status") or {}), "node": node}}
    STATE.remember_sent(uid, Sent(node, dict(decision.status_patch["dispatch"])))
    failed = None
    try:
        for msg in decision.messages:
            dispatch.deliver(body, msg)
    except DispatchRetry as exc:
        failed = exc
    return replace(decision, messages=()), failed


def _write(vm: dict, retry: int, flight: contextlib.ExitStack) -> tuple[Decision, dict | None, DispatchRetry | None]:
    """The decision on the newest version of `vm`, the object as its status patch left it (None:
    gone or replaced) and the failed send of a create sent before the write; a 409 Conflict reads
    the object again and decides again (a create already sent is not sent again: `STATE.sent`)."""
    uid, in_flight, failed_send = vm["metadata"]["uid"], False, None
    for _ in range(WRITE_ATTEMPTS):
        decision = _decide(vm, retry)
        if not decision.status_patch:
            STATE.forget_sent(uid)
            return decision, vm, failed_send
        if decision.messages and not in_flight:
            in_flight = bool(flight.enter_context(dispatch.IN_FLIGHT))
        if _sends_first(vm, decision):
            decision, failed_send = _send_first(vm, decision)
        try:
            written = write_vm(vm, dict(decision.status_patch))
        except Conflict:
            written = reread_vm(vm)
            if written is None:
                _gone(uid)
                return Decision(), None, None
            vm = written
            continue
        except BaseException:
            # a create already sent keeps its node held: the next decision records it
            if decision.placement is not None and STATE.sent(uid) is None:
                STATE.release(uid)
            raise
        if written is None:  # gone or replaced
            _gone(uid)
            return Decision(), None, None
        STATE.forget_sent(uid)
        return decision, written, failed_send
    raise RuntimeError(f"{vm['metadata']['namespace']}/{vm['metadata']['name']}: status kept changing under "
                       f"{WRITE_ATTEMPTS} writes")


def _gone(uid: str) -> None:
    """The object went (or a namesake replaced it): what it held goes, and what was sent for it is
    left to the worker, which drops a create whose object never names its node."""
    STATE.forget_sent(uid)
    STATE.release(uid)


def finalize(body: dict, retry: int = 0) -> Decision:
    """Handle a MicroVM being deleted; the decision says whether the finalizer may come off."""
    return reconcile(body, cause="delete", retry=retry)
