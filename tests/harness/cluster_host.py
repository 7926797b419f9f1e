"""What the test cluster makes on the host outside its own files, and removing all of it again.

Before the cluster starts: the node's address and the CNI bridge in its network namespace, and
kubelet's cgroup root in every cgroup hierarchy. When it stops (`teardown`): its processes by PID
(process groups), the containers left in kubelet's cgroup root, containerd's shims (which outlive
containerd) and the sockets they leave, every mount under the state dir, the cgroups, the
namespace (the bridge, the pods' veths and kube-proxy's iptables rules go with it), libcni's cache
entries, and the few host directories that containerd and kubelet use whatever they are told.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from . import cluster_config, netns, procs
from .cluster_config import Layout
from .waits import wait_for

STOP_ORDER = ["forwarder", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kubelet", "containerd",
              "kube-apiserver", "kine"]
"""Clients before servers; containerd after kubelet, and after it the containers it left (see teardown())."""
SHIM_SOCKET_DIR = Path("/run/containerd/s")
"""containerd 1.6 puts every shim's socket here whatever its configured state dir."""
DEVICE_PLUGINS_DIR = Path("/var/lib/kubelet/device-plugins")
"""kubelet's device-plugin socket lives here whatever its --root-dir (a constant in kubelet)."""
HOST_DIRS = [Path("/run/containerd"), SHIM_SOCKET_DIR, Path("/var/lib/kubelet"), DEVICE_PLUGINS_DIR]
"""The only places outside the state dir the cluster writes to (see above): teardown() removes
the ones the cluster's start found missing, once they are empty again."""
CNI_CACHE = Path("/var/lib/cni/results")
"""libcni's result cache (containerd 1.6 does not move it): one file per pod and network."""


class ClusterError(RuntimeError):
    """The cluster could not be started (it has been torn down again) or stopped cleanly."""


def run(*argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    """`argv`, output captured; with `check` a failure is a ClusterError carrying its stderr."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def cgroup_hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup: each v1 controller (and name=systemd)
    and the unified v2 one."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            found.append(Path(_unescape(left.split()[4])))
    return sorted(p for p in found if str(p).startswith("/sys/fs/cgroup"))


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(root: Path) -> list[str]:
    """Mount points below `root`, deepest first (the order to unmount them in)."""
    prefix = str(root).rstrip("/") + "/"
    points = [_unescape(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)


# ---------------------------------------------------------------------------------------- before
def prepare_netns(lay: Layout) -> None:
    """The node's address and the CNI bridge in the cluster's (new, empty) namespace."""
    ns = lay.netns
    # Testbed: kubelet refuses a loopback node address, so the node gets a private /32 on the
    # namespace's own loopback; nothing outside the namespace can reach it.
    run("ip", "-n", ns, "addr", "add", f"{cluster_config.NODE_IP}/32", "dev", "lo")
    # The CNI bridge, made beforehand so the node side can route the service range to it: a
    # process in the node's namespace (the ingress forwarder) then reaches ClusterIPs through
    # kube-proxy's DNAT (a blackhole route would break connect()).
    run("ip", "-n", ns, "link", "add", cluster_config.BRIDGE, "type", "bridge")
    run("ip", "-n", ns, "addr", "add", f"{cluster_config.BRIDGE_IP}/24", "dev", cluster_config.BRIDGE)
    run("ip", "-n", ns, "link", "set", cluster_config.BRIDGE, "up")
    run("ip", "-n", ns, "route", "add", cluster_config.SERVICE_CIDR, "dev", cluster_config.BRIDGE)


def prepare_cgroups(lay: Layout) -> None:
    """kubelet's cgroupRoot in every hierarchy (kubelet expects it to exist); a new cpuset group
    starts with no CPUs and no memory nodes, so it gets its parent's."""
    for h in cgroup_hierarchies():
        group = h / lay.cgroup_root.lstrip("/")
        group.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (h / name).is_file() and h.name == "cpuset":
                (group / name).write_text((h / name).read_text())


# ---------------------------------------------------------------------------------------- after
def teardown(lay: Layout, info: dict, started: list[procs.Proc] = ()) -> None:
    """Stop every process of the cluster `info` (its state file) describes, in STOP_ORDER, then
    remove what it made: containers, shims and their sockets, mounts under the state dir, kubelet's
    cgroup root, the namespace, the CNI cache entries, the host directories it created, the state
    dir. Raises ClusterError naming what could not be removed."""
    state = lay.state
    by_name = {p.name: p for p in started}
    pids = info.get("pids", {})
    problems = []
    for component in STOP_ORDER:
        if component == "containerd":
            _kill_containers(lay)
        if component in by_name:
            by_name[component].stop(timeout=10)
        elif component in pids:
            stop_pid(pids[component], timeout=10)
    problems += _kill_shims(lay)
    for point in mounts_under(state):
        if run("umount", point, check=False).returncode != 0:
            run("umount", "-l", point, check=False)
    problems += _remove_cgroups(lay)
    netns.delete(lay.netns)
    for leftover in CNI_CACHE.glob(f"{lay.cni_network}-*"):
        leftover.unlink(missing_ok=True)
    for d in map(Path, reversed(info.get("host_dirs_created", []))):
        if d == DEVICE_PLUGINS_DIR:
            (d / "kubelet.sock").unlink(missing_ok=True)
            (d / "kubelet_internal_checkpoint").unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:
            pass  # gone already, or someone else's files are in it now
    if mounts_under(state):
        problems.append(f"mounts left under {state}: {mounts_under(state)}")
    else:
        shutil.rmtree(state, ignore_errors=True)
    if problems:
        raise ClusterError("; ".join(problems))


def stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM the process group `pid` leads, SIGKILL it if the leader has not gone in `timeout`
    (for processes this process did not start, so has no Popen for)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            wait_for(lambda: not _alive(pid), timeout, f"pid {pid} to exit", interval=0.1)
            return
        except TimeoutError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _cgroup_dirs(lay: Layout) -> list[Path]:
    """kubelet's cgroup root and everything under it, in every hierarchy, deepest first."""
    dirs = []
    for h in cgroup_hierarchies():
        root = h / lay.cgroup_root.lstrip("/")
        if root.is_dir():
            dirs += [Path(d) for d, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(lay: Layout) -> set[int]:
    found = set()
    for d in _cgroup_dirs(lay):
        try:
            found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return found


def _kill_containers(lay: Layout) -> None:
    """SIGKILL every process in kubelet's cgroup root (the pods' containers) until none is left."""
    def gone() -> bool:
        left = _cgroup_pids(lay)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not left
    try:
        wait_for(gone, 20, "the containers to die", interval=0.2)
    except TimeoutError:
        pass  # _remove_cgroups reports what is left


def _shims(lay: Layout) -> dict[int, list[str]]:
    """containerd shims serving this cluster's containerd: pid -> argv."""
    found = {}
    sock = str(lay.containerd_socket)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and "containerd-shim" in argv[0] and sock in argv:
            found[int(entry.name)] = argv
    return found


def _kill_shims(lay: Layout) -> list[str]:
    for pid, argv in _shims(lay).items():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        opts = dict(zip(argv[1::2], argv[2::2]))
        if "-id" in opts and "-namespace" in opts:
            # the socket a killed shim leaves behind: sha256 of <containerd address>/<namespace>/<id>
            digest = hashlib.sha256(os.path.join(str(lay.containerd_socket), opts["-namespace"], opts["-id"]).encode())
            (SHIM_SOCKET_DIR / digest.hexdigest()).unlink(missing_ok=True)
            # a pod's shim is named by its sandbox: the loopback network's cached result for it
            (CNI_CACHE / f"cni-loopback-{opts['-id']}-lo").unlink(missing_ok=True)
    try:
        wait_for(lambda: not _shims(lay), 10, "containerd's shims to exit", interval=0.1)
    except TimeoutError as exc:
        return [str(exc)]
    return []


def _remove_cgroups(lay: Layout) -> list[str]:
    problems = []
    for d in _cgroup_dirs(lay):
        try:
            d.rmdir()
        except OSError as err:
            problems.append(f"cannot remove cgroup {d}: {err}")
    return problems


def cluster_pids(lay: Layout, pids: dict) -> set[int]:
    """The components and their descendants, the shims and theirs, and every process in kubelet's
    cgroup root."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [*pids.values(), *_shims(lay)]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen | _cgroup_pids(lay)
