"""Placement with its side effects, serialised: under `STATE.placement_lock` the operator builds the
node views (capacity minus what assigned VMs and not-yet-written reservations hold), `decide`
picks a node, and `hold` carves the node's address block if it needs one and reserves the
capacity before the lock is released. Two VMs therefore never double-book a node, even before the watch
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

from . import cordons, ipam, placement, pools
from .decide import Placement
from .health import health
from .heartbeats import BEATS
from .state import SETTINGS, STATE, Reservation

log = logging.getLogger(__name__)


def node_views(req: placement.Request) -> tuple[placement.NodeView, ...]:
    """Every node as placement sees it for `req` (call with `STATE.placement_lock` held)."""
    now = time.time()
    lost_after = SETTINGS.node_lost_after_seconds
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
            ready=health(node, now, lost_after, BEATS.observe(node, now, lost_after)).ready,
            schedulable=spec.get("schedulable", True) is not False,
            cordoned_by=cordons.why(name),
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
    return tuple(out)


def hold(uid: str, p: Placement, reserved: bool) -> bool:
    """Carve the chosen node's address block if the placement needs one, and reserve the VM's
    capacity there; False when the pool had no block left after all (decide again). Call with
    `STATE.placement_lock` held, right after deciding on the views built under it."""
    if p.carve_pool and not reserved and pools.carve(p.node, p.carve_pool) is None:
        return False
    STATE.reserve(uid, Reservation(p.node, p.vcpus, p.memory_mib))
    return True


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
