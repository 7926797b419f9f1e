"""Guest addresses inside the node's block (`MicroVMNode.spec.cidr`), chosen by the node alone.

The operator carves one block per node from an IPPool; inside it the worker is the only allocator,
so no cluster-wide lock is needed. The block's first host address is the bridge's gateway; each VM
gets the lowest free address above it, and keeps it across stop and start (the caller passes the
address it had as `preferred`). Pure functions: the caller supplies the addresses in use.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable


class BlockExhausted(Exception):
    """Every address of the node's block is taken; a VM must go before another can start."""

    reason = "AddressesExhausted"


class NoAddressBlock(Exception):
    """The node has no block yet (the operator assigns it on the first networked placement)."""

    reason = "NoAddressBlock"


def block(cidr: str | None) -> ipaddress.IPv4Network:
    if not cidr:
        raise NoAddressBlock("this node has no address block yet (MicroVMNode.spec.cidr is empty)")
    net = ipaddress.IPv4Network(cidr, strict=False)
    if net.num_addresses < 4:
        raise BlockExhausted(f"block {net} is too small for a gateway and a guest")
    return net


def gateway(cidr: str) -> ipaddress.IPv4Interface:
    """The bridge address: the block's first host, with the block's prefix."""
    net = block(cidr)
    return ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")


def pick(cidr: str, used: Iterable[str], preferred: str | None = None) -> str:
    """The address for a VM: `preferred` if it is a free guest address of the block, else the
    lowest free one."""
    net = block(cidr)
    gw = net.network_address + 1
    taken = set()
    for addr in used:
        try:
            taken.add(ipaddress.IPv4Address(addr))
        except ValueError:
            continue
    if preferred:
        try:
            want = ipaddress.IPv4Address(preferred)
        except ValueError:
            want = None
        if want is not None and _is_guest(net, gw, want) and want not in taken:
            return str(want)
    for host in net.hosts():
        if host != gw and host not in taken:
            return str(host)
    raise BlockExhausted(f"all {net.num_addresses - 3} guest addresses of {net} are in use")


def _is_guest(net: ipaddress.IPv4Network, gw: ipaddress.IPv4Address, addr: ipaddress.IPv4Address) -> bool:
    return addr in net and addr not in (net.network_address, net.broadcast_address, gw)
