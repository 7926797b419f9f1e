"""IPPools at work: carving a node's address block into `MicroVMNode.spec.cidr` when the node gets
its first networked VM, and keeping `IPPool.status` (blocks, counts) current.

Carving runs under the placement lock (see `scheduler`), so two nodes never get the same block.
"""

from __future__ import annotations

import logging

from mikrom import kube, names

from . import ipam
from .state import SETTINGS, STATE
from .status import emit

log = logging.getLogger(__name__)


def _spec(pool: dict) -> tuple[str, int]:
    spec = pool.get("spec") or {}
    return spec["cidr"], int(spec.get("blockSize") or SETTINGS.default_pool_block_size)


def _taken() -> list[str]:
    return [n["spec"]["cidr"] for n in STATE.nodes().values() if (n.get("spec") or {}).get("cidr")]


def can_carve(pool_name: str) -> bool:
    pool = STATE.pools().get(pool_name)
    if pool is None:
        return False
    cidr, size = _spec(pool)
    return ipam.next_block(cidr, size, _taken()) is not None


def carve(node_name: str, pool_name: str) -> str | None:
    """Give `node_name` the pool's lowest free block; None when the pool has none left."""
    pool = STATE.pools().get(pool_name)
    if pool is None:
        return None
    cidr, size = _spec(pool)
    block = ipam.next_block(cidr, size, _taken())
    if block is None:
        return None
    result = kube.custom().patch_cluster_custom_object(
        names.GROUP, names.VERSION, names.MICROVMNODES, node_name, {"spec": {"cidr": block, "pool": pool_name}},
        _request_timeout=kube.TIMEOUT)
    STATE.observe_node(result)
    emit(result, "BlockAssigned", f"address block {block} from IPPool {pool_name}")
    refresh(pool_name)
    return block


def refresh(pool_name: str) -> None:
    """Write IPPool.status if the blocks or counts changed."""
    pool = STATE.pools().get(pool_name)
    if pool is None:
        return
    cidr, size = _spec(pool)
    blocks = {name: n["spec"]["cidr"] for name, n in STATE.nodes().items()
              if (n.get("spec") or {}).get("pool") == pool_name and (n.get("spec") or {}).get("cidr")}
    want = ipam.pool_status(cidr, size, blocks, STATE.guest_addresses())
    current = pool.get("status") or {}
    if all(current.get(k, None if k != "message" else "") == v for k, v in want.items()):
        return
    patch = dict(want)
    # a merge patch merges maps: blocks of nodes that are gone must be removed explicitly
    patch["blocks"] = {**{k: None for k in current.get("blocks") or {} if k not in blocks}, **blocks}
    result = kube.custom().patch_cluster_custom_object_status(
        names.GROUP, names.VERSION, names.IPPOOLS, pool_name, {"status": patch}, _request_timeout=kube.TIMEOUT)
    STATE.observe_pool(result)
    if want.get("message") and want["message"] != current.get("message"):
        emit(result, "PoolExhausted", want["message"], warning=True)
