"""A MicroVMNode's health as the operator judges it, and the node status the operator owes it.

Heartbeat freshness decides the node's Ready condition (and so whether its VMs are reachable),
judged by the operator's clock: the age of a heartbeat is the time since the operator first
observed its current value (`heartbeats`), never the operator's clock minus the worker's timestamp;
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


def health(node: Mapping | None, now: float, lost_after: float, seen_at: float | None) -> Health:
    """Whether `node` may take and keep VMs, judged from its worker's heartbeat: `seen_at` is when
    the operator first observed the heartbeat's current value (None: it has observed none)."""
    if node is None:
        return Health(False, names.NODE_LOST, "the MicroVMNode does not exist")
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return Health(False, "NodeDeleting", "the MicroVMNode is being deleted")
    beat = (node.get("status") or {}).get("lastHeartbeatTime")
    if not beat or seen_at is None:
        return Health(False, "NoHeartbeat", "the worker has not sent a heartbeat yet")
    age = now - seen_at
    if age > lost_after:
        # no age in the text: it stays the same while the node stays lost (no rewrite per check)
        return Health(False, names.NODE_LOST, f"no new heartbeat from the worker within nodeLostAfterSeconds "
                                              f"({lost_after:g}s); the last one reads {beat}")
    return Health(True, "HeartbeatCurrent", "the worker's heartbeat is current")


RESCHEDULABLE = frozenset({names.RunStrategy.ALWAYS.value, names.RunStrategy.RERUN_ON_FAILURE.value})


def lost_for(node: Mapping | None, vm_status: Mapping, now: float, seen_at: float | None) -> float | None:
    """Seconds since the VM's node was last known alive: since the operator observed its last new
    heartbeat, or, with no node object or heartbeat left, since the VM was marked unreachable (a
    time the operator wrote). None when nothing says."""
    beat = ((node or {}).get("status") or {}).get("lastHeartbeatTime")
    if beat and seen_at is not None:
        return now - seen_at
    reach = conditions.get(vm_status.get("conditions"), names.NODE_REACHABLE)
    if reach and reach.get("status") == "False" and reach.get("lastTransitionTime"):
        return now - conditions.parse_time(reach["lastTransitionTime"]).timestamp()
    return None


def reschedule_due(vm: Mapping, node: Mapping | None, now: float, fence_after: float, margin: float,
                   seen_at: float | None) -> float | None:
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
    gone = lost_for(node, status, now, seen_at)
    return gone if gone is not None and gone > fence_after + margin else None


def lost_share(nodes: Mapping[str, Mapping], beats: Mapping[str, float], now: float, lost_after: float,
               also_lost: str | None = None) -> tuple[int, int]:
    """(how many MicroVMNodes are lost, how many there are): `nodes` as known, `beats` when the
    operator first observed each one's current heartbeat; `also_lost` names a node counted lost
    even when its object is gone (the VM's own)."""
    lost = {n for n, obj in nodes.items() if not health(obj, now, lost_after, beats.get(n)).ready}
    names_ = set(nodes)
    if also_lost:
        lost.add(also_lost)
        names_.add(also_lost)
    return len(lost), len(names_)


def brake(lost: int, total: int, max_fraction: float, max_nodes: int) -> str | None:
    """Why rescheduling is held (None: it is not): more than `max_fraction` of the nodes lost at
    once, or more than `max_nodes` of them (0: no absolute limit). Many nodes lost together is more
    likely the operator's own view (a network split, an API server outage) than many dead nodes,
    and moving every VM would restart them all on the survivors. "More than": 1 lost of 2 is half,
    not more, so a two-node cluster fails over; the only node of one is all of them (there is
    nowhere to go anyway)."""
    if total <= 0:
        return None
    if lost / total > max_fraction:
        return (f"{lost} of {total} MicroVMNodes are lost at once, more than rescheduleMaxLostFraction "
                f"({max_fraction:g})")
    if max_nodes > 0 and lost > max_nodes:
        return f"{lost} MicroVMNodes are lost at once, more than rescheduleMaxLostNodes ({max_nodes})"
    return None


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
