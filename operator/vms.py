"""One MicroVM's reconciliation: validate, place, dispatch, follow the lifecycle, watch progress,
mark it Unknown while its node is lost, and let go of it on deletion.

Level-triggered and safe to run twice: every decision comes from the object as last seen (the
newest of kopf's body and `state`) and the cluster view in `state`; it writes only what changes,
and records an Event for every transition. kopf's create/update/resume handlers, the per-VM timer,
the node checks and the placement sweep all call `reconcile`; a per-VM lock keeps them apart.
"""

from __future__ import annotations

import logging
import time

from mikrom import conditions, metrics, names
from mikrom.names import Intent, Phase

from . import dispatch, lifecycle, nodes, scheduler, validation
from .dispatch import DispatchRetry
from .state import SETTINGS, STATE
from .status import condition_patch, emit, update_vm

log = logging.getLogger(__name__)


class Waiting(Exception):
    """Deletion waits for the node; ask again after `delay` seconds."""

    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


def _status(vm: dict) -> dict:
    return vm.get("status") or {}


def _generation(vm: dict) -> int | None:
    return vm["metadata"].get("generation")


def reconcile(body: dict, cause: str) -> None:
    """Bring the operator's side of one MicroVM up to date. Raises DispatchRetry when a send failed."""
    uid = body["metadata"]["uid"]
    with STATE.vm_lock(uid):
        vm = STATE.latest(body)
        if vm["metadata"].get("deletionTimestamp"):
            return
        if not _status(vm).get("node"):
            _schedule(vm)
        else:
            _follow(vm)


# ---------------------------------------------------------------------------- placement

def _schedule(vm: dict) -> None:
    problems = validation.validate(vm.get("spec") or {}, STATE.pools(), STATE.nodes())
    if problems:
        _set_waiting(vm, Phase.FAILED, names.INVALID_SPEC, validation.describe(problems))
        return
    choice = scheduler.place(vm)
    if choice.node is None:
        _set_waiting(vm, Phase.PENDING, names.UNSCHEDULABLE, choice.message)
        return
    node, uid = choice.node, vm["metadata"]["uid"]

    def placed(current: dict) -> dict:
        st = _status(current)
        conds = condition_patch(st, names.SCHEDULED, True, names.PLACED, choice.message, _generation(current))
        return {"phase": Phase.SCHEDULED.value, "node": node, "reason": names.PLACED, "message": choice.message,
                **({"conditions": conds} if conds else {})}

    written = dispatch.record(vm, Intent.CREATE, lifecycle.key_for(vm, Intent.CREATE), 1, extra=placed,
                              precondition=lambda cur: not _status(cur).get("node")
                              and not cur["metadata"].get("deletionTimestamp"))
    if written is None:
        STATE.release(uid)
        return
    dispatch.deliver(written.body, why="new", because=f"assigned to MicroVMNode {node}", reason=names.SCHEDULED)


def _set_waiting(vm: dict, phase: Phase, reason: str, message: str) -> None:
    """Pending/Unschedulable or Failed/InvalidSpec, with the Scheduled condition saying why."""

    def compute(current: dict) -> dict | None:
        st = _status(current)
        if st.get("node"):
            return None
        patch = {k: v for k, v in {"phase": phase.value, "reason": reason, "message": message}.items()
                 if st.get(k) != v}
        conds = condition_patch(st, names.SCHEDULED, False, reason, message, _generation(current))
        if conds:
            patch["conditions"] = conds
        return patch or None

    written = update_vm(vm, compute)
    if written is not None and {"reason", "message"} & written.patch.keys():
        emit(written.body, reason, message, warning=True)


# ---------------------------------------------------------------------------- placed VMs

def _follow(vm: dict) -> None:
    st = _status(vm)
    node = st["node"]
    node_obj, now = STATE.node(node), time.time()
    health = nodes.health(node_obj, now, SETTINGS.node_lost_after_seconds)
    if not health.ready:
        gone = nodes.reschedule_due(vm, node_obj, now, SETTINGS.self_fence_after_seconds,
                                    SETTINGS.reschedule_margin_seconds) if SETTINGS.reschedule_lost_vms else None
        if gone is not None:
            evicted = _evict(vm, node, gone)
            if evicted is not None:
                _schedule(evicted)
            return
        _mark_unreachable(vm, node, health)
        return
    vm = _mark_reachable(vm, node)
    vm = _restart_required(vm)
    st = _status(vm)
    d = st.get("dispatch")
    uid = vm["metadata"]["uid"]

    if d and d.get("taskId") != STATE.delivered(uid):
        wait = dispatch.retry_due(uid, d["taskId"])
        if wait is not None:  # this process recorded it, and the send failed
            if wait > 0:
                raise DispatchRetry(f"next send of {d['intent']} in {wait:.1f}s", wait)
            dispatch.deliver(vm, why="send-retry")
            return
        if not lifecycle.goal_reached(vm, d["intent"]):
            # recorded by another process (this one restarted or took over) that may have died
            # between recording and sending: send it again now
            _redispatch(vm, d, attempts=int(d.get("attempts") or 1), why="operator-restart")
            return

    want = lifecycle.desired(vm)
    if want is not None and (not d or want.key != d.get("key")):
        written = dispatch.record(vm, want.intent, want.key, 1)
        if written is not None:
            dispatch.deliver(written.body, why="new", because=_because(vm, want.intent))
        return

    verdict = lifecycle.progress(vm, STATE.progress_at(uid), time.time(),
                                 timeout=SETTINGS.progress_timeout_seconds,
                                 backoff_base=SETTINGS.dispatch_backoff_seconds,
                                 max_attempts=SETTINGS.max_dispatch_attempts)
    if verdict.action == "redispatch":
        attempts = int(d.get("attempts") or 1) + 1
        _redispatch(vm, d, attempts=attempts, why="no-progress",
                    because=f"no progress from MicroVMNode {node} on {d['intent']} (phase {st.get('phase')}), "
                            f"attempt {attempts} of {SETTINGS.max_dispatch_attempts}")
    elif verdict.action == "give-up":
        _give_up(vm, node, d)


def _because(vm: dict, intent: Intent) -> str:
    if intent is Intent.RESTART:
        return f"{names.ANNOTATION_RESTARTED_AT} is {lifecycle.restart_annotation(vm)}"
    if intent in (Intent.START, Intent.STOP):
        return f"runStrategy is {(vm.get('spec') or {}).get('runStrategy')}"
    return ""


def _redispatch(vm: dict, d: dict, attempts: int, why: str, because: str = "") -> None:
    written = dispatch.record(vm, Intent(d["intent"]), d.get("key", ""), attempts,
                              precondition=lambda cur: (_status(cur).get("dispatch") or {}).get("taskId") == d["taskId"])
    if written is not None:
        if because:
            dispatch.deliver(written.body, why=why, because=because, reason="Redispatching", warning=True)
        else:
            dispatch.deliver(written.body, why=why)


def _give_up(vm: dict, node: str, d: dict) -> None:
    message = (f"no progress from MicroVMNode {node} after {d.get('attempts')} dispatches of {d['intent']}; "
               f"giving up (maxDispatchAttempts is {SETTINGS.max_dispatch_attempts})")

    def compute(current: dict) -> dict | None:
        if (_status(current).get("dispatch") or {}).get("taskId") != d["taskId"]:
            return None
        return {"phase": Phase.FAILED.value, "reason": names.NO_PROGRESS, "message": message}

    written = update_vm(vm, compute)
    if written is not None:
        emit(written.body, names.NO_PROGRESS, message, warning=True)


def _mark_unreachable(vm: dict, node: str, health: nodes.Health) -> None:
    message = f"MicroVMNode {node} is not Ready: {health.message}"

    def compute(current: dict) -> dict | None:
        st = _status(current)
        patch = {}
        if st.get("phase") not in nodes.UNREACHABLE_EXEMPT:
            patch = {"phase": Phase.UNKNOWN.value, "reason": names.NODE_LOST, "message": message}
        conds = condition_patch(st, names.NODE_REACHABLE, False, health.reason, message)
        if conds and (patch or st.get("phase") == Phase.UNKNOWN.value):
            patch["conditions"] = conds
        return patch or None

    written = update_vm(vm, compute)
    if written is not None and "phase" in written.patch:
        emit(written.body, names.NODE_LOST, f"{message}; phase Unknown until the node returns", warning=True)


# What the lost node's worker reported about the VM; the new node's worker writes its own.
_NODE_FIELDS = ("ipAddress", "macAddress", "pid", "startedAt", "bootSeconds", "vmm", "activeShape", "dispatch",
                "finishedAt", "cleanedUpAt")


def _evict(vm: dict, node: str, gone: float) -> dict | None:
    """Take the VM off its lost node so that placement finds it another; the body as written."""
    message = (f"MicroVMNode {node} has sent no heartbeat for {gone:.0f}s, past selfFenceAfterSeconds "
               f"({SETTINGS.self_fence_after_seconds:g}s) plus rescheduleMarginSeconds "
               f"({SETTINGS.reschedule_margin_seconds:g}s), so its worker has stopped the VM: placing it "
               f"again; {node} removes what it held when it returns")

    def compute(current: dict) -> dict | None:
        st = _status(current)
        if st.get("node") != node or current["metadata"].get("deletionTimestamp"):
            return None
        conds = [c for c in st.get("conditions") or [] if c.get("type") != names.NODE_REACHABLE]
        conds, _ = conditions.set_condition(conds, names.SCHEDULED, False, names.RESCHEDULING, message,
                                            _generation(current))
        conds, _ = conditions.set_condition(conds, names.READY, False, names.RESCHEDULING, message)
        return {"phase": Phase.PENDING.value, "node": None, "reason": names.RESCHEDULING, "message": message,
                "conditions": conds, **{f: None for f in _NODE_FIELDS if f in st}}

    written = update_vm(vm, compute)
    if written is None:
        return None
    STATE.release(vm["metadata"]["uid"])
    metrics.RESCHEDULES.inc()
    emit(written.body, names.RESCHEDULING, message, warning=True)
    return written.body


def _mark_reachable(vm: dict, node: str) -> dict:
    def compute(current: dict) -> dict | None:
        st = _status(current)
        if conditions.get(st.get("conditions"), names.NODE_REACHABLE) is None:
            return None
        conds = condition_patch(st, names.NODE_REACHABLE, True, names.NODE_RECOVERED,
                                f"MicroVMNode {node} is Ready again")
        return {"conditions": conds} if conds else None

    written = update_vm(vm, compute)
    if written is None:
        return vm
    emit(written.body, names.NODE_RECOVERED, f"MicroVMNode {node} is Ready again; its worker re-reports the VM")
    return written.body


def _restart_required(vm: dict) -> dict:
    def compute(current: dict) -> dict | None:
        verdict = lifecycle.restart_required(current)
        if verdict is None:
            return None
        required, message = verdict
        conds = condition_patch(_status(current), names.RESTART_REQUIRED, required,
                                names.SHAPE_CHANGED if required else "ShapeApplied", message, _generation(current))
        return {"conditions": conds} if conds else None

    written = update_vm(vm, compute)
    if written is None:
        return vm
    cond = conditions.get(_status(written.body).get("conditions"), names.RESTART_REQUIRED) or {}
    if cond.get("status") == "True":
        emit(written.body, names.RESTART_REQUIRED, cond.get("message", ""))
    return written.body


# ---------------------------------------------------------------------------- deletion

def finalize(body: dict, retry: int = 0) -> None:
    """Handle a MicroVM being deleted. Returns when the finalizer may come off; raises Waiting or
    DispatchRetry while the node has not confirmed (`retry`: how many times it has asked)."""
    uid = body["metadata"]["uid"]
    with STATE.vm_lock(uid):
        vm = STATE.latest(body)
        st = _status(vm)
        node = st.get("node")
        if not node:
            STATE.release(uid)
            return
        if st.get("cleanedUpAt"):
            emit(vm, "Deleted", f"MicroVMNode {node} removed the VM, its tap and its files")
            return
        send_failed: DispatchRetry | None = None
        try:
            vm = _send_delete(vm, node)
        except DispatchRetry as exc:
            send_failed = exc
        health = nodes.health(STATE.node(node), time.time(), SETTINGS.node_lost_after_seconds)
        forced = names.ANNOTATION_FORCE_DELETE in (vm["metadata"].get("annotations") or {})
        started = conditions.parse_time(vm["metadata"]["deletionTimestamp"]).timestamp()
        left = SETTINGS.delete_wait_seconds - (time.time() - started)
        if not health.ready or forced:
            why = f"MicroVMNode {node} is lost ({health.message})" if not health.ready else \
                f"the {names.ANNOTATION_FORCE_DELETE} annotation is set"
            if left <= 0:
                emit(vm, names.FORCE_DELETED, f"removed the finalizer without confirmation from the node: {why}, "
                                              f"waited {SETTINGS.delete_wait_seconds:g}s; the node removes the "
                                              f"orphan itself when it returns", warning=True)
                return
            raise Waiting(f"{why}; removing the finalizer in {left:.0f}s", min(max(left, 0.5), 2.0))
        if send_failed is not None:
            raise send_failed
        # the confirmation is a status change, but kopf runs a delayed handler only when the delay is
        # over: ask soon at first, then every few seconds (each retry is an API write)
        raise Waiting(f"waiting for MicroVMNode {node} to confirm the VM is gone", min(5.0, 0.5 * 2 ** retry))


def _send_delete(vm: dict, node: str) -> dict:
    st = _status(vm)
    d = st.get("dispatch") or {}
    uid = vm["metadata"]["uid"]
    message = f"waiting for MicroVMNode {node} to remove the VM, its tap and its files"
    if d.get("intent") != Intent.DELETE.value:
        written = dispatch.record(vm, Intent.DELETE, lifecycle.key_for(vm, Intent.DELETE), 1,
                                  extra=lambda cur: {"phase": Phase.DELETING.value, "reason": "Deleting",
                                                     "message": message})
        if written is None:
            return vm
        dispatch.deliver(written.body, why="new", because=message, reason="Deleting")
        return written.body
    if d.get("taskId") != STATE.delivered(uid):
        wait = dispatch.retry_due(uid, d["taskId"])
        if wait is None:
            _redispatch(vm, d, int(d.get("attempts") or 1), why="operator-restart")
        elif wait <= 0:
            dispatch.deliver(vm, why="send-retry")
        else:
            raise DispatchRetry(f"next send of delete in {wait:.1f}s", wait)
        return STATE.latest(vm)
    verdict = lifecycle.progress(vm, STATE.progress_at(uid), time.time(), timeout=SETTINGS.progress_timeout_seconds,
                                 backoff_base=SETTINGS.dispatch_backoff_seconds, max_attempts=0, give_up=False)
    if verdict.action == "redispatch":
        _redispatch(vm, d, int(d.get("attempts") or 1) + 1, why="no-progress")
    return STATE.latest(vm)
