"""Host networking for VMs: the node bridge, one tap per VM, NAT for egress, and the guest's address.

Every function is idempotent ("make it so"): it looks before it changes, so the worker can call it
again after a crash or a duplicated task. Commands are iproute2 (`ip`) and `iptables` (or `nft`
when iptables is absent), run through hostcmd with a timeout so a wedged command cannot stall the
worker. Every function takes an optional `netns`, the name of a network namespace (`ip netns add`)
to act inside instead of the host's own namespace; tests use it so they never touch the host's
interfaces. What a VM may send over its tap is netpolicy's concern; deleting a tap removes its
policy entries too.

Names and MAC addresses are derived from the VM's uid, so a worker that restarts computes the same
tap and MAC for a VM without having stored them anywhere.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil

from . import netpolicy
from .hostcmd import NetdevError
from .hostcmd import run as _run

TAP_PREFIX = "mk"
"""Every tap created for a VM starts with this, which lets an orphan sweep recognise ours."""

TAP_NAME = re.compile(rf"^{TAP_PREFIX}[0-9a-f]{{12}}$")

NAT_COMMENT = "mikrom-nat"
"""Comment on every NAT/forward rule, so checks and cleanups find exactly our rules."""


def tap_name_for_uid(uid: str) -> str:
    """The VM's tap device name: `mk` + 12 hex digits of a hash of the uid (14 characters, below
    the kernel's 15-character IFNAMSIZ limit; 48 bits make a collision on one node implausible)."""
    return TAP_PREFIX + hashlib.sha256(("tap:" + uid).encode()).hexdigest()[:12]


def mac_for_uid(uid: str) -> str:
    """A stable MAC address for the VM: locally administered (bit 1 of the first octet set) and
    unicast (bit 0 clear), so it never collides with a vendor-assigned address."""
    raw = bytearray(hashlib.sha256(("mac:" + uid).encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def kernel_ip_arg(ip: str, gateway: str, prefixlen: int, device: str = "eth0", hostname: str = "") -> str:
    """The `ip=` kernel argument in the kernel's nfsroot format,
    `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>`, with autoconf off.
    Guests with IP autoconfiguration built in apply it themselves; our test initramfs parses it."""
    client = ipaddress.IPv4Address(ip)
    gw = ipaddress.IPv4Address(gateway)
    net = ipaddress.IPv4Network(f"{client}/{int(prefixlen)}", strict=False)
    if gw not in net:
        raise ValueError(f"gateway {gw} is outside {net}")
    return f"ip={client}::{gw}:{net.netmask}:{hostname}:{device}:off"


_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _ip(args: list[str], netns: str | None, check: bool = True, stdin: str | None = None):
    """`ip ARGS` inside `netns`: `ip -n` switches namespace itself, one exec less than `ip netns exec`."""
    return _run(["ip", "-n", netns, *args] if netns else ["ip", *args], None, check=check, stdin=stdin)


def _link(name: str, netns: str | None) -> dict | None:
    res = _ip(["-j", "-d", "link", "show", "dev", name], netns, check=False)
    if res.returncode != 0:
        return None
    links = json.loads(res.stdout or "[]")
    return links[0] if links else None


def link_exists(name: str, netns: str | None = None) -> bool:
    return _link(name, netns) is not None


def ensure_bridge(name: str, gateway_cidr: str, netns: str | None = None) -> None:
    """Create the bridge if missing, give it the gateway address (e.g. `172.16.3.1/24`) and bring it
    up. An address already there is left alone."""
    iface = ipaddress.IPv4Interface(gateway_cidr)
    link = _link(name, netns)
    if link is None:
        _ip(["link", "add", "name", name, "type", "bridge"], netns)
    elif link.get("linkinfo", {}).get("info_kind") != "bridge":
        raise NetdevError(f"{name} exists and is not a bridge")
    addrs = json.loads(_ip(["-j", "-4", "addr", "show", "dev", name], netns).stdout or "[]")
    present = {(a["local"], a["prefixlen"]) for entry in addrs for a in entry.get("addr_info", [])}
    if (str(iface.ip), iface.network.prefixlen) not in present:
        _ip(["addr", "add", str(iface), "dev", name], netns)
    _ip(["link", "set", "dev", name, "up"], netns)


def ensure_tap(tap: str, bridge: str, netns: str | None = None, user: int | None = None) -> None:
    """Create the tap if missing (owned by `user` when given, for a jailed Firecracker), attach it
    to the bridge and bring it up. A new VM's tap does not exist yet, so that is tried first, in
    one `ip -batch` (which stops at its first error: `tuntap add` of a tap that exists); if it
    fails, one look at the link, then what is missing in one `ip -batch`."""
    if len(tap) > 15:
        raise ValueError(f"tap name {tap!r} is longer than 15 characters")
    for what in (tap, bridge):
        if not _IFNAME.match(what):  # the batch is a text of commands: nothing but a name goes in
            raise ValueError(f"invalid interface name {what!r}")
    owned = f" user {int(user)}" if user is not None else ""
    new = [f"tuntap add dev {tap} mode tap{owned}", f"link set dev {tap} master {bridge}", f"link set dev {tap} up"]
    if _ip(["-batch", "-"], netns, check=False, stdin="\n".join(new) + "\n").returncode == 0:
        return
    link = _link(tap, netns)
    owner = (link or {}).get("linkinfo", {}).get("info_data", {}).get("user")
    if link is not None and user is not None and owner != user:
        # left by an earlier start under another uid: that VMM could not open it (it is not running,
        # or it would not be asking for its tap)
        _ip(["link", "del", "dev", tap], netns)
        link = None
    batch = []
    if link is None:
        batch.append(f"tuntap add dev {tap} mode tap{owned}")
    if link is None or link.get("master") != bridge:
        batch.append(f"link set dev {tap} master {bridge}")
    batch.append(f"link set dev {tap} up")
    _ip(["-batch", "-"], netns, stdin="\n".join(batch) + "\n")


def delete_tap(tap: str, netns: str | None = None) -> None:
    """Remove the tap and its entries in the VM network policy; either already gone is fine. The
    entries go first: a tap left without them drops everything its VM sends."""
    netpolicy.remove_vm(tap, netns)
    if link_exists(tap, netns):
        res = _ip(["link", "del", "dev", tap], netns, check=False)
        if res.returncode != 0 and link_exists(tap, netns):
            raise NetdevError(f"ip link del {tap} failed: {res.stderr.strip()}")


def list_taps(netns: str | None = None) -> list[str]:
    """Our taps present on the host (tap devices named like tap_name_for_uid), for orphan sweeps."""
    links = json.loads(_ip(["-j", "-d", "link", "show"], netns).stdout or "[]")
    return sorted(link["ifname"] for link in links
                  if TAP_NAME.match(link["ifname"]) and link.get("linkinfo", {}).get("info_kind") == "tun")


def nat_backend() -> str | None:
    """`iptables` when installed (Debian's is the nf_tables flavour), else `nft`, else None."""
    for tool in ("iptables", "nft"):
        if shutil.which(tool):
            return tool
    return None


def _iptables_rules(bridge: str, block: str) -> list[tuple[str, list[str]]]:
    tag = ["-m", "comment", "--comment", NAT_COMMENT]
    return [
        ("nat", ["POSTROUTING", "-s", block, "!", "-o", bridge, "-j", "MASQUERADE", *tag]),
        ("filter", ["FORWARD", "-i", bridge, "-s", block, "-j", "ACCEPT", *tag]),
        ("filter", ["FORWARD", "-o", bridge, "-d", block, "-m", "conntrack",
                    "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT", *tag]),
    ]


def ensure_nat(bridge: str, block_cidr: str, netns: str | None = None, backend: str | None = None) -> None:
    """Let the block reach the outside: IPv4 forwarding on, MASQUERADE for traffic from the block
    that leaves through any other interface, and forward rules so a default-drop FORWARD policy
    does not swallow it. Each rule is checked before it is added. `backend` forces `iptables` or
    `nft`; by default the first one installed is used."""
    block = str(ipaddress.IPv4Network(block_cidr, strict=False))
    # /proc/sys/net is per network namespace, so this runs inside `netns` like the rest.
    _run(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"], netns)
    backend = backend or nat_backend()
    if backend == "iptables":
        for table, rule in _iptables_rules(bridge, block):
            if _run(["iptables", "-w", "5", "-t", table, "-C", *rule], netns, check=False).returncode != 0:
                _run(["iptables", "-w", "5", "-t", table, "-A", *rule], netns)
    elif backend == "nft":
        _ensure_nat_nft(bridge, block, netns)
    else:
        raise NetdevError("neither iptables nor nft is installed; cannot set up NAT")


def nat_rules(netns: str | None = None, backend: str | None = None) -> list[str]:
    """Our NAT/forward rules as the backend prints them (for checks and tests)."""
    backend = backend or nat_backend()
    if backend == "iptables":
        out = []
        for table in ("nat", "filter"):
            res = _run(["iptables", "-w", "5", "-t", table, "-S"], netns)
            out += [line for line in res.stdout.splitlines() if NAT_COMMENT in line]
        return out
    if backend == "nft":
        res = _run(["nft", "list", "table", "ip", "mikrom"], netns, check=False)
        return [line.strip() for line in res.stdout.splitlines() if NAT_COMMENT in line]
    return []


def _ensure_nat_nft(bridge: str, block: str, netns: str | None) -> None:
    # A table of our own. Adding a table or chain that exists is a no-op in nft, adding a rule is
    # not, so each rule carries a distinct comment that is looked for before adding it.
    _run(["nft", "add", "table", "ip", "mikrom"], netns)
    _run(["nft", "add", "chain", "ip", "mikrom", "postrouting",
          "{ type nat hook postrouting priority 100 ; }"], netns)
    _run(["nft", "add", "chain", "ip", "mikrom", "forward",
          "{ type filter hook forward priority 0 ; }"], netns)
    listing = _run(["nft", "list", "table", "ip", "mikrom"], netns).stdout
    wanted = [
        ("postrouting", "masquerade", f'ip saddr {block} oifname != "{bridge}" masquerade'),
        ("forward", "out", f'iifname "{bridge}" ip saddr {block} accept'),
        ("forward", "in", f'oifname "{bridge}" ip daddr {block} ct state related,established accept'),
    ]
    for chain, kind, rule in wanted:
        comment = f"{NAT_COMMENT} {kind} {bridge} {block}"
        if f'comment "{comment}"' not in listing:
            _run(["nft", "add", "rule", "ip", "mikrom", chain, f'{rule} comment "{comment}"'], netns)
