"""The VM network policy with every real part: API server, Redis, the operator, `mikrom worker` as
root and QEMU guests (TCG) that run the test's commands (the test image's `mikrom.test_shell`).

Network safety: the worker's bridge, taps, NAT, policy tables and VMMs live in a network namespace
the test creates; the "outside world" is one more namespace the test creates and joins to it by a
veth pair, with no route anywhere else. Every packet here stays inside those namespaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from harness import operator_proc
from harness.guest_shell import KERNEL_ARGS, guest_sh, snmp_counter, status_codes
from harness.waits import wait_for
from harness.worker_proc import BROKER_DB, VMs, create_pool, e2e_skip_reason, link_exists, netns_run
from kubernetes import client

from mikrom.settings import Settings
from mikrom.worker import netdev, netpolicy

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")


BOOT_TIMEOUT = 240
"""Seconds a guest may take to boot: generous, as TCG on a busy machine is slow."""
SHELL_IMAGE = {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}, "kernelArgs": KERNEL_ARGS}


def nft_listing(netns: str) -> dict:
    """Both policy tables as `nft -j list table` prints them (handles included)."""
    return {family: netpolicy.list_table(family, netns) for family in netpolicy.FAMILIES}


def reaches(netns: str, src_ip: str, dst_ip: str, count: int = 2) -> bool:
    """Whether a ping from the guest at `src_ip` to `dst_ip` gets an answer."""
    out = guest_sh(netns, src_ip, f"ping -c {count} -W 2 {dst_ip} >/dev/null 2>&1; echo ping=$?")
    codes = status_codes(out)
    assert "ping" in codes, f"no answer from the guest shell at {src_ip}: {out!r}"
    return codes["ping"] == 0


def tcp_banner(netns: str, src_ip: str, dst: str, port: int) -> str:
    """What a TCP server at dst:port says to the guest at `src_ip` ('' when nothing answers)."""
    out = guest_sh(netns, src_ip, f"nc -w 3 {dst} {port} </dev/null 2>/dev/null; echo nc-done=$?")
    assert "nc-done=" in out, f"no answer from the guest shell at {src_ip}: {out!r}"
    return out.split("nc-done=")[0].strip()


# ------------------------------------------------------------------------------ two namespaces

@pytest.fixture
def tenants(control_plane, kube_api, redis, mikrom_operator_cluster, namespace, artifacts_dir, make_worker):
    """The real operator watching every namespace, an IPPool of the test's own, and a MicroVM
    client for each of two fresh namespaces. Every MicroVM is deleted through the normal flow at
    the end (the test's workers, set up first, are still there to confirm)."""
    import random

    core = client.CoreV1Api(kube_api)
    other = "t-" + uuid.uuid4().hex[:8]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    pool = "iso-" + uuid.uuid4().hex[:6]
    create_pool(kube_api, pool, f"10.{random.randint(120, 230)}.{random.randint(0, 255) & 0xF0}.0/20", 26)
    op = operator_proc.start(control_plane, redis.url(db=BROKER_DB), artifacts_dir / "operator",
                             f"operator-{namespace}", mikrom_operator_cluster, namespace="", standalone=True,
                             env={"MIKROM_DELETE_WAIT_SECONDS": "30"})
    op.wait_live()
    pair = (VMs(kube_api, namespace, pool), VMs(kube_api, other, pool))
    yield pair
    try:
        for vms in pair:
            vms.remove_all()
    finally:
        op.stop()
        for call in (lambda: client.CustomObjectsApi(kube_api).delete_cluster_custom_object(
                         "mikrom.io", "v1alpha1", "ippools", pool, _request_timeout=(5, 30)),
                     lambda: core.delete_namespace(other, _request_timeout=10)):
            try:
                call()
            except client.ApiException:
                pass


def test_vms_reach_only_vms_of_their_own_namespace_and_cannot_send_as_anyone_else(
        tenants, make_worker, netns, guest_image_dir):
    # three 1-vCPU VMs on a 2-CPU machine: offer more vCPUs than there are (the guests are mostly idle)
    worker = make_worker(netns=netns, image_dir=guest_image_dir, boot_timeout_seconds=BOOT_TIMEOUT, capacity_vcpus=4)
    team_a, team_b = tenants
    for vms in tenants:
        vms.node = worker.node
    st = {}
    for vms, name in ((team_a, "a1"), (team_a, "a2"), (team_b, "b1")):  # one at a time: TCG boots are CPU-bound
        vms.create(name, image=SHELL_IMAGE)
        st[name] = vms.wait_phase(name, "Running", timeout=BOOT_TIMEOUT + 60, avoid=("Failed",))
    ip = {name: s["ipAddress"] for name, s in st.items()}
    mac = {name: s["macAddress"] for name, s in st.items()}

    # (a) on one bridge, the same namespace reaches itself and the other namespace nothing
    assert reaches(netns, ip["a1"], ip["a2"]) and reaches(netns, ip["a2"], ip["a1"])
    assert not reaches(netns, ip["a1"], ip["b1"])
    assert not reaches(netns, ip["b1"], ip["a1"]) and not reaches(netns, ip["b1"], ip["a2"])

    # (c) what a2's IP stack receives from a1: its own address gets through, anything else not
    def echoes() -> int:
        return snmp_counter(netns, ip["a2"], "Icmp", "InEchos")

    before = echoes()
    assert reaches(netns, ip["a1"], ip["a2"], count=2)
    assert echoes() == before + 2, "the unspoofed pings must arrive (the counter works)"
    spoofed_ip = ipaddr_unused(ip)
    out = guest_sh(netns, ip["a1"], f"ip addr add {spoofed_ip}/32 dev eth0; echo add=$?; "
                                    f"ping -c 3 -W 2 -I {spoofed_ip} {ip['a2']} >/dev/null 2>&1; "
                                    f"ip addr del {spoofed_ip}/32 dev eth0; echo del=$?")
    assert status_codes(out) == {"add": 0, "del": 0}, out
    assert echoes() == before + 2, "pings from an address that is not a1's own must not arrive"
    # the shell's own connection breaks while the MAC is wrong; its output arrives once it is restored
    out = guest_sh(netns, ip["a1"], f"ip link set eth0 address 02:de:ad:be:ef:01; echo set=$?; "
                                    f"ping -c 3 -W 2 {ip['a2']} >/dev/null 2>&1; "
                                    f"ip link set eth0 address {mac['a1']}; echo restored=$?", timeout=90)
    assert status_codes(out) == {"set": 0, "restored": 0}, out
    assert echoes() == before + 2, "frames from a MAC that is not a1's own must not arrive"
    assert reaches(netns, ip["a1"], ip["a2"], count=1), "a1 is back with its own addresses"
    # ARP claiming a2's address (a gratuitous reply to the gateway) does not poison the node
    gateway = guest_sh(netns, ip["a1"], "ip route show default").split()[2]
    assert netns_run(netns, "busybox", "ping", "-c", "1", "-W", "3", ip["a2"]).returncode == 0
    out = guest_sh(netns, ip["a1"], f"ip addr add {ip['a2']}/32 dev eth0; "
                                    f"arping -U -c 3 -s {ip['a2']} -I eth0 {gateway} >/dev/null 2>&1; echo arping=$?; "
                                    f"ip addr del {ip['a2']}/32 dev eth0")
    assert status_codes(out).get("arping") == 0, out
    neigh = netns_run(netns, "ip", "neigh", "show", ip["a2"]).stdout
    assert mac["a2"] in neigh and mac["a1"] not in neigh, neigh
    # no IPv6 at all: an all-nodes ping reaches no other guest
    before6 = snmp6_counter(netns, ip["a2"], "Icmp6InEchos")
    guest_sh(netns, ip["a1"], "ping6 -c 3 -W 2 -I eth0 ff02::1 >/dev/null 2>&1; echo ping6=$?")
    assert snmp6_counter(netns, ip["a2"], "Icmp6InEchos") == before6

    # (d) a restart applies the policy again and changes nothing; a delete leaves nothing behind
    listing = nft_listing(netns)
    uid_a1, uid_b1 = team_a.uid("a1"), team_b.uid("b1")
    team_a.patch("a1", {"metadata": {"annotations": {"mikrom.io/restartedAt": "2030-01-01T00:00:00Z"}}})
    wait_for(lambda: (s := team_a.status("a1")).get("phase") == "Running" and s.get("pid") != st["a1"]["pid"]
             and s.get("restartedAt") == "2030-01-01T00:00:00Z", BOOT_TIMEOUT + 60, "a1 restarted")
    assert nft_listing(netns) == listing, "re-applying the policy must change nothing"
    assert reaches(netns, ip["a1"], ip["a2"], count=1)

    tap_b1 = netdev.tap_name_for_uid(uid_b1)
    assert tap_b1 in json.dumps(listing["bridge"])
    team_b.delete("b1")
    team_b.wait_gone("b1", timeout=90)
    bridge_table = json.dumps(netpolicy.list_table("bridge", netns))
    assert tap_b1 not in bridge_table and mac["b1"] not in bridge_table and f'"{ip["b1"]}"' not in bridge_table
    listed = netns_run(netns, "nft", "list", "table", "bridge", "mikrom").stdout
    assert tap_b1 not in listed and mac["b1"] not in listed
    assert not link_exists(netns, tap_b1)
    assert netpolicy.vm_taps(netns) == sorted(netdev.tap_name_for_uid(u) for u in (uid_a1, team_a.uid("a2")))


def ipaddr_unused(ips: dict[str, str]) -> str:
    """An address of the VMs' block that none of them has (the block's last host)."""
    import ipaddress

    any_ip = ipaddress.IPv4Address(next(iter(ips.values())))
    block = ipaddress.IPv4Network(f"{any_ip}/26", strict=False)
    candidate = str(block.broadcast_address - 1)
    assert candidate not in ips.values()
    return candidate


def snmp6_counter(netns: str, ip: str, name: str) -> int:
    out = guest_sh(netns, ip, "cat /proc/net/snmp6")
    values = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
    assert name in values, f"no {name} from the guest at {ip}: {out!r}"
    return int(values[name])


# ------------------------------------------------------------------------------ the node and the outside

OUTSIDE_NODE_SIDE, OUTSIDE_IP = "192.0.2.1", "192.0.2.2"
METADATA_IP = "169.254.169.254"
DENIED_IP, EXCEPTION_IP = "198.51.100.2", "198.51.100.7"
SERVICE_IP, PUBLIC_IP = "10.96.0.10", "203.0.113.10"  # both DNATed to the outside server, as kube-proxy would
OUTSIDE_PORT, NODE_PORT = 8080, 8081

SERVER = """
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    conn.settimeout(5)
    try:
        conn.sendall((sys.argv[3] + "\\n").encode())
    finally:
        conn.close()
"""


@pytest.fixture
def outside(netns):
    """One more namespace the test makes: 192.0.2.2 on a veth to the worker's namespace, plus a
    link-local metadata address, a denied address and an allowed exception on its loopback, all
    routed through 192.0.2.2 from the worker's namespace, and a TCP server on port 8080 of each.
    Also a TCP server on port 8081 of every address of the worker's namespace (the node), and two
    DNAT rules there standing in for kube-proxy: a Service address and a public address, both to
    the outside server. Yields the outside namespace's name."""
    name = "mkt-" + uuid.uuid4().hex[:8]
    servers = []

    def ip(*args):
        subprocess.run(["ip", *args], check=True, timeout=10)

    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", "mko0", "netns", netns, "type", "veth", "peer", "name", "mko1", "netns", name)
        ip("-n", netns, "addr", "add", f"{OUTSIDE_NODE_SIDE}/24", "dev", "mko0")
        ip("-n", netns, "link", "set", "mko0", "up")
        ip("-n", name, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "mko1")
        ip("-n", name, "link", "set", "mko1", "up")
        for addr in (METADATA_IP, DENIED_IP, EXCEPTION_IP):
            ip("-n", name, "addr", "add", f"{addr}/32", "dev", "lo")
        for net in ("169.254.0.0/16", "198.51.100.0/24"):
            ip("-n", netns, "route", "add", net, "via", OUTSIDE_IP)
        kubesim = (f"add table ip kubesim\n"
                   f"add chain ip kubesim pre {{ type nat hook prerouting priority -100 ; }}\n"
                   f"add rule ip kubesim pre ip daddr {{ {SERVICE_IP}, {PUBLIC_IP} }} tcp dport 80 "
                   f"dnat to {OUTSIDE_IP}:{OUTSIDE_PORT}\n")
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=kubesim, text=True, check=True,
                       timeout=10)
        for ns, port, banner in ((name, OUTSIDE_PORT, "outside-ok"), (netns, NODE_PORT, "node-ok")):
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, "0.0.0.0", str(port),
                                     banner], stdout=subprocess.PIPE, text=True)
            servers.append(proc)
            assert proc.stdout.readline().strip() == "listening"
        yield name
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", name], timeout=10, capture_output=True)


def test_a_vm_reaches_neither_the_node_nor_denied_ranges_and_leaves_through_the_nat(
        fleet, make_worker, netns, outside, guest_image_dir):
    worker = make_worker(netns=netns, image_dir=guest_image_dir, boot_timeout_seconds=BOOT_TIMEOUT,
                         vm_denied_cidrs=f"169.254.0.0/16,{DENIED_IP.rsplit('.', 1)[0]}.0/24",
                         vm_allowed_cidrs=f"{EXCEPTION_IP}/32")
    fleet.node = worker.node
    fleet.create("probe", image=SHELL_IMAGE)
    vm_ip = fleet.wait_phase("probe", "Running", timeout=BOOT_TIMEOUT + 60, avoid=("Failed",))["ipAddress"]
    gateway = guest_sh(netns, vm_ip, "ip route show default").split()[2]

    # the servers answer where they should: the node's own from the node, the outside one via NAT
    node_side = subprocess.run(["ip", "netns", "exec", netns, "busybox", "nc", "-w", "3", gateway, str(NODE_PORT)],
                               capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert node_side.stdout.strip() == "node-ok", node_side
    assert tcp_banner(netns, vm_ip, OUTSIDE_IP, OUTSIDE_PORT) == "outside-ok"
    assert reaches(netns, vm_ip, OUTSIDE_IP)
    assert tcp_banner(netns, vm_ip, EXCEPTION_IP, OUTSIDE_PORT) == "outside-ok", "vm_allowed_cidrs is an exception"
    assert tcp_banner(netns, vm_ip, PUBLIC_IP, 80) == "outside-ok", "a DNAT to an allowed address works"

    # (b) nothing of the node: not the gateway, not its other addresses, not even a ping
    for addr in (gateway, OUTSIDE_NODE_SIDE):
        assert tcp_banner(netns, vm_ip, addr, NODE_PORT) == "", addr
    assert not reaches(netns, vm_ip, gateway)
    # no metadata service, no denied range, no Service address (denied before kube-proxy's DNAT)
    for addr, port in ((METADATA_IP, OUTSIDE_PORT), (DENIED_IP, OUTSIDE_PORT), (SERVICE_IP, 80)):
        assert tcp_banner(netns, vm_ip, addr, port) == "", addr
    assert not reaches(netns, vm_ip, METADATA_IP)


# ------------------------------------------------------------------------------ the tables themselves

def test_policy_tables_and_entries_are_applied_once_and_removed_with_the_tap(netns):
    bridge = "mkpolbr0"
    config = netpolicy.policy_config(Settings(bridge=bridge), netdev.TAP_PREFIX)
    uid = str(uuid.uuid4())
    tap, mac = netdev.tap_name_for_uid(uid), netdev.mac_for_uid(uid)
    entry = netpolicy.VMEntry(tap, mac, "10.232.0.2", "team-a", "web")
    netdev.ensure_bridge(bridge, "10.232.0.1/24", netns=netns)
    netdev.ensure_tap(tap, bridge, netns=netns, user=4242)

    assert netpolicy.ensure_tables(config, netns) is True
    assert netpolicy.ensure_vm(entry, netns) is True
    first = nft_listing(netns)
    assert netpolicy.ensure_tables(config, netns) is False
    assert netpolicy.ensure_vm(entry, netns) is False
    assert netpolicy.sync([entry], netns, prune=True) is False
    assert nft_listing(netns) == first, "re-applying must change nothing, not even a handle"
    assert netpolicy.vm_taps(netns) == [tap]

    # a tap left by a start under another uid is made again for the new one
    netdev.ensure_tap(tap, bridge, netns=netns, user=4343)
    link = json.loads(netns_run(netns, "ip", "-j", "-d", "link", "show", "dev", tap).stdout)[0]
    assert link["linkinfo"]["info_data"]["user"] == 4343 and link["master"] == bridge

    # a changed setting rewrites the rules but keeps every VM's entry
    relaxed = netpolicy.policy_config(Settings(bridge=bridge, vm_cross_namespace_traffic=True), netdev.TAP_PREFIX)
    assert netpolicy.ensure_tables(relaxed, netns) is True
    assert netpolicy.ensure_tables(relaxed, netns) is False
    assert netpolicy.vm_taps(netns) == [tap]
    assert "vm_forward" not in netns_run(netns, "nft", "list", "chain", "bridge", "mikrom", "forward").stdout

    netdev.delete_tap(tap, netns)
    netdev.delete_tap(tap, netns)
    assert netpolicy.vm_taps(netns) == [] and not link_exists(netns, tap)
    listed = netns_run(netns, "nft", "list", "table", "bridge", "mikrom").stdout
    assert tap not in listed and mac not in listed

    off = netpolicy.policy_config(Settings(bridge=bridge, vm_network_isolation=False), netdev.TAP_PREFIX)
    assert netpolicy.ensure_tables(off, netns) is True
    assert nft_listing(netns) == {"bridge": None, "inet": None}
    assert netpolicy.ensure_tables(off, netns) is False
