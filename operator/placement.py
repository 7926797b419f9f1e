"""Placement: which MicroVMNode takes a VM, or what is short when none can.

Among Ready, schedulable nodes matching `nodeName` and `nodeSelector`, offering the VMM asked for
and having free vCPUs, memory and (for a networked VM) an address, pick the least allocated one
(the mean of the vCPU and memory fractions after placing, as kube-scheduler's LeastAllocated).
Pure: the caller builds the node views, holding its placement lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mikrom import names

from .validation import format_selector, labels_match

# Phases in which a VM assigned to a node holds that node's capacity: it runs, is about to, or may
# start again there (Stopped keeps its node). Finished VMs hold nothing.
RELEASED_PHASES = frozenset({names.Phase.SUCCEEDED.value, names.Phase.FAILED.value})


@dataclass(frozen=True)
class Request:
    vcpus: int
    memory_mib: int
    node_selector: Mapping[str, str] = field(default_factory=dict)
    node_name: str | None = None
    pool: str | None = None
    vmm: str | None = None


@dataclass(frozen=True)
class NodeView:
    name: str
    ready: bool
    schedulable: bool = True
    cordoned_by: str = ""
    """Why the node's Kubernetes Node (same name) is cordoned, or "" (spec.unschedulable unset)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity_vcpus: int = 0
    capacity_memory_mib: int = 0
    allocated_vcpus: int = 0
    allocated_memory_mib: int = 0
    vmms: tuple[str, ...] = ()
    pool: str | None = None
    """The IPPool the node's block comes from; None: no block yet."""
    free_addresses: int = 0
    """Guest addresses left in the node's block (when it has one)."""
    can_carve: bool = False
    """Whether the request's pool still has a block for this node (when it has none)."""


@dataclass(frozen=True)
class Choice:
    node: str | None
    message: str
    needs_block: bool = False
    """True when the chosen node has no address block yet and one must be carved for it."""


def request_of(spec: Mapping) -> Request:
    network = spec.get("network")
    return Request(
        vcpus=int(spec.get("vcpus") or 1),
        memory_mib=int(spec.get("memoryMiB") or 512),
        node_selector=dict(spec.get("nodeSelector") or {}),
        node_name=spec.get("nodeName") or None,
        pool=((network or {}).get("pool") or "default") if isinstance(network, Mapping) else None,
        vmm=spec.get("vmm") or None,
    )


def holds(vm: Mapping) -> bool:
    """Whether a VM counts against its node's capacity."""
    status = vm.get("status") or {}
    return bool(status.get("node")) and status.get("phase") not in RELEASED_PHASES


def shape(vm: Mapping) -> tuple[int, int]:
    """vCPUs and MiB a VM holds: the larger of its spec and the shape it runs with."""
    spec = vm.get("spec") or {}
    active = (vm.get("status") or {}).get("activeShape") or {}
    return (max(int(spec.get("vcpus") or 1), int(active.get("vcpus") or 0)),
            max(int(spec.get("memoryMiB") or 512), int(active.get("memoryMiB") or 0)))


def _why_not(req: Request, n: NodeView) -> str | None:
    """The first reason `n` cannot take `req`, or None if it can."""
    if not n.ready:
        return "not Ready"
    if not n.schedulable:
        return "cordoned"
    if n.cordoned_by:
        return f"cordoned: {n.cordoned_by}"
    if req.vmm and req.vmm not in n.vmms:
        return f"no {req.vmm}"
    free_cpu = n.capacity_vcpus - n.allocated_vcpus
    if free_cpu < req.vcpus:
        return f"too few free vCPUs ({max(free_cpu, 0)} of {n.capacity_vcpus} free)"
    free_mem = n.capacity_memory_mib - n.allocated_memory_mib
    if free_mem < req.memory_mib:
        return f"too little free memory ({max(free_mem, 0)} of {n.capacity_memory_mib} MiB free)"
    if req.pool:
        if n.pool is None and not n.can_carve:
            return f"no free address block left in IPPool {req.pool}"
        if n.pool is not None and n.pool != req.pool:
            return f"its address block is from IPPool {n.pool}"
        if n.pool is not None and n.free_addresses <= 0:
            return "its address block is full"
    return None


def _score(req: Request, n: NodeView) -> float:
    cpu = (n.allocated_vcpus + req.vcpus) / max(n.capacity_vcpus, 1)
    mem = (n.allocated_memory_mib + req.memory_mib) / max(n.capacity_memory_mib, 1)
    return (cpu + mem) / 2


def choose(req: Request, nodes: Iterable[NodeView]) -> Choice:
    nodes = sorted(nodes, key=lambda n: n.name)
    selected = [n for n in nodes if (not req.node_name or n.name == req.node_name)
                and labels_match(req.node_selector, n.labels)]
    fits, rejected = [], []
    for n in selected:
        why = _why_not(req, n)
        (rejected.append((n.name, why)) if why else fits.append(n))
    if fits:
        best = min(fits, key=lambda n: (_score(req, n), n.name))
        return Choice(best.name, f"assigned to MicroVMNode {best.name}",
                      needs_block=bool(req.pool) and best.pool is None)
    return Choice(None, _shortage(req, len(nodes), len(selected), rejected))


def _shortage(req: Request, total: int, selected: int, rejected: list[tuple[str, str]], limit: int = 8) -> str:
    want = f"{req.vcpus} vCPU, {req.memory_mib} MiB" + (f", {req.vmm}" if req.vmm else "") + \
           (f", an address from IPPool {req.pool}" if req.pool else "")
    if selected == 0 and (req.node_name or req.node_selector):
        return _unmatched(req, total, want)
    if total == 0:
        return f"no MicroVMNode is registered; the VM needs {want}"
    head = f"0/{total} MicroVMNodes can take {want}"
    parts = []
    if selected < total:
        what = "spec.nodeName" if req.node_name else "spec.nodeSelector"
        parts.append(f"{total - selected} not matching {what}")
    details = "; ".join(f"{name}: {why}" for name, why in rejected[:limit])
    if len(rejected) > limit:
        details += f"; and {len(rejected) - limit} more"
    if details:
        parts.append(details)
    return head + (": " + "; ".join(parts) if parts else "")


def _unmatched(req: Request, total: int, want: str) -> str:
    """No node is even a candidate: name what is missing (the VM is placed when such a node
    registers or is relabelled, as a Pod waits for its nodeName or nodeSelector)."""
    selector = "{" + format_selector(req.node_selector) + "}"
    if req.node_name and req.node_selector:
        what = f"no MicroVMNode named {req.node_name} (spec.nodeName) with the labels {selector} (spec.nodeSelector)"
    elif req.node_name:
        what = f"no MicroVMNode named {req.node_name} (spec.nodeName) is registered"
    else:
        what = f"no MicroVMNode matches spec.nodeSelector {selector}"
    return f"{what} ({total} registered); the VM needs {want}"
