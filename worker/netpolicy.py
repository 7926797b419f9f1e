"""The VM network policy: what a VM may send, and where to, enforced with nftables on its node.

Tenants are untrusted and share the node's bridge, so the node filters everything its VMs send, in
two tables of its own, both named `mikrom` (beside `ip mikrom`, the NAT of netdev.ensure_nat):

- `bridge mikrom` sees the frames on the bridge. A frame from one of our taps passes only as ARP
  whose sender is the VM's own MAC and IPv4 address, or as IPv4 from the VM's own MAC and address;
  everything else (another source, IPv6, VLAN tags, any other ethertype) is dropped. A tap without
  an entry drops everything, so a VM is on the network only once its entry exists. A frame bridged
  from one VM to another passes only when both are in the same Kubernetes namespace (unless the
  policy allows all).
- `inet mikrom` sees what the bridge hands to the node's IP stack: nothing the VMs send reaches an
  address of the node itself except replies to connections the node opened, and nothing is routed
  to the denied ranges (link-local metadata services, the cluster's Services and Pods, whatever the
  settings add), checked before and after any DNAT. The rest leaves through the NAT.

What each VM may do lives in sets keyed by its tap (`tap . mac . ip`, `tap : namespace id`), so
adding and removing a VM are element operations that never touch a rule, and repeating either
changes nothing. The rules themselves, rendered from the settings by the pure functions below, carry
a digest of their text in their comments; they are rewritten (atomically, in one `nft -f`
transaction that leaves the sets' elements alone) only when the node's copy differs.

A bridged frame has no field for "the sender's namespace", so the forward chain borrows the packet
mark: it loads the input tap's namespace id into `meta mark`, looks up `output tap . mark`, and sets
the mark back to 0 (what a frame from a tap carries) before it accepts. The id is a 32-bit hash of
the namespace's name; two namespaces with the same id on one node are refused, never mixed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

from .hostcmd import NetdevError, run

log = logging.getLogger(__name__)

TABLE = "mikrom"
FAMILIES = ("bridge", "inet")

ADDR_SET = "vm_addr"
"""`tap . mac . ipv4`: the one source a VM may use."""
NS_MAP = "vm_ns"
"""`tap : namespace id`, looked up by the input tap; the element's comment is the namespace."""
PORT_NS_SET = "vm_port_ns"
"""`tap . namespace id`, looked up by the output tap."""
DENIED_SET = "vm_denied"
"""IPv4 ranges no VM may reach (inet table)."""
VM_SETS = (ADDR_SET, NS_MAP, PORT_NS_SET)

BRIDGE_PRIORITY = -200
"""Before br_netfilter (0), which hands bridged IPv4 to iptables when bridge-nf-call-iptables is on."""

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
MAX_COMMENT = 127
"""nftables keeps at most 128 bytes of an element's comment."""

Elements = dict[str, set[tuple]]
"""Elements of the per-VM sets by set name, each a tuple whose first item is the tap."""


class NetworkPolicyConflict(NetdevError):
    """The VM's namespace shares its namespace id with another namespace that has VMs on this node;
    connecting it would let the two reach each other, so it is not connected (a retry succeeds once
    the other namespace's VMs have left the node)."""

    reason = "NetworkPolicyConflict"


# ------------------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class PolicyConfig:
    """What the node enforces, from the settings (see `policy_config`)."""

    bridge: str
    tap_prefix: str
    denied: tuple[str, ...] = ()
    """Destinations no VM may reach: non-overlapping IPv4 CIDRs, exceptions already taken out."""
    isolate_namespaces: bool = True
    enabled: bool = True

    def __post_init__(self):
        if not _IFNAME.match(self.bridge):
            raise ValueError(f"bridge name {self.bridge!r} is not a valid interface name")
        if not _IFNAME.match(self.tap_prefix) or len(self.tap_prefix) > 14:
            raise ValueError(f"tap prefix {self.tap_prefix!r} is not a valid interface name prefix")
        nets = ipaddress.collapse_addresses(ipaddress.IPv4Network(c) for c in self.denied)
        object.__setattr__(self, "denied", tuple(sorted(str(n) for n in nets)))


def parse_cidrs(text: str, setting: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of a comma- or space-separated list. IPv6 networks are accepted and left
    out (VMs send no IPv6 at all); anything else is an error naming the setting."""
    out = []
    for item in re.split(r"[,\s]+", text or ""):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{setting}: {item!r} is not an IP network (CIDR)") from None
        if isinstance(net, ipaddress.IPv4Network):
            out.append(net)
    return out


def denied_networks(denied: Iterable[ipaddress.IPv4Network],
                    allowed: Iterable[ipaddress.IPv4Network] = ()) -> list[ipaddress.IPv4Network]:
    """`denied` minus `allowed`, as the fewest non-overlapping networks, sorted."""
    nets = list(ipaddress.collapse_addresses(denied))
    for hole in ipaddress.collapse_addresses(allowed):
        kept = []
        for net in nets:
            if hole.supernet_of(net):
                continue
            kept.extend(net.address_exclude(hole) if net.supernet_of(hole) else [net])
        nets = kept
    return sorted(ipaddress.collapse_addresses(nets))


def policy_config(settings, tap_prefix: str) -> PolicyConfig:
    """The node's policy from its settings; ValueError naming the setting on a bad CIDR."""
    denied = [n for name in ("vm_denied_cidrs", "cluster_service_cidr", "cluster_pod_cidr")
              for n in parse_cidrs(getattr(settings, name), "MIKROM_" + name.upper())]
    allowed = parse_cidrs(settings.vm_allowed_cidrs, "MIKROM_VM_ALLOWED_CIDRS")
    return PolicyConfig(bridge=settings.bridge, tap_prefix=tap_prefix,
                        denied=tuple(str(n) for n in denied_networks(denied, allowed)),
                        isolate_namespaces=not settings.vm_cross_namespace_traffic,
                        enabled=settings.vm_network_isolation)


def namespace_id(namespace: str) -> int:
    """A VM namespace's 32-bit id on the bridge: a hash of its name, never 0 (the mark a frame
    from a tap has, which therefore matches no namespace)."""
    return int.from_bytes(hashlib.sha256(("ns:" + namespace).encode()).digest()[:4], "big") or 1


@dataclass(frozen=True)
class VMEntry:
    """One VM as the policy knows it: its tap, its own MAC and IPv4 address, its namespace."""

    tap: str
    mac: str
    ip: str
    namespace: str
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "mac", self.mac.lower())
        object.__setattr__(self, "ip", str(ipaddress.IPv4Address(self.ip)))
        if not _IFNAME.match(self.tap):
            raise ValueError(f"tap name {self.tap!r} is not a valid interface name")
        if not _MAC.match(self.mac):
            raise ValueError(f"{self.mac!r} is not a MAC address")
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(f"{self.namespace!r} is not a namespace name")
        if self.name and not _VM_NAME.match(self.name):
            raise ValueError(f"{self.name!r} is not a MicroVM name")

    @property
    def namespace_id(self) -> int:
        return namespace_id(self.namespace)

    def elements(self) -> Elements:
        nsid = self.namespace_id
        return {ADDR_SET: {(self.tap, self.mac, self.ip)}, NS_MAP: {(self.tap, nsid)},
                PORT_NS_SET: {(self.tap, nsid)}}


# ------------------------------------------------------------------------------ rendering (pure)

@dataclass
class _Skeleton:
    """The tables' sets, chains and rules for one configuration."""

    decls: list[str] = field(default_factory=list)
    chains: list[tuple[str, str]] = field(default_factory=list)
    rules: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(family, chain, rule, purpose)"""


def _skeleton(config: PolicyConfig) -> _Skeleton:
    s = _Skeleton()
    taps, br = f'"{config.tap_prefix}*"', f'"{config.bridge}"'
    hook = "{{ type filter hook {} priority {} ; policy accept ; }}"
    s.decls += [
        f"add table bridge {TABLE}",
        f"add set bridge {TABLE} {ADDR_SET} {{ typeof iifname . ether saddr . ip saddr ; }}",
        f"add map bridge {TABLE} {NS_MAP} {{ typeof iifname : meta mark ; }}",
        f"add set bridge {TABLE} {PORT_NS_SET} {{ typeof oifname . meta mark ; }}",
        f"add chain bridge {TABLE} prerouting " + hook.format("prerouting", BRIDGE_PRIORITY),
        f"add chain bridge {TABLE} vm_ingress",
        f"add chain bridge {TABLE} forward " + hook.format("forward", BRIDGE_PRIORITY),
        f"add chain bridge {TABLE} vm_forward",
        f"add table inet {TABLE}",
        f"add set inet {TABLE} {DENIED_SET} {{ type ipv4_addr ; flags interval ; }}",
        f"add chain inet {TABLE} input " + hook.format("input", 0),
        f"add chain inet {TABLE} forward " + hook.format("forward", 0),
    ]
    s.chains = [("bridge", c) for c in ("prerouting", "vm_ingress", "forward", "vm_forward")] + \
               [("inet", c) for c in ("input", "forward")]
    arp = "ether type arp arp htype 1 arp ptype 0x0800 arp hlen 6 arp plen 4"
    s.rules += [
        ("bridge", "prerouting", f"iifname {taps} jump vm_ingress", "frames from VM taps"),
        ("bridge", "vm_ingress", f"{arp} iifname . ether saddr . arp saddr ip @{ADDR_SET} "
                                 f"iifname . arp saddr ether . arp saddr ip @{ADDR_SET} accept",
         "ARP from the VM's own MAC and IPv4"),
        ("bridge", "vm_ingress", f"ether type ip iifname . ether saddr . ip saddr @{ADDR_SET} accept",
         "IPv4 from the VM's own MAC and address"),
        ("bridge", "vm_ingress", "drop", "anything else from a VM"),
    ]
    if config.isolate_namespaces:
        s.rules += [
            ("bridge", "forward", f"iifname {taps} oifname {taps} jump vm_forward", "VM to VM"),
            ("bridge", "vm_forward", f"meta mark set iifname map @{NS_MAP}", "sender's namespace id"),
            ("bridge", "vm_forward", f"oifname . meta mark @{PORT_NS_SET} meta mark set 0 accept",
             "same namespace"),
            ("bridge", "vm_forward", "drop", "another namespace"),
        ]
    s.rules += [
        ("inet", "input", f"iifname {br} ct state established,related accept", "replies to the node"),
        ("inet", "input", f"iifname {br} drop", "VMs reach no node address"),
        ("inet", "forward", f"iifname {br} meta nfproto ipv6 drop", "no IPv6 from VMs"),
        ("inet", "forward", f"iifname {br} oifname != {br} ip daddr @{DENIED_SET} drop", "denied destination"),
        ("inet", "forward", f"iifname {br} oifname != {br} ct original ip daddr @{DENIED_SET} drop",
         "denied destination before DNAT"),
    ]
    return s


def _digest(config: PolicyConfig, s: _Skeleton) -> str:
    text = json.dumps([s.decls, s.chains, s.rules, list(config.denied)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _comment(purpose: str, digest: str) -> str:
    return f"mikrom: {purpose} [{digest}]"


def expected_comments(config: PolicyConfig) -> dict[tuple[str, str], list[str]]:
    """The comment of every rule, in order, by (family, chain): what a current table shows."""
    s = _skeleton(config)
    digest = _digest(config, s)
    out: dict[tuple[str, str], list[str]] = {fc: [] for fc in s.chains}
    for family, chain, _rule, purpose in s.rules:
        out[(family, chain)].append(_comment(purpose, digest))
    return out


def render_tables(config: PolicyConfig) -> str:
    """The `nft -f` script that makes both tables match `config`: declarations (no-ops when they
    exist), then every chain flushed and refilled and the denied set replaced, in one transaction.
    The per-VM sets keep their elements."""
    s = _skeleton(config)
    digest = _digest(config, s)
    lines = list(s.decls)
    lines += [f"flush chain {family} {TABLE} {chain}" for family, chain in s.chains]
    lines.append(f"flush set inet {TABLE} {DENIED_SET}")
    if config.denied:
        lines.append(f"add element inet {TABLE} {DENIED_SET} {{ {', '.join(config.denied)} }}")
    lines += [f'add rule {family} {TABLE} {chain} {rule} comment "{_comment(purpose, digest)}"'
              for family, chain, rule, purpose in s.rules]
    return "\n".join(lines) + "\n"


def _element_text(set_name: str, element: tuple, labels: dict[str, str], with_comment: bool) -> str:
    tap = element[0]
    if set_name == ADDR_SET:
        _, mac, ip = element
        text, comment = f'"{tap}" . {mac} . {ip}', labels.get(tap, "")[:MAX_COMMENT]
    elif set_name == NS_MAP:
        if not with_comment:
            return f'"{tap}"'  # a map element is deleted by its key
        namespace = labels.get(tap, "").split("/", 1)[0]
        return f'"{tap}"' + (f' comment "{namespace}"' if namespace else "") + f" : 0x{element[1]:08x}"
    else:
        text, comment = f'"{tap}" . 0x{element[1]:08x}', ""
    return text + (f' comment "{comment}"' if with_comment and comment else "")


def render_changes(add: Elements, delete: Elements, labels: dict[str, str] | None = None) -> str:
    """The `nft -f` script deleting then adding per-VM elements (one transaction). `labels` maps a
    tap to `namespace/name`, kept as element comments (the namespace one is read back)."""
    labels = labels or {}
    lines = []
    for verb, elements in (("delete", delete), ("add", add)):
        for set_name in VM_SETS:
            items = sorted(elements.get(set_name, ()))
            if items:
                body = ", ".join(_element_text(set_name, e, labels, verb == "add") for e in items)
                lines.append(f"{verb} element bridge {TABLE} {set_name} {{ {body} }}")
    return "\n".join(lines) + ("\n" if lines else "")


# ------------------------------------------------------------------------------ reading (pure)

def _unwrap(item):
    """A set element from `nft -j` output: (value, comment); a concatenation becomes a tuple."""
    comment = ""
    if isinstance(item, dict) and "elem" in item:
        comment = item["elem"].get("comment", "")
        item = item["elem"]["val"]
    if isinstance(item, dict) and "concat" in item:
        item = tuple(item["concat"])
    return item, comment


def _objects(listing: dict | None, kind: str) -> list[dict]:
    return [o[kind] for o in (listing or {}).get("nftables", []) if kind in o]


def parse_elements(listing: dict | None) -> tuple[Elements, dict[str, str]]:
    """The per-VM elements of a `nft -j list table bridge mikrom`, and each tap's namespace (the
    comment of its `vm_ns` element)."""
    elements: Elements = {name: set() for name in VM_SETS}
    namespaces: dict[str, str] = {}
    for obj in _objects(listing, "set") + _objects(listing, "map"):
        name = obj.get("name")
        if name not in elements:
            continue
        for raw in obj.get("elem", []):
            if name == NS_MAP:
                key, comment = _unwrap(raw[0])
                elements[name].add((key, int(raw[1])))
                if comment:
                    namespaces[key] = comment
            else:
                value, _ = _unwrap(raw)
                if name == ADDR_SET:
                    elements[name].add((value[0], value[1].lower(), value[2]))
                else:
                    elements[name].add((value[0], int(value[1])))
    return elements, namespaces


def _denied_in(listing: dict | None) -> list[str] | None:
    for obj in _objects(listing, "set"):
        if obj.get("name") != DENIED_SET:
            continue
        out = []
        for raw in obj.get("elem", []):
            value, _ = _unwrap(raw)
            if isinstance(value, dict) and "prefix" in value:
                out.append(f"{value['prefix']['addr']}/{value['prefix']['len']}")
            elif isinstance(value, dict) and "range" in value:
                first, last = (ipaddress.IPv4Address(a) for a in value["range"])
                out += [str(n) for n in ipaddress.summarize_address_range(first, last)]
            else:
                out.append(f"{value}/32")
        return sorted(str(n) for n in ipaddress.collapse_addresses(ipaddress.IPv4Network(c) for c in out))
    return None


def is_current(config: PolicyConfig, bridge_listing: dict | None, inet_listing: dict | None) -> bool:
    """True when the node's tables hold exactly the rules and denied ranges of `config`."""
    if bridge_listing is None or inet_listing is None:
        return False
    present = {o.get("name") for o in _objects(bridge_listing, "set") + _objects(bridge_listing, "map")}
    if not set(VM_SETS) <= present:
        return False
    seen: dict[tuple[str, str], list[str]] = {}
    for family, listing in (("bridge", bridge_listing), ("inet", inet_listing)):
        for chain in _objects(listing, "chain"):
            seen.setdefault((family, chain["name"]), [])
        for rule in _objects(listing, "rule"):
            seen.setdefault((family, rule["chain"]), []).append(rule.get("comment", ""))
    want = expected_comments(config)
    if any(seen.get(fc) != comments for fc, comments in want.items() if comments or fc in seen):
        return False
    return _denied_in(inet_listing) == sorted(config.denied)


def plan(elements: Elements, namespaces: dict[str, str], entries: Iterable[VMEntry],
         prune: bool) -> tuple[Elements, Elements, list[VMEntry]]:
    """What to add and delete so that the taps of `entries` have exactly their elements (and, with
    `prune`, no other tap has any), and the entries left out because their namespace id is shared
    with another namespace on the node (their taps keep no element, so they drop everything).
    Without `prune`, such an entry raises NetworkPolicyConflict instead."""
    entries = list(entries)
    mine = {e.tap for e in entries}
    staying = set() if prune else {(tap, nsid) for tap, nsid in elements[NS_MAP] if tap not in mine}
    users: dict[int, set[str]] = {}
    for tap, nsid in staying:
        users.setdefault(nsid, set()).add(namespaces.get(tap, ""))
    for entry in entries:
        users.setdefault(entry.namespace_id, set()).add(entry.namespace)
    conflicts = [e for e in entries if len(users[e.namespace_id]) > 1]
    if conflicts and not prune:
        entry = conflicts[0]
        raise NetworkPolicyConflict(
            f"the namespace id of {entry.namespace} (0x{entry.namespace_id:08x}) is taken on this node by "
            "another namespace; the VM is not connected until that namespace's VMs have left the node")
    want: Elements = {name: set() for name in VM_SETS}
    for entry in entries:
        if entry not in conflicts:
            for name, items in entry.elements().items():
                want[name] |= items
    add: Elements = {}
    delete: Elements = {}
    for name in VM_SETS:
        have = {e for e in elements[name] if prune or e[0] in mine}
        add[name] = want[name] - have
        delete[name] = have - want[name]
    return add, delete, conflicts


# ------------------------------------------------------------------------------ applying

def list_table(family: str, netns: str | None = None) -> dict | None:
    """`nft -j list table FAMILY mikrom` parsed, or None when the table does not exist."""
    res = run(["nft", "-j", "list", "table", family, TABLE], netns, check=False)
    if res.returncode != 0:
        if "No such file or directory" in res.stderr:
            return None
        raise NetdevError(f"nft list table {family} {TABLE} failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout or "{}")


def _apply(script: str, netns: str | None) -> None:
    run(["nft", "-f", "-"], netns, stdin=script)


# This process's copy of the per-VM elements of `bridge mikrom`, by network namespace: as it last
# listed them, with every change it made since. Only the node's worker changes them, so a VM's
# entry can be planned from the copy and applied in one `nft -f` (no listing first, which costs a
# second command and a parse of every VM's elements). A copy found wrong (the transaction fails:
# an element to delete is not there, a key holds another value) is dropped and the table is
# listed again; a copy older than KNOWN_TTL_SECONDS is listed again anyway, so a change made by
# hand is seen within that time.
KNOWN_TTL_SECONDS = 60.0
_known: dict[str | None, tuple[float, Elements, dict[str, str]]] = {}
_known_lock = threading.Lock()
"""Held across every change of the per-VM elements made through this module, with its listing."""


def _known_copy(netns: str | None) -> tuple[Elements, dict[str, str]] | None:
    at, elements, namespaces = _known.get(netns, (0.0, None, None))
    if elements is None or time.monotonic() - at > KNOWN_TTL_SECONDS:
        return None
    return {k: set(v) for k, v in elements.items()}, dict(namespaces)


def _remember(netns: str | None, elements: Elements, namespaces: dict[str, str], add: Elements,
              delete: Elements, at: float) -> None:
    """Record the elements as listed at `at`, with `delete` and then `add` applied."""
    elements = {k: set(v) for k, v in elements.items()}
    namespaces = dict(namespaces)
    for name in VM_SETS:
        elements.setdefault(name, set())
        elements[name] -= delete.get(name, set())
        elements[name] |= add.get(name, set())
    for tap, _ in delete.get(NS_MAP, ()):
        namespaces.pop(tap, None)
    _known[netns] = (at, elements, namespaces)


def _added_namespaces(add: Elements, labels: dict[str, str]) -> dict[str, str]:
    return {tap: labels.get(tap, "").split("/", 1)[0] for tap, _ in add.get(NS_MAP, ())}


def forget_known(netns: str | None = None) -> None:
    """Drop this process's copy of the elements (the next change lists the table first)."""
    with _known_lock:
        _known.pop(netns, None)


def ensure_tables(config: PolicyConfig, netns: str | None = None) -> bool:
    """Make both tables match `config` (or, when the policy is disabled, remove them). True if
    anything changed. A node without `nft` cannot isolate its VMs, which is an error."""
    if not shutil.which("nft"):
        if not config.enabled:
            return False
        raise NetdevError("nft (the nftables package) is not installed: VMs cannot be isolated "
                          "(set MIKROM_VM_NETWORK_ISOLATION=false to run them unisolated)")
    listings = {family: list_table(family, netns) for family in FAMILIES}
    if not config.enabled:
        gone = [family for family, listing in listings.items() if listing is not None]
        forget_known(netns)
        for family in gone:
            run(["nft", "delete", "table", family, TABLE], netns)
        return bool(gone)
    if is_current(config, listings["bridge"], listings["inet"]):
        return False
    forget_known(netns)  # a new table has no elements yet
    _apply(render_tables(config), netns)
    return True


def sync(entries: Iterable[VMEntry], netns: str | None = None, prune: bool = False) -> bool:
    """Make the taps of `entries` carry exactly their elements; with `prune`, also remove the
    elements of every other tap (the entries are then all the node's VMs, and one whose namespace
    id collides is left unconnected and logged rather than failing the rest). True if anything
    changed. Needs the tables (ensure_tables)."""
    entries = list(entries)
    with _known_lock:
        return _sync(entries, netns, prune)


def _labels(entries: list[VMEntry]) -> dict[str, str]:
    return {e.tap: f"{e.namespace}/{e.name}" if e.name else e.namespace for e in entries}


def _sync(entries: list[VMEntry], netns: str | None, prune: bool) -> bool:
    _known.pop(netns, None)
    at = time.monotonic()
    listing = list_table("bridge", netns)
    if listing is None:
        raise NetdevError(f"the table bridge {TABLE} is missing: the VM network policy is not set up")
    elements, namespaces = parse_elements(listing)
    add, delete, conflicts = plan(elements, namespaces, entries, prune)
    for entry in conflicts:
        log.warning("VM %s/%s is not connected: %s", entry.namespace, entry.name,
                    "its namespace id is shared with another namespace on this node")
    labels = _labels(entries)
    script = render_changes(add, delete, labels)
    if script:
        _apply(script, netns)
    _remember(netns, elements, {**namespaces, **_added_namespaces(add, labels)}, add, delete, at)
    return bool(script)


def ensure_vm(entry: VMEntry, netns: str | None = None) -> bool:
    """Give one VM its elements (replacing stale ones of its tap); other taps are left alone.

    Planned from this process's copy of the elements when it has a fresh one (one `nft -f`, whose
    transaction fails as a whole if the copy was wrong: then listed and planned again)."""
    with _known_lock:
        known = _known_copy(netns)
        if known is not None:
            at = time.monotonic()
            elements, namespaces = known
            try:
                add, delete, _ = plan(elements, namespaces, [entry], prune=False)
                labels = _labels([entry])
                script = render_changes(add, delete, labels)
                if script:
                    _apply(script, netns)
            except NetworkPolicyConflict:
                pass  # refused only after a look at the table itself, below
            except NetdevError as exc:
                log.info("the policy entry of %s was planned from an outdated copy of the table (%s); "
                         "listing it again", entry.tap, exc)
            else:
                _remember(netns, elements, {**namespaces, **_added_namespaces(add, labels)}, add, delete, at)
                return bool(script)
        return _sync([entry], netns, prune=False)


def remove_vm(tap: str, netns: str | None = None, attempts: int = 3) -> bool:
    """Remove every element of `tap`; fine if there are none or no table. True if any went."""
    if not shutil.which("nft"):
        return False
    for attempt in range(1, attempts + 1):
        with _known_lock:
            _known.pop(netns, None)
            at = time.monotonic()
            listing = list_table("bridge", netns)
            if listing is None:
                return False
            elements, namespaces = parse_elements(listing)
            delete = {name: {e for e in items if e[0] == tap} for name, items in elements.items()}
            script = render_changes({}, delete)
            try:
                if script:
                    _apply(script, netns)
            except NetdevError:
                # another removal of the same tap (an orphan sweep) may have won the race: look again
                if attempt == attempts:
                    raise
                continue
            _remember(netns, elements, namespaces, {}, delete, at)
            return bool(script)
    return False


def vm_taps(netns: str | None = None) -> list[str]:
    """Taps that have elements in the policy (for checks and tests)."""
    elements, _ = parse_elements(list_table("bridge", netns))
    return sorted({e[0] for items in elements.values() for e in items})
