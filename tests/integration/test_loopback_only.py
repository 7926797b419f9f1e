"""Nothing the tests start listens on a non-loopback address, and the test cluster's processes live
in network namespaces that reach nothing beyond themselves."""

import ipaddress
import json
import os
import re
import subprocess

from harness.procs import STARTED


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    out = subprocess.run(["ss", "-Htlnup"], capture_output=True, text=True, timeout=30, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[4]
            host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
            found.append((host, min(owners & pids)))
    return found


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=30).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen


def test_started_servers_listen_only_on_loopback(control_plane, redis):
    pids: set[int] = set()
    for proc in STARTED:
        assert proc.alive(), proc.name
        pids |= _descendants(proc.pid)
    sockets = _listening(pids)
    # kine, kube-apiserver and redis each listen somewhere
    assert len({pid for _, pid in sockets}) >= 3, sockets
    for host, pid in sockets:
        assert host not in ("*", "0.0.0.0", "::"), f"pid {pid} listens on all addresses"
        assert ipaddress.ip_address(host).is_loopback, f"pid {pid} listens on {host}"


# ------------------------------------------------------------------ the test cluster
def _listening_ports(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP/UDP listener in this (the host's) namespace owned by `pids`."""
    out = subprocess.run(["ss", "-Htlnup"], capture_output=True, text=True, timeout=30, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            host, _, port = line.split()[4].rpartition(":")
            found.append((host.strip("[]").split("%")[0], int(port), min(owners & pids)))
    return found


def _netns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None  # gone meanwhile


def _ip_json(pid: int, *args: str) -> list[dict]:
    res = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", *args], capture_output=True, text=True,
                         timeout=30, check=True)
    return json.loads(res.stdout or "[]")


def test_the_cluster_listens_only_on_the_hosts_loopback_and_inside_its_own_namespace(cluster):
    pids = cluster.all_pids()
    # the host's namespace: only the forwarder's listeners (kube-apiserver's and the ingress's), on loopback
    sockets = _listening_ports(pids)
    assert sorted(port for _, port, _ in sockets) == sorted(cluster.ports.values()), sockets
    for host, port, pid in sockets:
        assert ipaddress.ip_address(host).is_loopback, f"pid {pid} listens on {host}:{port}"

    # every process of the cluster runs outside the host's namespace: in the node's or in a pod's
    host_net = os.readlink("/proc/self/ns/net")
    node_net = f"net:[{os.stat(cluster.layout.netns_path).st_ino}]"
    by_ns: dict[str, int] = {}
    for pid in sorted(pids):
        ns = _netns_of(pid)
        if ns:
            by_ns.setdefault(ns, pid)
    assert host_net not in by_ns, f"pid {by_ns.get(host_net)} of the cluster runs in the host's namespace"
    pod_nets = set(by_ns) - {node_net}
    assert node_net in by_ns and pod_nets, by_ns  # at least CoreDNS's and Traefik's pods

    # the node's namespace routes nowhere: loopback, the CNI bridge and veths, no default route
    node_links = _ip_json(by_ns[node_net], "-d", "link")
    kinds = {(link.get("linkinfo") or {}).get("info_kind", link.get("link_type")) for link in node_links}
    assert kinds <= {"loopback", "bridge", "veth"}, node_links
    assert not [r for r in _ip_json(by_ns[node_net], "route") if r.get("dst") == "default"]
    veths = {link["ifindex"]: link for link in node_links if (link.get("linkinfo") or {}).get("info_kind") == "veth"}

    # and each veth's other end is a pod's eth0: no link of the cluster leads to the host
    matched = set()
    for ns in pod_nets:
        links = [link for link in _ip_json(by_ns[ns], "-d", "link") if link["ifname"] != "lo"]
        assert [link["ifname"] for link in links] == ["eth0"], links
        eth0 = links[0]
        peer = veths.get(eth0.get("link_index"))
        assert peer is not None and peer.get("link_index") == eth0["ifindex"], (eth0, veths)
        matched.add(peer["ifindex"])
    assert matched == set(veths), f"veths of the node that are no pod's: {set(veths) - matched}"
