"""The VM network policy's pure parts: settings to denied ranges, the nft scripts it renders, how
it reads `nft -j` listings back, and the element changes it plans."""

from __future__ import annotations

import ipaddress
import re

import pytest
from mikrom.worker import netpolicy as p

from mikrom.settings import Settings

TAP_A, TAP_B, TAP_C = "mk0123456789ab", "mkba9876543210", "mkcccccccccccc"
MAC_A, MAC_B = "02:11:22:33:44:55", "02:11:22:33:44:66"


def entry(tap=TAP_A, mac=MAC_A, ip="10.1.0.2", namespace="team-a", name="web") -> p.VMEntry:
    return p.VMEntry(tap, mac, ip, namespace, name)


def nets(*cidrs):
    return [ipaddress.IPv4Network(c) for c in cidrs]


# ------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("denied, allowed, expected", [
    (["169.254.0.0/16"], [], ["169.254.0.0/16"]),
    (["10.96.0.0/12", "10.100.0.0/16"], [], ["10.96.0.0/12"]),  # contained: merged
    (["10.0.0.0/25", "10.0.0.128/25"], [], ["10.0.0.0/24"]),  # adjacent: merged
    (["10.96.0.0/12"], ["10.96.0.10/32"],
     [str(n) for n in ipaddress.IPv4Network("10.96.0.0/12").address_exclude(ipaddress.IPv4Network("10.96.0.10/32"))]),
    (["169.254.0.0/16"], ["169.254.0.0/15"], []),  # an exception wider than the range removes it
    (["169.254.0.0/16"], ["10.0.0.0/8"], ["169.254.0.0/16"]),  # an unrelated exception changes nothing
    ([], ["10.0.0.0/8"], []),
])
def test_denied_ranges_are_the_denied_minus_the_allowed_without_overlaps(denied, allowed, expected):
    got = p.denied_networks(nets(*denied), nets(*allowed))
    assert sorted(map(str, got)) == sorted(expected)
    for a in got:
        assert not any(a.overlaps(b) for b in got if b is not a)
        assert not any(a.overlaps(h) for h in nets(*allowed))


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("169.254.0.0/16", ["169.254.0.0/16"]),
    ("10.96.0.0/12, 10.244.0.0/16", ["10.96.0.0/12", "10.244.0.0/16"]),
    ("10.96.0.1/12 fd00::/108", ["10.96.0.0/12"]),  # host bits dropped; IPv6 left out (VMs send none)
    ("192.0.2.7", ["192.0.2.7/32"]),
])
def test_cidr_lists_are_comma_or_space_separated_ipv4_networks(text, expected):
    assert [str(n) for n in p.parse_cidrs(text, "MIKROM_X")] == expected


def test_a_bad_cidr_is_an_error_naming_the_setting():
    with pytest.raises(ValueError, match=r"MIKROM_VM_DENIED_CIDRS: 'nope' is not an IP network"):
        p.policy_config(Settings(vm_denied_cidrs="169.254.0.0/16,nope"), "mk")


@pytest.mark.parametrize("settings, denied, isolate, enabled", [
    (Settings(), ["10.244.0.0/16", "10.96.0.0/12", "169.254.0.0/16"], True, True),
    (Settings(cluster_service_cidr="", cluster_pod_cidr=""), ["169.254.0.0/16"], True, True),
    (Settings(vm_denied_cidrs="169.254.0.0/16,198.51.100.0/24", cluster_service_cidr="10.43.0.0/16",
              cluster_pod_cidr="10.42.0.0/16"),
     ["10.42.0.0/15", "169.254.0.0/16", "198.51.100.0/24"], True, True),
    (Settings(vm_allowed_cidrs="10.96.0.0/12,10.244.0.0/16"), ["169.254.0.0/16"], True, True),
    (Settings(vm_cross_namespace_traffic=True), ["10.244.0.0/16", "10.96.0.0/12", "169.254.0.0/16"], False, True),
    (Settings(vm_network_isolation=False), ["10.244.0.0/16", "10.96.0.0/12", "169.254.0.0/16"], True, False),
])
def test_the_policy_follows_the_settings(settings, denied, isolate, enabled):
    cfg = p.policy_config(settings, "mk")
    assert cfg.bridge == settings.bridge and cfg.tap_prefix == "mk"
    assert sorted(cfg.denied) == sorted(denied)
    assert (cfg.isolate_namespaces, cfg.enabled) == (isolate, enabled)


@pytest.mark.parametrize("kw", [
    {"bridge": 'br0" accept'}, {"bridge": ""}, {"bridge": "a-bridge-name-too-long"},
    {"tap_prefix": 'mk"'}, {"tap_prefix": "m*"},
])
def test_names_that_reach_the_nft_script_are_checked(kw):
    with pytest.raises(ValueError):
        p.PolicyConfig(**{"bridge": "mikrombr0", "tap_prefix": "mk", **kw})


# ------------------------------------------------------------------------------ VM entries

def test_namespace_ids_are_stable_nonzero_and_differ_between_namespaces():
    ids = {p.namespace_id(f"team-{i}") for i in range(5000)}
    assert len(ids) == 5000 and 0 not in ids
    assert p.namespace_id("team-a") == p.namespace_id("team-a") == entry().namespace_id
    assert all(0 < i < 2 ** 32 for i in ids)


@pytest.mark.parametrize("kw", [
    {"tap": 'mk" drop'}, {"tap": "mk0123456789abcdef"}, {"mac": "02:11:22:33:44"}, {"mac": "zz:11:22:33:44:55"},
    {"ip": "10.1.0.300"}, {"ip": "fd00::1"}, {"namespace": 'a" comment "x'}, {"namespace": "Team-A"},
    {"namespace": ""}, {"name": 'web" . 1.2.3.4'},
])
def test_a_vm_entry_refuses_what_could_change_the_script(kw):
    with pytest.raises(ValueError):
        entry(**kw)


def test_a_vm_entry_is_its_tap_with_its_own_mac_ip_and_namespace_id():
    e = entry(mac=MAC_A.upper())
    assert e.elements() == {p.ADDR_SET: {(TAP_A, MAC_A, "10.1.0.2")}, p.NS_MAP: {(TAP_A, e.namespace_id)},
                            p.PORT_NS_SET: {(TAP_A, e.namespace_id)}}


# ------------------------------------------------------------------------------ rendering

def rules(script: str) -> list[tuple[str, str, str]]:
    """(family, chain, rule without its comment) of every `add rule` line."""
    out = []
    for line in script.splitlines():
        m = re.fullmatch(r'add rule (\w+) mikrom (\w+) (.*) comment "[^"]*"', line)
        if m:
            out.append(m.groups())
    return out


BASE = p.PolicyConfig(bridge="mikrombr0", tap_prefix="mk", denied=("169.254.0.0/16", "10.96.0.0/12"))


@pytest.mark.parametrize("family, chain, rule", [
    ("bridge", "prerouting", 'iifname "mk*" jump vm_ingress'),
    ("bridge", "vm_ingress", "ether type arp arp htype 1 arp ptype 0x0800 arp hlen 6 arp plen 4 "
                             "iifname . ether saddr . arp saddr ip @vm_addr "
                             "iifname . arp saddr ether . arp saddr ip @vm_addr accept"),
    ("bridge", "vm_ingress", "ether type ip iifname . ether saddr . ip saddr @vm_addr accept"),
    ("bridge", "vm_ingress", "drop"),
    ("bridge", "forward", 'iifname "mk*" oifname "mk*" jump vm_forward'),
    ("bridge", "vm_forward", "meta mark set iifname map @vm_ns"),
    ("bridge", "vm_forward", "oifname . meta mark @vm_port_ns meta mark set 0 accept"),
    ("bridge", "vm_forward", "drop"),
    ("inet", "input", 'iifname "mikrombr0" ct state established,related accept'),
    ("inet", "input", 'iifname "mikrombr0" drop'),
    ("inet", "forward", 'iifname "mikrombr0" meta nfproto ipv6 drop'),
    ("inet", "forward", 'iifname "mikrombr0" oifname != "mikrombr0" ip daddr @vm_denied drop'),
    ("inet", "forward", 'iifname "mikrombr0" oifname != "mikrombr0" ct original ip daddr @vm_denied drop'),
])
def test_the_tables_hold_each_rule_of_the_policy(family, chain, rule):
    assert (family, chain, rule) in rules(p.render_tables(BASE))


def test_rules_come_in_the_order_that_makes_them_work():
    got = rules(p.render_tables(BASE))
    ingress = [r for f, c, r in got if c == "vm_ingress"]
    assert ingress[-1] == "drop" and len(ingress) == 3  # the drop after both accepts
    forward = [r for f, c, r in got if c == "vm_forward"]
    assert forward[0].startswith("meta mark set") and forward[-1] == "drop"
    inet_input = [r for f, c, r in got if (f, c) == ("inet", "input")]
    assert inet_input[0].endswith("established,related accept") and inet_input[-1].endswith("drop")


def test_cross_namespace_traffic_drops_the_vm_to_vm_rules_and_nothing_else():
    relaxed = p.PolicyConfig(bridge="mikrombr0", tap_prefix="mk", denied=BASE.denied, isolate_namespaces=False)
    strict, loose = set(rules(p.render_tables(BASE))), set(rules(p.render_tables(relaxed)))
    assert {c for _, c, _ in strict - loose} == {"forward", "vm_forward"} and loose < strict


def test_the_tables_script_declares_before_it_flushes_and_keeps_the_vm_sets_elements():
    script = p.render_tables(BASE).splitlines()
    first_flush = next(i for i, line in enumerate(script) if line.startswith("flush"))
    assert all(line.startswith("add ") and " rule " not in line for line in script[:first_flush])
    assert [line for line in script if line.startswith(("delete", "flush set bridge", "flush table"))] == []
    assert "flush set inet mikrom vm_denied" in script
    assert "add element inet mikrom vm_denied { 10.96.0.0/12, 169.254.0.0/16 }" in script
    for family, chain in (("bridge", "prerouting"), ("bridge", "forward"), ("inet", "input"), ("inet", "forward")):
        decl = next(line for line in script if line.startswith(f"add chain {family} mikrom {chain} "))
        assert f"hook {chain}" in decl and "policy accept" in decl
    # bridge chains run before br_netfilter (priority 0) hands bridged IPv4 to iptables
    assert "add chain bridge mikrom prerouting { type filter hook prerouting priority -200 ; policy accept ; }" in script


def test_no_denied_ranges_leave_the_set_empty():
    script = p.render_tables(p.PolicyConfig(bridge="br0", tap_prefix="mk"))
    assert "flush set inet mikrom vm_denied" in script and "add element inet" not in script


@pytest.mark.parametrize("change", [
    {"bridge": "other0"}, {"denied": ("169.254.0.0/16",)}, {"isolate_namespaces": False}, {"tap_prefix": "vm"},
])
def test_every_rule_comment_carries_a_digest_that_changes_with_the_configuration(change):
    def digests(cfg):
        return {re.search(r"\[([0-9a-f]{12})\]", c).group(1)
                for comments in p.expected_comments(cfg).values() for c in comments}

    base = digests(BASE)
    assert len(base) == 1 and digests(BASE) == base
    other = p.PolicyConfig(**{"bridge": BASE.bridge, "tap_prefix": BASE.tap_prefix, "denied": BASE.denied,
                              "isolate_namespaces": BASE.isolate_namespaces, **change})
    assert digests(other) != base


def test_vm_changes_delete_before_they_add_and_label_the_elements():
    a = entry()
    add = a.elements()
    delete = {p.ADDR_SET: {(TAP_A, MAC_A, "10.1.0.9")}, p.NS_MAP: {(TAP_A, 7)}, p.PORT_NS_SET: {(TAP_A, 7)}}
    script = p.render_changes(add, delete, {TAP_A: "team-a/web"}).splitlines()
    nsid = f"0x{a.namespace_id:08x}"
    assert script == [
        f'delete element bridge mikrom vm_addr {{ "{TAP_A}" . {MAC_A} . 10.1.0.9 }}',
        f'delete element bridge mikrom vm_ns {{ "{TAP_A}" }}',
        f'delete element bridge mikrom vm_port_ns {{ "{TAP_A}" . 0x00000007 }}',
        f'add element bridge mikrom vm_addr {{ "{TAP_A}" . {MAC_A} . 10.1.0.2 comment "team-a/web" }}',
        f'add element bridge mikrom vm_ns {{ "{TAP_A}" comment "team-a" : {nsid} }}',
        f'add element bridge mikrom vm_port_ns {{ "{TAP_A}" . {nsid} }}',
    ]
    assert p.render_changes({}, {}) == "" and p.render_changes({p.ADDR_SET: set()}, {}) == ""


def test_a_long_label_is_cut_to_what_nftables_keeps():
    script = p.render_changes(entry().elements(), {}, {TAP_A: "team-a/" + "x" * 250})
    comment = re.search(r'vm_addr \{ .* comment "([^"]*)" \}', script).group(1)
    assert len(comment) == p.MAX_COMMENT


# ------------------------------------------------------------------------------ reading listings

# what `nft -j list table bridge mikrom` printed (nftables 1.0.6) for two VMs, one without a name
BRIDGE_LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "bridge", "name": "mikrom", "handle": 4}},
    {"set": {"family": "bridge", "name": "vm_addr", "table": "mikrom", "type": ["ifname", "ether_addr", "ipv4_addr"],
             "handle": 1, "elem": [
                 {"elem": {"val": {"concat": [TAP_A, MAC_A, "10.1.0.2"]}, "comment": "team-a/web"}},
                 {"concat": [TAP_B, MAC_B.upper(), "10.1.0.3"]}]}},
    {"map": {"family": "bridge", "name": "vm_ns", "table": "mikrom", "type": "ifname", "handle": 2, "map": "mark",
             "elem": [[{"elem": {"val": TAP_B, "comment": "team-b"}}, 1307696007],
                      [TAP_A, 1645906376]]}},
    {"set": {"family": "bridge", "name": "vm_port_ns", "table": "mikrom", "type": ["ifname", "mark"], "handle": 3,
             "elem": [{"concat": [TAP_B, 1307696007]}, {"concat": [TAP_A, 1645906376]}]}},
]}


def test_elements_are_read_back_from_the_json_listing_whatever_their_wrapping():
    elements, namespaces = p.parse_elements(BRIDGE_LISTING)
    assert elements == {
        p.ADDR_SET: {(TAP_A, MAC_A, "10.1.0.2"), (TAP_B, MAC_B, "10.1.0.3")},
        p.NS_MAP: {(TAP_B, 1307696007), (TAP_A, 1645906376)},
        p.PORT_NS_SET: {(TAP_B, 1307696007), (TAP_A, 1645906376)},
    }
    assert namespaces == {TAP_B: "team-b"}
    assert p.parse_elements(None) == ({name: set() for name in p.VM_SETS}, {})


def listing_for(cfg: p.PolicyConfig, family: str, denied_elems=None, drop_rule: int | None = None) -> dict:
    """A listing shaped like `nft -j list table FAMILY mikrom` of tables made from `cfg`."""
    objs = [{"table": {"family": family, "name": "mikrom"}}]
    if family == "bridge":
        objs += [{"set": {"name": p.ADDR_SET}}, {"map": {"name": p.NS_MAP}}, {"set": {"name": p.PORT_NS_SET}}]
    else:
        elems = denied_elems if denied_elems is not None else [
            {"prefix": {"addr": str(ipaddress.IPv4Network(c).network_address),
                        "len": ipaddress.IPv4Network(c).prefixlen}} for c in cfg.denied]
        objs.append({"set": {"name": p.DENIED_SET, "type": "ipv4_addr", "flags": ["interval"], "elem": elems}})
    n = 0
    for (fam, chain), comments in p.expected_comments(cfg).items():
        if fam != family:
            continue
        objs.append({"chain": {"family": family, "table": "mikrom", "name": chain}})
        for comment in comments:
            if n != drop_rule:
                objs.append({"rule": {"family": family, "chain": chain, "comment": comment, "expr": []}})
            n += 1
    return {"nftables": objs}


def test_tables_made_from_the_configuration_are_current():
    assert p.is_current(BASE, listing_for(BASE, "bridge"), listing_for(BASE, "inet"))


@pytest.mark.parametrize("what", ["no bridge table", "no inet table", "a rule missing", "another configuration",
                                  "denied set differs", "a per-VM set missing"])
def test_tables_that_differ_from_the_configuration_are_not_current(what):
    bridge, inet = listing_for(BASE, "bridge"), listing_for(BASE, "inet")
    if what == "no bridge table":
        bridge = None
    elif what == "no inet table":
        inet = None
    elif what == "a rule missing":
        bridge = listing_for(BASE, "bridge", drop_rule=2)
    elif what == "another configuration":
        other = p.PolicyConfig(bridge="mikrombr0", tap_prefix="mk", denied=BASE.denied, isolate_namespaces=False)
        bridge, inet = listing_for(other, "bridge"), listing_for(other, "inet")
    elif what == "denied set differs":
        inet = listing_for(BASE, "inet", denied_elems=[{"prefix": {"addr": "169.254.0.0", "len": 16}}])
    elif what == "a per-VM set missing":
        bridge["nftables"] = [o for o in bridge["nftables"] if "map" not in o]
    assert not p.is_current(BASE, bridge, inet)


def test_denied_elements_in_any_form_nft_prints_compare_as_networks():
    cfg = p.PolicyConfig(bridge="br0", tap_prefix="mk", denied=("192.0.2.7/32", "10.0.0.0/23", "169.254.0.0/16"))
    inet = listing_for(cfg, "inet", denied_elems=[
        "192.0.2.7", {"range": ["10.0.0.0", "10.0.1.255"]}, {"prefix": {"addr": "169.254.0.0", "len": 16}}])
    assert p.is_current(cfg, listing_for(cfg, "bridge"), inet)


# ------------------------------------------------------------------------------ planning element changes

def current(*entries: p.VMEntry):
    elements = {name: set() for name in p.VM_SETS}
    for e in entries:
        for name, items in e.elements().items():
            elements[name] |= items
    return elements, {e.tap: e.namespace for e in entries}


B = entry(TAP_B, MAC_B, "10.1.0.3", "team-b", "db")


def test_a_new_vm_gets_its_three_elements_and_others_are_untouched():
    add, delete, conflicts = p.plan(*current(B), [entry()], prune=False)
    assert add == entry().elements() and not any(delete.values()) and conflicts == []


def test_planning_a_vm_that_is_in_place_changes_nothing():
    add, delete, _ = p.plan(*current(entry(), B), [entry()], prune=False)
    assert not any(add.values()) and not any(delete.values())


def test_a_vm_with_a_new_address_loses_the_old_one():
    add, delete, _ = p.plan(*current(entry(ip="10.1.0.9"), B), [entry()], prune=False)
    assert add == {p.ADDR_SET: {(TAP_A, MAC_A, "10.1.0.2")}, p.NS_MAP: set(), p.PORT_NS_SET: set()}
    assert delete == {p.ADDR_SET: {(TAP_A, MAC_A, "10.1.0.9")}, p.NS_MAP: set(), p.PORT_NS_SET: set()}


def test_pruning_removes_the_elements_of_every_tap_not_listed():
    gone = entry(TAP_C, "02:00:00:00:00:0c", "10.1.0.4", "team-c")
    add, delete, _ = p.plan(*current(entry(), B, gone), [entry(), B], prune=True)
    assert not any(add.values()) and delete == gone.elements()


def colliding_namespaces() -> tuple[str, str]:
    """Two namespace names with the same 32-bit id (a birthday search: about 80 000 hashes)."""
    seen: dict[int, str] = {}
    i = 0
    while True:
        name = f"ns-{i}"
        nsid = p.namespace_id(name)
        if nsid in seen:
            return seen[nsid], name
        seen[nsid] = name
        i += 1


def test_a_vm_whose_namespace_id_another_namespace_uses_is_refused_never_mixed():
    first, second = colliding_namespaces()
    assert first != second and p.namespace_id(first) == p.namespace_id(second)
    there = entry(TAP_B, MAC_B, "10.1.0.3", first)
    with pytest.raises(p.NetworkPolicyConflict, match=second) as err:
        p.plan(*current(there), [entry(namespace=second)], prune=False)
    assert err.value.reason == "NetworkPolicyConflict"
    # the same namespace is no conflict, and neither is the other once its VMs have left
    p.plan(*current(there), [entry(namespace=first)], prune=False)
    p.plan(*current(), [entry(namespace=second)], prune=False)
    # a whole-node sync leaves both out (their taps drop everything) instead of failing
    add, delete, conflicts = p.plan(*current(there), [there, entry(namespace=second), entry(TAP_C, ip="10.1.0.4")],
                                    prune=True)
    assert {e.namespace for e in conflicts} == {first, second}
    assert {e[0] for items in add.values() for e in items} == {TAP_C}
    assert delete == there.elements()
