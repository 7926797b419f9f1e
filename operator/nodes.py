"""MicroVMNodes as the operator sees them: heartbeat freshness decides the node's Ready condition
(and so whether its VMs are reachable), and the node's status shows what its VMs hold
(`allocated`, `usage`, `vmCount`).

A heartbeat older than `nodeLostAfterSeconds` makes the node NotReady (reason NodeLost) and each of
its VMs Unknown with NodeReachable=False; a fresh one makes it Ready again and the VMs reachable
(the worker then re-reports their phase). `health` and `status_patch` are pure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mikrom import conditions, kube, names
from mikrom.names import Phase

from .state import SETTINGS, STATE
from .status import emit

log = logging.getLogger(__name__)

UNREACHABLE_EXEMPT = frozenset({Phase.UNKNOWN.value, Phase.SUCCEEDED.value, Phase.FAILED.value,
                                Phase.DELETING.value})
_last_prune = [0.0]


@dataclass(frozen=True)
class Health:
    ready: bool
    reason: str
    message: str


def health(node: Mapping | None, now: float, lost_after: float) -> Health:
    """Whether `node` may take and keep VMs, judged from its worker's heartbeat."""
    if node is None:
        return Health(False, names.NODE_LOST, "the MicroVMNode does not exist")
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return Health(False, "NodeDeleting", "the MicroVMNode is being deleted")
    beat = (node.get("status") or {}).get("lastHeartbeatTime")
    if not beat:
        return Health(False, "NoHeartbeat", "the worker has not sent a heartbeat yet")
    age = now - conditions.parse_time(beat).timestamp()
    if age > lost_after:
        return Health(False, names.NODE_LOST, f"no heartbeat from the worker since {beat} "
                                              f"(nodeLostAfterSeconds is {lost_after:g})")
    return Health(True, "HeartbeatCurrent", "the worker's heartbeat is current")


RESCHEDULABLE = frozenset({names.RunStrategy.ALWAYS.value, names.RunStrategy.RERUN_ON_FAILURE.value})


def lost_for(node: Mapping | None, vm_status: Mapping, now: float) -> float | None:
    """Seconds since the VM's node was last known alive: its last heartbeat, or, with no node object
    or heartbeat left, since the VM was marked unreachable. None when nothing says."""
    beat = ((node or {}).get("status") or {}).get("lastHeartbeatTime")
    if beat:
        return now - conditions.parse_time(beat).timestamp()
    reach = conditions.get(vm_status.get("conditions"), names.NODE_REACHABLE)
    if reach and reach.get("status") == "False" and reach.get("lastTransitionTime"):
        return now - conditions.parse_time(reach["lastTransitionTime"]).timestamp()
    return None


def reschedule_due(vm: Mapping, node: Mapping | None, now: float, fence_after: float, margin: float) -> float | None:
    """How long the VM's node has been lost, when that is past the node's self-fence time plus the
    margin and the VM should run somewhere (`runStrategy` Always or RerunOnFailure, no `nodeName`,
    not finished or being deleted); else None."""
    spec, status = vm.get("spec") or {}, vm.get("status") or {}
    if spec.get("nodeName") or (vm.get("metadata") or {}).get("deletionTimestamp"):
        return None
    if spec.get("runStrategy", names.RunStrategy.ALWAYS.value) not in RESCHEDULABLE:
        return None
    if status.get("phase") in (Phase.SUCCEEDED.value, Phase.DELETING.value):
        return None
    gone = lost_for(node, status, now)
    return gone if gone is not None and gone > fence_after + margin else None


def status_patch(node: Mapping, allocated: tuple[int, int, int], h: Health) -> dict | None:
    """The operator's fields of MicroVMNode.status that differ from what they should be."""
    status = node.get("status") or {}
    capacity = status.get("capacity") or {}
    cpu, mem, count = allocated
    want = {
        "allocated": {"vcpus": cpu, "memoryMiB": mem},
        "usage": {"vcpus": f"{cpu}/{capacity.get('vcpus', 0)}", "memoryMiB": f"{mem}/{capacity.get('memoryMiB', 0)}"},
        "vmCount": count,
    }
    patch = {k: v for k, v in want.items() if status.get(k) != v}
    new, changed = conditions.set_condition(status.get("conditions"), names.READY, h.ready, h.reason, h.message)
    if changed:
        patch["conditions"] = new
    return patch or None


def check_interval() -> float:
    """How often each node is checked: often enough that a lost node's VMs are Unknown well within
    nodeLostAfterSeconds + 10 s."""
    return max(0.5, min(SETTINGS.reconcile_interval_seconds, SETTINGS.node_lost_after_seconds / 4, 5.0))


def reconcile(body: dict) -> None:
    """Check one node: its Ready condition, its status counts, and its VMs' reachability."""
    from . import vms  # vms reconciles a VM against its node; this module only triggers it

    name = body["metadata"]["name"]
    STATE.observe_node(body)
    STATE.touch("node", name)
    node = STATE.node(name) or body
    h = health(node, time.time(), SETTINGS.node_lost_after_seconds)
    was = conditions.get((node.get("status") or {}).get("conditions"), names.READY)
    patch = status_patch(node, STATE.allocated().get(name, (0, 0, 0)), h)
    if patch:
        result = kube.patch_node_status(name, patch)
        if result is not None:
            STATE.observe_node(result)
    if was is None or (was.get("status") == "True") != h.ready:
        on_node = STATE.vms_on(name)
        if h.ready:
            emit(node, "NodeReady", f"{h.message}; {len(on_node)} MicroVMs on it")
            STATE.wake()
        elif was is not None or on_node:
            emit(node, h.reason, f"{h.message}; its {len(on_node)} MicroVMs are Unknown until it returns",
                 warning=True)
    for vm in STATE.vms_on(name):
        st = vm.get("status") or {}
        if h.ready:
            needs = conditions.get(st.get("conditions"), names.NODE_REACHABLE) is not None and \
                not conditions.is_true(st.get("conditions"), names.NODE_REACHABLE)
        else:
            needs = st.get("phase") not in UNREACHABLE_EXEMPT and not vm["metadata"].get("deletionTimestamp")
        if needs:
            try:
                vms.reconcile(vm, cause="node")
            except Exception as exc:  # noqa: BLE001 - one VM must not stop the others; its timer retries
                log.warning("node %s: could not update MicroVM %s/%s: %s", name, vm["metadata"].get("namespace"),
                            vm["metadata"].get("name"), exc)
    _maybe_prune()


def _maybe_prune() -> None:
    now = time.monotonic()
    if now - _last_prune[0] < 30:
        return
    _last_prune[0] = now
    stale = STATE.prune(max(120.0, 10 * SETTINGS.reconcile_interval_seconds))
    if stale:
        log.info("forgot %d objects no longer served: %s", len(stale), ", ".join(stale[:10]))
