"""Nothing the tests start listens on a non-loopback address."""

import ipaddress
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
