"""Placement with its side effects, serialised: under one lock the operator builds the node views
(capacity minus what assigned VMs and not-yet-written reservations hold), picks a node with
`placement.choose`, carves the node's address block if it needs one, and reserves the capacity
before the lock is released. Two VMs therefore never double-book a node, even before the watch
stream shows the first one's assignment.

`Sweeper` re-tries the pending VMs when capacity may have appeared (a node registered or changed,
a VM was deleted or finished), one sweep at a time, on kopf's thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from . import ipam, nodes, placement, pools
from .state import SETTINGS, STATE, Reservation

log = logging.getLogger(__name__)


def _views(req: placement.Request) -> list[placement.NodeView]:
    now = time.time()
    allocated = STATE.allocated()
    carvable = pools.can_carve(req.pool) if req.pool else False
    out = []
    for name, node in STATE.nodes().items():
        spec, status = node.get("spec") or {}, node.get("status") or {}
        capacity = status.get("capacity") or {}
        cpu, mem, _ = allocated.get(name, (0, 0, 0))
        block = spec.get("cidr")
        free = 0
        if block:
            free = ipam.guests_per_block(ipam.network(block).prefixlen) - STATE.addresses_on(name)
        out.append(placement.NodeView(
            name=name,
            ready=nodes.health(node, now, SETTINGS.node_lost_after_seconds).ready,
            schedulable=spec.get("schedulable", True) is not False,
            labels=(node.get("metadata") or {}).get("labels") or {},
            capacity_vcpus=int(capacity.get("vcpus") or 0),
            capacity_memory_mib=int(capacity.get("memoryMiB") or 0),
            allocated_vcpus=cpu,
            allocated_memory_mib=mem,
            vmms=tuple(status.get("vmms") or ()),
            pool=(spec.get("pool") or "?") if block else None,
            free_addresses=free,
            can_carve=carvable,
        ))
    return out


def place(vm: dict) -> placement.Choice:
    """Choose a node for `vm` and reserve its capacity (and address block)."""
    uid = vm["metadata"]["uid"]
    req = placement.request_of(vm.get("spec") or {})
    with STATE.placement_lock:
        held = STATE.reservation(uid)
        if held is not None:
            return placement.Choice(held.node, f"assigned to MicroVMNode {held.node}")
        choice = placement.choose(req, _views(req))
        if choice.node is None:
            return choice
        if choice.needs_block and pools.carve(choice.node, req.pool) is None:
            return placement.Choice(None, f"IPPool {req.pool} has no free address block for MicroVMNode {choice.node}")
        STATE.reserve(uid, Reservation(choice.node, req.vcpus, req.memory_mib))
        return choice


class Sweeper:
    """Runs `sweep_fn` in the executor when woken; wake-ups during a sweep cause one more sweep."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: Executor | None = None
        self._fn: Callable[[], None] | None = None
        self._running = False
        self._again = False

    def attach(self, loop: asyncio.AbstractEventLoop, executor: Executor, fn: Callable[[], None]) -> None:
        self._loop, self._executor, self._fn = loop, executor, fn

    def wake(self) -> None:
        """Thread-safe."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                await asyncio.sleep(0.05)  # let a burst of wake-ups coalesce
                try:
                    await self._loop.run_in_executor(self._executor, self._fn)
                except Exception:  # noqa: BLE001 - a failed sweep is retried by the next wake-up or timer
                    log.exception("placement sweep failed")
                if not self._again:
                    return
        finally:
            self._running = False


SWEEPER = Sweeper()
