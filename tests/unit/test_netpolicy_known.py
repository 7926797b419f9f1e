"""A VM's policy entry planned from the worker's own copy of the table's elements
(worker/netpolicy.py `ensure_vm`): one `nft -f` per entry instead of a listing and a change, and
back to a listing whenever the copy may be wrong. `nft` is replaced by a recorder of its calls that
keeps the elements as the kernel would (the real tables are exercised in
tests/e2e/test_vm_network_isolation.py)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from mikrom.worker import netpolicy as p
from mikrom.worker.hostcmd import NetdevError

TAP_A, TAP_B, TAP_C = "mk0123456789ab", "mkba9876543210", "mkcccccccccccc"


class FakeNft:
    """The per-VM elements of `bridge mikrom`, listed as `nft -j` prints them and changed by the
    element lines of `nft -f` scripts; a script fails as a whole if it deletes an element that is
    not there, as a transaction does."""

    def __init__(self):
        self.elements: p.Elements = {name: set() for name in p.VM_SETS}
        self.namespaces: dict[str, str] = {}
        self.calls: list[str] = []

    def listing(self) -> dict:
        e = self.elements
        return {"nftables": [
            {"set": {"name": p.ADDR_SET, "elem": [{"concat": list(x)} for x in sorted(e[p.ADDR_SET])]}},
            {"map": {"name": p.NS_MAP, "elem": [[{"elem": {"val": tap, "comment": self.namespaces.get(tap, "")}}, n]
                                                for tap, n in sorted(e[p.NS_MAP])]}},
            {"set": {"name": p.PORT_NS_SET, "elem": [{"concat": list(x)} for x in sorted(e[p.PORT_NS_SET])]}},
        ]}

    def run(self, cmd, netns=None, check=True, stdin=None, **_):
        self.calls.append(" ".join(cmd[:3]))
        if cmd[:2] == ["nft", "-j"]:
            return subprocess.CompletedProcess(cmd, 0, json.dumps(self.listing()), "")
        assert cmd == ["nft", "-f", "-"], cmd
        new = {k: set(v) for k, v in self.elements.items()}
        for line in stdin.splitlines():
            verb, _, _, _, name, body = re.match(r"(\w+) element (\w+) (\w+) (\s*)(\w+) \{ (.*) \}$", line).groups()
            for item in body.split(", "):
                element = self._parse(name, item)
                if verb == "delete":
                    match = {x for x in new[name] if x[0] == element[0] and (name == p.NS_MAP or x == element)}
                    if not match:
                        raise NetdevError(f"nft -f - failed (1): Could not process rule: No such file ({item})")
                    new[name] -= match
                else:
                    new[name].add(element)
                    if name == p.NS_MAP:
                        comment = re.search(r'comment "([^"]*)"', item)
                        self.namespaces[element[0]] = comment.group(1) if comment else ""
        self.elements = new
        return subprocess.CompletedProcess(cmd, 0, "", "")

    @staticmethod
    def _parse(name: str, item: str) -> tuple:
        item = re.sub(r' comment "[^"]*"', "", item)
        if name == p.ADDR_SET:
            tap, mac, ip = (x.strip().strip('"') for x in item.split(" . "))
            return tap, mac, ip
        if name == p.NS_MAP:
            tap, _, nsid = item.partition(" : ")
            return tap.strip('"'), int(nsid, 16) if nsid else None
        tap, nsid = (x.strip().strip('"') for x in item.split(" . "))
        return tap, int(nsid, 16)


@pytest.fixture
def nft(monkeypatch):
    fake = FakeNft()
    monkeypatch.setattr(p, "run", fake.run)
    monkeypatch.setattr(p.shutil, "which", lambda name: "/usr/sbin/nft")
    monkeypatch.setattr(p, "_known", {})
    return fake


def entry(tap=TAP_A, ip="10.1.0.2", namespace="team-a", mac="02:11:22:33:44:55") -> p.VMEntry:
    return p.VMEntry(tap, mac, ip, namespace, "web")


def test_after_the_table_was_listed_each_vm_entry_is_one_nft_call_with_exactly_its_elements(nft):
    p.sync([], prune=True)  # the worker's first look at the table
    nft.calls.clear()
    assert p.ensure_vm(entry()) is True
    assert nft.calls == ["nft -f -"]
    assert p.ensure_vm(entry(TAP_B, "10.1.0.3", mac="02:11:22:33:44:66")) is True
    assert nft.calls == ["nft -f -", "nft -f -"]
    assert nft.elements == {name: entry().elements()[name] | entry(TAP_B, "10.1.0.3", mac="02:11:22:33:44:66")
                            .elements()[name] for name in p.VM_SETS}
    assert p.ensure_vm(entry()) is False  # in place already: no call at all
    assert len(nft.calls) == 2


def test_without_a_copy_the_table_is_listed_first(nft):
    assert p.ensure_vm(entry()) is True
    assert nft.calls == ["nft -j list", "nft -f -"]


def test_a_copy_found_wrong_is_dropped_and_the_table_listed_again(nft):
    p.ensure_vm(entry())
    nft.elements = {name: set() for name in p.VM_SETS}  # changed behind the worker's back
    nft.calls.clear()
    assert p.ensure_vm(entry(ip="10.1.0.9")) is True  # the copy says: delete 10.1.0.2, which is gone
    assert nft.calls == ["nft -f -", "nft -j list", "nft -f -"]
    assert nft.elements[p.ADDR_SET] == {(TAP_A, "02:11:22:33:44:55", "10.1.0.9")}


def test_a_stale_address_of_the_tap_is_replaced_from_the_copy(nft):
    p.ensure_vm(entry())
    nft.calls.clear()
    assert p.ensure_vm(entry(ip="10.1.0.7")) is True
    assert nft.calls == ["nft -f -"]
    assert nft.elements[p.ADDR_SET] == {(TAP_A, "02:11:22:33:44:55", "10.1.0.7")}


def test_a_removed_vm_is_gone_from_the_copy_and_its_namespace_id_free_again(nft, monkeypatch):
    p.ensure_vm(entry())
    p.remove_vm(TAP_A)
    assert nft.elements == {name: set() for name in p.VM_SETS}
    monkeypatch.setattr(p, "namespace_id", lambda namespace: 7)  # every namespace collides
    nft.calls.clear()
    assert p.ensure_vm(entry(TAP_B, namespace="team-b", mac="02:11:22:33:44:66")) is True
    assert nft.calls == ["nft -f -"]


def test_a_namespace_id_taken_by_another_namespace_is_refused_from_a_fresh_listing(nft, monkeypatch):
    monkeypatch.setattr(p, "namespace_id", lambda namespace: 7)
    p.ensure_vm(entry())
    nft.calls.clear()
    with pytest.raises(p.NetworkPolicyConflict):
        p.ensure_vm(entry(TAP_B, namespace="team-b", mac="02:11:22:33:44:66"))
    assert nft.calls == ["nft -j list"], "the refusal is checked against the table itself"
    assert {e[0] for e in nft.elements[p.NS_MAP]} == {TAP_A}


def test_a_copy_older_than_its_lifetime_is_not_trusted(nft, monkeypatch):
    p.ensure_vm(entry())
    monkeypatch.setattr(p, "KNOWN_TTL_SECONDS", 0.0)
    nft.calls.clear()
    p.ensure_vm(entry(TAP_B, "10.1.0.3", mac="02:11:22:33:44:66"))
    assert nft.calls == ["nft -j list", "nft -f -"]
