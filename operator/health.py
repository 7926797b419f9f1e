"""A MicroVMNode's health as the operator judges it, and the node status the operator owes it.

Heartbeat freshness decides the node's Ready condition (and so whether its VMs are reachable);
a node lost past its self-fence time plus a margin lets its VMs be placed again; the node's status
shows what its VMs hold (`allocated`, `usage`, `vmCount`). Pure functions; times are seconds since
the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mikrom import conditions, names
from mikrom.names import Phase

UNREACHABLE_EXEMPT = frozenset({Phase.UNKNOWN.value, Phase.SUCCEEDED.value, Phase.FAILED.value,
                                Phase.DELETING.value})


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
