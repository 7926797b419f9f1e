"""The operator's decision for one MicroVM: a pure function of the object, the cluster view, the
clock and the settings.

`decide` returns a `Decision`: the status fields to write (one JSON merge patch of the operator's
own fields), the task messages to send once that write succeeded, the Events to record, whether
the VM needs capacity held on a node (and an address block carved there), and when to look again.
It performs no I/O and reads no clock: `vms.reconcile` builds the `ClusterView`, calls it, writes
the patch (re-deciding on a 409 Conflict) and then sends. Every rule of docs/protocol.md that the
operator owns lives here, in this order:

- being deleted: Deleting + `delete_vm_task`, the finalizer held until `status.cleanedUpAt`, or
  released after `deleteWaitSeconds` when the node is lost or `mikrom.io/force-delete` is set;
- no node: Failed/InvalidSpec, Pending/Unschedulable, or placed (Scheduled, `status.node`, the
  create dispatch) in one write, whose create message `vms` sends just before it; decided again
  after that write failed, the placement and the record are those of the message already sent;
- node lost: Unknown with NodeReachable=False, or past self-fence + margin taken off the node
  (Pending, Rescheduling) to be placed again at once;
- node Ready: NodeReachable and RestartRequired kept current, then the dispatch: a failed send
  retried after its backoff, a dispatch another process recorded sent again, a new intent sent,
  a stalled one re-sent with backoff and given up on (Failed/NoProgress).
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from mikrom import conditions, names
from mikrom.names import Intent, Phase
from mikrom.settings import Settings

from . import health, lifecycle, placement, validation

TASK_ID_NAMESPACE = uuid.UUID("6f1c1f5e-3a55-4c36-9d0c-6d2a4f0b7a11")

# Conditions of a lost node's VM: rescheduling held by the mass-eviction brake, and a disk reset
# by a reschedule (the new node starts from a fresh copy of the image).
RESCHEDULING_HELD = "ReschedulingHeld"
DISK_RESET, DISK_RESET_REASON = "DiskReset", "Rescheduled"

# What the lost node's worker reported about the VM; the new node's worker writes its own.
NODE_FIELDS = ("ipAddress", "macAddress", "pid", "startedAt", "bootSeconds", "vmm", "activeShape", "dispatch",
               "finishedAt", "cleanedUpAt")


@dataclass(frozen=True)
class ClusterView:
    """What the operator knows besides the object itself."""

    nodes: Mapping[str, dict] = field(default_factory=dict)
    """MicroVMNode name -> object."""
    beats: Mapping[str, float] = field(default_factory=dict)
    """MicroVMNode name -> when the operator first observed its current heartbeat value (its own
    clock; `heartbeats`): heartbeat ages are judged from this, never from the worker's timestamp."""
    pools: Mapping[str, dict] = field(default_factory=dict)
    """IPPool name -> object."""
    node_views: tuple[placement.NodeView, ...] = ()
    """Capacity left on each node (what assigned VMs and reservations hold taken off)."""
    reserved: str | None = None
    """The node this VM already holds a reservation on (a placement not yet written)."""
    delivered: str | None = None
    """The taskId this process last sent for the VM."""
    failed_task: str | None = None
    """The taskId whose send last failed, and seconds until it may be tried again."""
    retry_in: float = 0.0
    progress_at: float = 0.0
    """When the VM's phase last changed, as observed."""
    retry: int = 0
    """How many times kopf has asked again for this deletion."""
    sent: Sent | None = None
    """The create this process already sent for the VM, whose placement write has not landed yet."""


@dataclass(frozen=True)
class Sent:
    """A create sent before its placement was recorded (docs/protocol.md, Dispatch): a decision
    again (after a 409 Conflict) writes this node and this dispatch record, and sends nothing."""

    node: str
    record: Mapping


@dataclass(frozen=True)
class Message:
    """One task message for the VM's node, sent after the status write."""

    intent: Intent
    task_id: str
    attempt: int
    sent_at: str
    why: str
    """new, no-progress, operator-restart or send-retry (the log line's `why`)."""
    because: str = ""
    reason: str = names.DISPATCHED
    warning: bool = False


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Placement:
    node: str
    vcpus: int
    memory_mib: int
    carve_pool: str | None = None
    """Carve the node's address block from this IPPool before writing (its first networked VM)."""


@dataclass(frozen=True)
class Decision:
    status_patch: Mapping | None = None
    messages: tuple[Message, ...] = ()
    events: tuple[Event, ...] = ()
    finalizer_remove: bool = False
    """Deletion: the node confirmed, or the wait is over: let the object go."""
    requeue_after: float | None = None
    """Look again after this many seconds: a failed send's backoff, deletion's wait, or 0 (at once,
    on the object as written: a VM just taken off a lost node is placed again)."""
    placement: Placement | None = None
    release: bool = False
    """Drop the VM's reservation (it has a node now, or none is wanted)."""
    waiting: str = ""
    """Why deletion waits (the handler's retry message)."""
    metric: str = ""
    """A counter to bump after the write (`reschedule`)."""


NOTHING = Decision()


# ---------------------------------------------------------------------------- helpers

def rfc3339(now: float, precise: bool = False) -> str:
    t = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ")


def task_id(uid: str, key: str, attempts: int, now: float) -> str:
    """A new dispatch's taskId, derived (so `decide` stays pure) from what makes it new: the
    VM, the key, the attempt and the moment; a re-decision after a conflict gets another one."""
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{uid}/{key}/{attempts}/{now!r}"))


def _status(vm: Mapping) -> dict:
    return dict(vm.get("status") or {})


def _meta(vm: Mapping) -> Mapping:
    return vm.get("metadata") or {}


def _set_cond(status: dict, patch: dict, type_: str, value: bool, reason: str, message: str, now: float,
              generation: int | None = None) -> bool:
    """Set one condition in the working `status` and the `patch`; True when it changed."""
    new, changed = conditions.set_condition(status.get("conditions"), type_, value, reason, message, generation,
                                            at=rfc3339(now))
    if changed:
        status["conditions"] = patch["conditions"] = new
    return changed


def _dispatch(vm: Mapping, intent: Intent, key: str, attempts: int, now: float, why: str, because: str = "",
              reason: str = names.DISPATCHED, warning: bool = False) -> tuple[dict, Message]:
    uid = _meta(vm).get("uid", "")
    tid, sent = task_id(uid, key, attempts, now), rfc3339(now, precise=True)
    record = {"intent": intent.value, "attempts": attempts, "sentAt": sent, "taskId": tid, "key": key}
    return record, Message(intent, tid, attempts, sent, why, because, reason, warning)


def _resend(d: Mapping) -> Message:
    return Message(Intent(d["intent"]), d["taskId"], int(d.get("attempts") or 1), d.get("sentAt", ""), "send-retry")


def because(vm: Mapping, intent: Intent) -> str:
    if intent is Intent.RESTART:
        return f"{names.ANNOTATION_RESTARTED_AT} is {lifecycle.restart_annotation(vm)}"
    if intent in (Intent.START, Intent.STOP):
        return f"runStrategy is {(vm.get('spec') or {}).get('runStrategy')}"
    return ""


# ---------------------------------------------------------------------------- the decision

def decide(vm: Mapping, view: ClusterView, now: float, settings: Settings) -> Decision:
    """What the operator does about `vm` now. Pure."""
    meta = _meta(vm)
    if meta.get("deletionTimestamp"):
        return finalize(vm, view, now, settings)
    if not _status(vm).get("node"):
        return schedule(vm, view, now)
    return follow(vm, view, now, settings)


def schedule(vm: Mapping, view: ClusterView, now: float) -> Decision:
    """A VM without a node: reject an invalid spec, wait for capacity, or place it and send create."""
    spec = vm.get("spec") or {}
    problems = validation.validate(spec, view.pools, view.nodes)
    if problems:
        return _waiting(vm, Phase.FAILED, names.INVALID_SPEC, validation.describe(problems), now)
    req = placement.request_of(spec)
    if view.sent is not None:
        choice = placement.Choice(view.sent.node, f"assigned to MicroVMNode {view.sent.node}")
    elif view.reserved is not None:
        choice = placement.Choice(view.reserved, f"assigned to MicroVMNode {view.reserved}")
    else:
        choice = placement.choose(req, view.node_views)
    if choice.node is None:
        return _waiting(vm, Phase.PENDING, names.UNSCHEDULABLE, choice.message, now)
    node, st = choice.node, _status(vm)
    patch = {"phase": Phase.SCHEDULED.value, "node": node, "reason": names.PLACED, "message": choice.message}
    _set_cond(st, patch, names.SCHEDULED, True, names.PLACED, choice.message, now, meta_generation(vm))
    record, message = _dispatch(vm, Intent.CREATE, lifecycle.key_for(vm, Intent.CREATE), 1, now, "new",
                                because=f"assigned to MicroVMNode {node}", reason=names.SCHEDULED)
    held = Placement(node, req.vcpus, req.memory_mib, carve_pool=req.pool if choice.needs_block else None)
    if view.sent is not None:
        # the message went before this write: record what it carried, send nothing again (a send
        # that failed is resent by `follow` once the write landed, after its backoff)
        patch["dispatch"] = dict(view.sent.record)
        return Decision(status_patch=patch, placement=held)
    patch["dispatch"] = record
    return Decision(status_patch=patch, messages=(message,), placement=held)


def meta_generation(vm: Mapping) -> int | None:
    return _meta(vm).get("generation")


def _waiting(vm: Mapping, phase: Phase, reason: str, message: str, now: float) -> Decision:
    """Pending/Unschedulable or Failed/InvalidSpec, with the Scheduled condition saying why."""
    st = _status(vm)
    patch = {k: v for k, v in {"phase": phase.value, "reason": reason, "message": message}.items() if st.get(k) != v}
    _set_cond(st, patch, names.SCHEDULED, False, reason, message, now, meta_generation(vm))
    if not patch:
        return Decision(release=True)
    events = (Event(reason, message, warning=True),) if {"reason", "message"} & patch.keys() else ()
    return Decision(status_patch=patch, events=events, release=True)


def follow(vm: Mapping, view: ClusterView, now: float, settings: Settings) -> Decision:
    """A placed VM: its node's reachability, its shape, and its dispatch."""
    st = _status(vm)
    node = st["node"]
    node_obj = view.nodes.get(node)
    h = health.health(node_obj, now, settings.node_lost_after_seconds, view.beats.get(node))
    if not h.ready:
        gone = health.reschedule_due(vm, node_obj, now, settings.self_fence_after_seconds,
                                     settings.reschedule_margin_seconds, view.beats.get(node)) \
            if settings.reschedule_lost_vms else None
        if gone is not None:
            held = health.brake(*health.lost_share(view.nodes, view.beats, now, settings.node_lost_after_seconds,
                                                   also_lost=node),
                                settings.reschedule_max_lost_fraction, settings.reschedule_max_lost_nodes)
            if held is None:
                return _evict(vm, node, gone, now, settings)
            return _held(vm, node, h, held, now)
        return _unreachable(vm, node, h, now)

    patch: dict = {}
    events: list[Event] = []
    reach = conditions.get(st.get("conditions"), names.NODE_REACHABLE)
    if conditions.is_true(st.get("conditions"), RESCHEDULING_HELD):
        _set_cond(st, patch, RESCHEDULING_HELD, False, names.NODE_RECOVERED, f"MicroVMNode {node} is Ready again", now)
    if reach is not None and _set_cond(st, patch, names.NODE_REACHABLE, True, names.NODE_RECOVERED,
                                       f"MicroVMNode {node} is Ready again", now):
        events.append(Event(names.NODE_RECOVERED, f"MicroVMNode {node} is Ready again; its worker re-reports the VM"))
    verdict = lifecycle.restart_required({**vm, "status": st})
    if verdict is not None:
        required, text = verdict
        if _set_cond(st, patch, names.RESTART_REQUIRED, required, names.SHAPE_CHANGED if required else "ShapeApplied",
                     text, now, meta_generation(vm)) and required:
            events.append(Event(names.RESTART_REQUIRED, text))
    current = {**vm, "status": st}
    d = _next_dispatch(current, view, now, settings)
    if d.status_patch:
        patch.update(d.status_patch)
    return replace(d, status_patch=patch or None, events=tuple(events) + d.events)


def _next_dispatch(vm: Mapping, view: ClusterView, now: float, settings: Settings) -> Decision:
    st = _status(vm)
    d = st.get("dispatch")
    node = st["node"]
    if d and d.get("taskId") != view.delivered:
        if view.failed_task == d["taskId"]:  # this process recorded it, and the send failed
            if view.retry_in > 0:
                return Decision(requeue_after=view.retry_in)
            return Decision(messages=(_resend(d),))
        if not lifecycle.goal_reached(vm, d["intent"]):
            # recorded by another process (this one restarted or took over) that may have died
            # between recording and sending: send it again now, with a new taskId
            record, msg = _dispatch(vm, Intent(d["intent"]), d.get("key", ""), int(d.get("attempts") or 1), now,
                                    "operator-restart")
            return Decision(status_patch={"dispatch": record}, messages=(msg,))

    want = lifecycle.desired(vm)
    if want is not None and (not d or want.key != d.get("key")):
        record, msg = _dispatch(vm, want.intent, want.key, 1, now, "new", because=because(vm, want.intent))
        return Decision(status_patch={"dispatch": record}, messages=(msg,))

    verdict = lifecycle.progress(vm, view.progress_at, now, timeout=settings.progress_timeout_seconds,
                                 backoff_base=settings.dispatch_backoff_seconds,
                                 max_attempts=settings.max_dispatch_attempts)
    if verdict.action == "redispatch":
        attempts = int(d.get("attempts") or 1) + 1
        text = (f"no progress from MicroVMNode {node} on {d['intent']} (phase {st.get('phase')}), "
                f"attempt {attempts} of {settings.max_dispatch_attempts}")
        record, msg = _dispatch(vm, Intent(d["intent"]), d.get("key", ""), attempts, now, "no-progress",
                                because=text, reason="Redispatching", warning=True)
        return Decision(status_patch={"dispatch": record}, messages=(msg,))
    if verdict.action == "give-up":
        text = (f"no progress from MicroVMNode {node} after {d.get('attempts')} dispatches of {d['intent']}; "
                f"giving up (maxDispatchAttempts is {settings.max_dispatch_attempts})")
        return Decision(status_patch={"phase": Phase.FAILED.value, "reason": names.NO_PROGRESS, "message": text},
                        events=(Event(names.NO_PROGRESS, text, warning=True),))
    return NOTHING  # waiting for progress: the sweep looks again (operator/sweep.py)


def _unreachable(vm: Mapping, node: str, h: health.Health, now: float) -> Decision:
    st = _status(vm)
    message = f"MicroVMNode {node} is not Ready: {h.message}"
    patch: dict = {}
    if st.get("phase") not in health.UNREACHABLE_EXEMPT:
        patch = {"phase": Phase.UNKNOWN.value, "reason": names.NODE_LOST, "message": message}
    if patch or st.get("phase") == Phase.UNKNOWN.value:
        _set_cond(st, patch, names.NODE_REACHABLE, False, h.reason, message, now)
    if not patch:
        return NOTHING
    events = (Event(names.NODE_LOST, f"{message}; phase Unknown until the node returns", warning=True),) \
        if "phase" in patch else ()
    return Decision(status_patch=patch, events=events)


def _held(vm: Mapping, node: str, h: health.Health, why: str, now: float) -> Decision:
    """A VM due to move whose rescheduling the brake holds: Unknown as any lost node's VM, with
    condition ReschedulingHeld saying why and one Warning event when it turns True."""
    d = _unreachable(vm, node, h, now)
    st = _status(vm)
    patch = dict(d.status_patch or {})
    if "conditions" in patch:
        st["conditions"] = patch["conditions"]
    message = f"not placing the VM elsewhere: {why}; it waits for MicroVMNode {node} to return"
    if not _set_cond(st, patch, RESCHEDULING_HELD, True, RESCHEDULING_HELD, message, now):
        return d
    return replace(d, status_patch=patch, events=d.events + (Event(RESCHEDULING_HELD, message, warning=True),))


def _evict(vm: Mapping, node: str, gone: float, now: float, settings: Settings) -> Decision:
    """Take the VM off its lost node in one write; the next decision places it again."""
    st = _status(vm)
    message = (f"MicroVMNode {node} has sent no heartbeat for {gone:.0f}s, past selfFenceAfterSeconds "
               f"({settings.self_fence_after_seconds:g}s) plus rescheduleMarginSeconds "
               f"({settings.reschedule_margin_seconds:g}s), so its worker has stopped the VM: placing it "
               f"again; {node} removes what it held when it returns")
    at = rfc3339(now)
    conds = [c for c in st.get("conditions") or [] if c.get("type") != names.NODE_REACHABLE]
    conds, _ = conditions.set_condition(conds, names.SCHEDULED, False, names.RESCHEDULING, message,
                                        meta_generation(vm), at=at)
    conds, _ = conditions.set_condition(conds, names.READY, False, names.RESCHEDULING, message, at=at)
    if conditions.get(conds, RESCHEDULING_HELD) is not None:
        conds, _ = conditions.set_condition(conds, RESCHEDULING_HELD, False, names.RESCHEDULING, message, at=at)
    # the disk does not travel: the new node boots a fresh copy of the image (docs/protocol.md)
    reset = (f"the VM's disk was reset: MicroVMNode {node} kept its copy, the new node starts from a fresh "
             f"copy of the VM's image")
    conds, _ = conditions.set_condition(conds, DISK_RESET, True, DISK_RESET_REASON, reset, meta_generation(vm), at=at)
    patch = {"phase": Phase.PENDING.value, "node": None, "reason": names.RESCHEDULING, "message": message,
             "conditions": conds, **{f: None for f in NODE_FIELDS if f in st}}
    return Decision(status_patch=patch, events=(Event(names.RESCHEDULING, message, warning=True),
                                                Event(DISK_RESET, reset, warning=True)),
                    requeue_after=0.0, release=True, metric="reschedule")


# ---------------------------------------------------------------------------- deletion

def finalize(vm: Mapping, view: ClusterView, now: float, settings: Settings) -> Decision:
    """A MicroVM being deleted: tell its node, hold the finalizer until the node confirms."""
    st = _status(vm)
    node = st.get("node")
    if not node:
        return Decision(finalizer_remove=True, release=True)
    if st.get("cleanedUpAt"):
        return Decision(finalizer_remove=True,
                        events=(Event("Deleted", f"MicroVMNode {node} removed the VM, its tap and its files"),))
    send = _delete_dispatch(vm, view, now, settings)
    h = health.health(view.nodes.get(node), now, settings.node_lost_after_seconds, view.beats.get(node))
    forced = names.ANNOTATION_FORCE_DELETE in (_meta(vm).get("annotations") or {})
    started = conditions.parse_time(_meta(vm)["deletionTimestamp"]).timestamp()
    left = settings.delete_wait_seconds - (now - started)
    if not h.ready or forced:
        why = f"MicroVMNode {node} is lost ({h.message})" if not h.ready else \
            f"the {names.ANNOTATION_FORCE_DELETE} annotation is set"
        if left <= 0:
            text = (f"removed the finalizer without confirmation from the node: {why}, waited "
                    f"{settings.delete_wait_seconds:g}s; the node removes the orphan itself when it returns")
            return replace(send, finalizer_remove=True, requeue_after=None,
                           events=send.events + (Event(names.FORCE_DELETED, text, warning=True),))
        return replace(send, requeue_after=min(max(left, 0.5), 2.0),
                       waiting=f"{why}; removing the finalizer in {left:.0f}s")
    # the confirmation is a status change, but kopf runs a delayed handler only when the delay is
    # over: ask soon at first, then every few seconds (each retry is an API write)
    wait = min(5.0, 0.5 * 2 ** view.retry)
    if send.requeue_after is not None:
        wait = min(wait, send.requeue_after) if send.requeue_after > 0 else wait
    return replace(send, requeue_after=wait, waiting=f"waiting for MicroVMNode {node} to confirm the VM is gone")


def _delete_dispatch(vm: Mapping, view: ClusterView, now: float, settings: Settings) -> Decision:
    st = _status(vm)
    node = st["node"]
    d = st.get("dispatch") or {}
    if d.get("intent") != Intent.DELETE.value:
        message = f"waiting for MicroVMNode {node} to remove the VM, its tap and its files"
        record, msg = _dispatch(vm, Intent.DELETE, lifecycle.key_for(vm, Intent.DELETE), 1, now, "new",
                                because=message, reason="Deleting")
        return Decision(status_patch={"phase": Phase.DELETING.value, "reason": "Deleting", "message": message,
                                      "dispatch": record}, messages=(msg,))
    if d.get("taskId") != view.delivered:
        if view.failed_task == d["taskId"]:
            return Decision(requeue_after=view.retry_in) if view.retry_in > 0 else Decision(messages=(_resend(d),))
        record, msg = _dispatch(vm, Intent.DELETE, d.get("key", ""), int(d.get("attempts") or 1), now,
                                "operator-restart")
        return Decision(status_patch={"dispatch": record}, messages=(msg,))
    verdict = lifecycle.progress(vm, view.progress_at, now, timeout=settings.progress_timeout_seconds,
                                 backoff_base=settings.dispatch_backoff_seconds, max_attempts=0, give_up=False)
    if verdict.action == "redispatch":
        record, msg = _dispatch(vm, Intent.DELETE, d.get("key", ""), int(d.get("attempts") or 1) + 1, now,
                                "no-progress")
        return Decision(status_patch={"dispatch": record}, messages=(msg,))
    return NOTHING
