"""Address blocks: an IPPool is carved into one block per node (the Calico IPAM idea), and the
node's worker hands out addresses inside its own block, so no global lock is needed per VM.

In each block the first address is the network, the second the node's bridge gateway and the last
the broadcast address; the rest are guest addresses. Pure functions.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping

RESERVED_PER_BLOCK = 3  # network, gateway, broadcast


@functools.lru_cache(maxsize=4096)
def network(cidr: str) -> ipaddress.IPv4Network:
    """The network of `cidr` (parsed once per distinct string: every placement reads each node's
    block; networks are immutable, so one parsed object serves every caller)."""
    return ipaddress.IPv4Network(cidr, strict=False)


def guests_per_block(block_size: int) -> int:
    """Guest addresses in one block of prefix length `block_size`."""
    return max(0, 2 ** (32 - block_size) - RESERVED_PER_BLOCK)


def total_blocks(pool_cidr: str, block_size: int) -> int:
    """How many blocks of `block_size` fit in the pool (0 if a block is larger than the pool)."""
    pool = network(pool_cidr)
    if block_size < pool.prefixlen:
        return 0
    return 2 ** (block_size - pool.prefixlen)


def next_block(pool_cidr: str, block_size: int, taken: Iterable[str]) -> str | None:
    """The lowest block of the pool that overlaps none of `taken`; None when the pool is full."""
    pool = network(pool_cidr)
    if block_size < pool.prefixlen:
        return None
    used = sorted((network(c) for c in taken if _valid(c)), key=lambda n: int(n.network_address))
    used = [n for n in used if n.overlaps(pool)]
    step = 2 ** (32 - block_size)
    start = int(pool.network_address)
    end = int(pool.broadcast_address)
    candidate = start
    while candidate + step - 1 <= end:
        block = ipaddress.IPv4Network((candidate, block_size))
        clash = next((n for n in used if n.overlaps(block)), None)
        if clash is None:
            return str(block)
        # jump past the clashing block, keeping the candidate aligned
        past = int(clash.broadcast_address) + 1
        candidate = max(candidate + step, ((past + step - 1) // step) * step)
    return None


def contains(cidr: str, address: str) -> bool:
    try:
        return ipaddress.IPv4Address(address) in network(cidr)
    except ValueError:
        return False


def _valid(cidr: str) -> bool:
    try:
        network(cidr)
        return True
    except ValueError:
        return False


def pool_status(pool_cidr: str, block_size: int, blocks: Mapping[str, str], addresses: Iterable[str]) -> dict:
    """IPPool.status from the blocks carved (node -> CIDR) and the guest addresses VMs hold."""
    held = {a for a in addresses if any(contains(b, a) for b in blocks.values())}
    capacity = total_blocks(pool_cidr, block_size) * guests_per_block(block_size)
    status = {
        "blocks": dict(sorted(blocks.items())),
        "blockCount": len(blocks),
        "allocated": len(held),
        "available": max(0, capacity - len(held)),
    }
    if total_blocks(pool_cidr, block_size) == 0:
        status["message"] = f"blockSize /{block_size} is larger than the pool {pool_cidr}"
    elif len(blocks) >= total_blocks(pool_cidr, block_size):
        status["message"] = f"every block of {pool_cidr} is carved; nodes without a block get no networked VMs"
    else:
        status["message"] = ""
    return status
