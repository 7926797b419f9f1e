"""A real one-node Kubernetes cluster for the tests: kine, kube-apiserver, kube-controller-manager,
kube-scheduler, containerd, kubelet (one node, labelled `mikrom.io/kvm=true`), kube-proxy
(iptables), CoreDNS and Traefik, all inside a network namespace of its own with no route out.

    python hack/cluster.py up|down [--state DIR]       (make cluster / make cluster-down)

The host reaches the cluster only through `cluster_forward.py`, a forwarder listening on the
host's 127.0.0.1 (one port for kube-apiserver, one for the ingress controller) that makes its
upstream connections from inside the namespace. kube-apiserver itself listens on the node address
inside the namespace, where the pods reach it as the `kubernetes` Service.

Every process is started by PID in a process group of its own and recorded in `STATE/state.json`
(with the namespace, the cgroup root and the forwarded ports), so `down()` stops a cluster whether
this process started it or another one did. Everything the cluster writes lives under STATE;
`down()` also unmounts what containerd and kubelet mounted there, kills what runs in kubelet's
cgroup root and removes it, and deletes the namespace (the CNI bridge, the pods' veths and
kube-proxy's iptables rules vanish with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import binaries, cluster_addons, cluster_config, cluster_images, controlplane, netns, procs
from .cluster_config import Layout
from .cluster_forward import enter_netns
from .waits import wait_for

STATE_FILE = "state.json"
FORWARDER = Path(__file__).with_name("cluster_forward.py")
STOP_ORDER = ["forwarder", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kubelet", "containerd",
              "kube-apiserver", "kine"]
"""Clients before servers; containerd after kubelet, and after it the containers it left (see down())."""
BINARIES = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kine",
            "coredns", "traefik"]
SHIM_SOCKET_DIR = Path("/run/containerd/s")
"""containerd 1.6 puts every shim's socket here whatever its configured state dir."""
DEVICE_PLUGINS_DIR = Path("/var/lib/kubelet/device-plugins")
"""kubelet's device-plugin socket lives here whatever its --root-dir (a constant in kubelet)."""
HOST_DIRS = [Path("/run/containerd"), SHIM_SOCKET_DIR, Path("/var/lib/kubelet"), DEVICE_PLUGINS_DIR]
"""The only places outside the state dir the cluster writes to (see above): down() removes the
ones up() found missing, once they are empty again."""
CNI_CACHE = Path("/var/lib/cni/results")
"""libcni's result cache (containerd 1.6 does not move it): one file per pod and network."""


class ClusterError(RuntimeError):
    """The cluster could not be started (it has been torn down again) or stopped cleanly."""


@dataclass
class Cluster(controlplane.ControlPlane):
    """A running cluster: `kubectl()` and `kubeconfig` as for the control plane, plus the node's
    namespace, the host-side ports and the PIDs of every component."""

    layout: Layout = None
    pids: dict = field(default_factory=dict)
    ports: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['ingress']}"

    def stop(self) -> None:
        down(self.layout.state, started=self.processes)

    def netns_run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """`argv` inside the cluster's namespace (the node's network), output captured."""
        return subprocess.run(nsenter(self.layout) + list(argv), capture_output=True, text=True, timeout=timeout)

    def all_pids(self) -> set[int]:
        """Every process the cluster runs: its components and their children, containerd's shims
        and every container process (whatever namespaces they are in)."""
        return cluster_pids(self.layout, self.pids)

    @classmethod
    def load(cls, state: Path) -> "Cluster":
        """The cluster recorded in `state` (started by another process, e.g. `make cluster`)."""
        info = _read_state(state)
        lay = _layout(state, info)
        server = f"https://127.0.0.1:{info['ports']['apiserver']}"
        return cls(workdir=state, kubeconfig=lay.kubeconfig, server=server, processes=[], layout=lay,
                   pids=info["pids"], ports=info["ports"], images=info.get("images", {}))


# ---------------------------------------------------------------------------------------- helpers
def nsenter(lay: Layout) -> list[str]:
    # not `ip netns exec`: that also remounts /sys, which hides the cgroup mounts from kubelet and runc
    return ["nsenter", f"--net={lay.netns_path}", "--"]


def _run(*argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _ns_accepts(lay: Layout, host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port inside the cluster's namespace. The
    socket is made by a short-lived thread that entered the namespace (a socket keeps the
    namespace it was made in; the thread's switch dies with it)."""
    made: list[socket.socket] = []
    t = threading.Thread(target=lambda: (enter_netns(str(lay.netns_path)), made.append(socket.socket())))
    t.start()
    t.join()
    if not made:
        return False
    with made[0] as s:
        s.settimeout(1.0)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False


def _read_state(state: Path) -> dict:
    try:
        return json.loads((state / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(lay: Layout, **info) -> None:
    data = {**_read_state(lay.state), "cluster_id": lay.cluster_id, "netns": lay.netns,
            "cgroup_root": lay.cgroup_root, "pause_image": lay.pause_image, "kubeconfig": str(lay.kubeconfig),
            "logs": str(lay.log_dir), **info}
    tmp = lay.state / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(lay.state / STATE_FILE)


def _layout(state: Path, info: dict) -> Layout:
    return Layout(cluster_id=info["cluster_id"], state=state, pause_image=info.get("pause_image", ""),
                  logs=Path(info["logs"]) if info.get("logs") else None)


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


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    points = [_unescape(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)


# ---------------------------------------------------------------------------------------- files
def _write_files(lay: Layout, ports: dict) -> None:
    pki = lay.pki
    controlplane.make_pki(pki)
    for name, subject, sans, serving in cluster_config.certificates():
        controlplane.issue_cert(pki, name, subject, sans, server=serving)
    inside = f"https://{cluster_config.NODE_IP}:{cluster_config.APISERVER_PORT}"
    (lay.state / "kubeconfigs").mkdir(parents=True)
    for component, cert in cluster_config.COMPONENT_CERTS.items():
        controlplane.write_kubeconfig(lay.component_kubeconfig(component), inside, pki / f"{cert}.crt",
                                      pki / f"{cert}.key", ca=pki / "ca.crt", user=component)
    controlplane.write_kubeconfig(lay.kubeconfig, f"https://127.0.0.1:{ports['apiserver']}", pki / "admin.crt",
                                  pki / "admin.key", ca=pki / "ca.crt")
    for d in (lay.containerd_dir, lay.cni_conf_dir, lay.kubelet_dir / "root", lay.state / "kube-proxy",
              lay.state / "kine", lay.state / "apiserver"):
        d.mkdir(parents=True, exist_ok=True)
    lay.containerd_config.write_text(cluster_config.containerd_config(lay))
    (lay.cni_conf_dir / "10-mikrom.conflist").write_text(json.dumps(cluster_config.cni_conflist(lay), indent=2))
    (lay.kubelet_dir / "config.yaml").write_text(cluster_config.to_json(cluster_config.kubelet_config(lay)))
    (lay.state / "kube-proxy" / "config.yaml").write_text(cluster_config.to_json(cluster_config.kube_proxy_config(lay)))


def _prepare_netns(lay: Layout) -> None:
    ns = lay.netns
    # Testbed: kubelet refuses a loopback node address, so the node gets a private /32 on the
    # namespace's own loopback; nothing outside the namespace can reach it.
    _run("ip", "-n", ns, "addr", "add", f"{cluster_config.NODE_IP}/32", "dev", "lo")
    # The CNI bridge, made beforehand so the node side can route the service range to it: a
    # process in the node's namespace (the ingress forwarder) then reaches ClusterIPs through
    # kube-proxy's DNAT (a blackhole route would break connect()).
    _run("ip", "-n", ns, "link", "add", cluster_config.BRIDGE, "type", "bridge")
    _run("ip", "-n", ns, "addr", "add", f"{cluster_config.BRIDGE_IP}/24", "dev", cluster_config.BRIDGE)
    _run("ip", "-n", ns, "link", "set", cluster_config.BRIDGE, "up")
    _run("ip", "-n", ns, "route", "add", cluster_config.SERVICE_CIDR, "dev", cluster_config.BRIDGE)


def _prepare_cgroups(lay: Layout) -> None:
    """kubelet's cgroupRoot in every hierarchy (kubelet expects it to exist); a new cpuset group
    starts with no CPUs and no memory nodes, so it gets its parent's."""
    for h in cgroup_hierarchies():
        group = h / lay.cgroup_root.lstrip("/")
        group.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (h / name).is_file() and h.name == "cpuset":
                (group / name).write_text((h / name).read_text())


# ---------------------------------------------------------------------------------------- up
def up(state: Path, logs: Path | None = None, timeout: float = 180) -> Cluster:
    """Start a cluster whose files live in `state` (which must not hold one already) and wait until
    its node is Ready, CoreDNS and Traefik are available and the ingress answers on the host."""
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (network namespaces, containerd, kubelet)")
    state = Path(state)
    if (state / STATE_FILE).exists():
        raise ClusterError(f"{state} already holds a cluster: stop it first (down / make cluster-down)")
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def mark(phase: str) -> None:
        timings[phase] = round(time.monotonic() - t0, 1)

    project, image_cache = cluster_images.project_images()
    bins = {name: binaries.require(name) for name in BINARIES}
    bins["containerd"] = shutil.which("containerd") or "/usr/bin/containerd"
    addons = cluster_images.addon_images(bins, image_cache)
    mark("images built")
    state.mkdir(parents=True, exist_ok=True)
    name = netns.create(prefix="mkcl-")
    lay = Layout(cluster_id=name[len("mkcl-"):], state=state, pause_image=project["pause"]["ref"], logs=logs,
                 bins=bins)
    images = {**project, **addons}
    _write_state(lay, pids={}, ports={}, images=images,
                 host_dirs_created=[str(d) for d in HOST_DIRS if not d.exists()])
    started: list[procs.Proc] = []
    pids: dict[str, int] = {}

    def start(component: str, argv: list[str], in_netns: bool = True) -> procs.Proc:
        p = procs.start(component, (nsenter(lay) if in_netns else []) + argv, lay.log_dir)
        started.append(p)
        pids[component] = p.pid
        _write_state(lay, pids=pids)
        return p

    try:
        _prepare_netns(lay)
        _prepare_cgroups(lay)
        ports_file = state / "ports.json"
        fwd = start("forwarder", [sys.executable, str(FORWARDER), "--netns", str(lay.netns_path),
                                  "--ports-file", str(ports_file),
                                  f"apiserver={cluster_config.NODE_IP}:{cluster_config.APISERVER_PORT}",
                                  f"ingress={cluster_config.INGRESS_SERVICE_IP}:80"], in_netns=False)
        ports = wait_for(lambda: _read_json(ports_file), 30, "the forwarder's ports",
                         abort=lambda: None if fwd.alive() else fwd.tail())
        _write_state(lay, ports=ports)
        _write_files(lay, ports)
        mark("files written")

        kine = start("kine", cluster_config.kine_argv(lay))
        containerd = start("containerd", cluster_config.containerd_argv(lay))
        with ThreadPoolExecutor(max_workers=2) as pool:
            # Images load while kube-apiserver starts. kubelet starts once the node's own (the
            # sandbox's and the add-ons') are in, as `imagePullPolicy: Never` fails a pod at once
            # (and backs off) if its image is missing; the tests' images load meanwhile and are in
            # before up() returns.
            node_images = {k: v for k, v in images.items() if k in ("pause", *addons)}
            first = pool.submit(_load_images, lay, containerd, node_images, image_cache)
            rest = pool.submit(_load_images, lay, containerd,
                               {k: v for k, v in images.items() if k not in node_images}, image_cache)
            wait_for(lambda: _ns_accepts(lay, "127.0.0.1", cluster_config.KINE_PORT), 30, "kine",
                     abort=lambda: None if kine.alive() else kine.tail())
            apiserver = start("kube-apiserver", cluster_config.apiserver_argv(lay))
            cluster = Cluster(workdir=state, kubeconfig=lay.kubeconfig, server=f"https://127.0.0.1:{ports['apiserver']}",
                              processes=started, layout=lay, pids=pids, ports=ports, images=images)
            controlplane.wait_ready(cluster, apiserver, timeout=120)
            mark("kube-apiserver ready")
            start("kube-controller-manager", cluster_config.controller_manager_argv(lay))
            start("kube-scheduler", cluster_config.scheduler_argv(lay))
            start("kube-proxy", cluster_config.kube_proxy_argv(lay))
            cluster.kubectl("apply", "-f", "-", input=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": cluster_addons.manifests(addons)}))
            first.result()
            mark("node images loaded")
            kubelet = start("kubelet", cluster_config.kubelet_argv(lay))
            _wait_running(cluster, kubelet, timeout, mark)
            rest.result()
            mark("all images loaded")
        _write_state(lay, timings=timings)
        return cluster
    except Exception as exc:
        # the logs go with the state dir (unless they live elsewhere): say what they said first
        tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(30)}" for p in started)
        down(state, started=started)
        raise ClusterError(f"the cluster did not start: {exc}\n{tails}") from exc
    except BaseException:
        down(state, started=started)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_images(lay: Layout, containerd: procs.Proc, images: dict, cache: Path) -> None:
    def ready() -> bool:
        return lay.containerd_socket.exists() and _run("ctr", "--address", str(lay.containerd_socket), "version",
                                                       check=False, timeout=10).returncode == 0
    wait_for(ready, 30, "containerd", abort=lambda: None if containerd.alive() else containerd.tail())
    cluster_images.import_all(lay.containerd_socket, images, cache)


def _wait_running(cluster: Cluster, kubelet: procs.Proc, timeout: float, mark) -> None:
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    def died() -> str | None:
        for p in cluster.processes:
            if not p.alive():
                return f"{p.name} exited ({p.popen.returncode}):\n{p.tail()}"
        return None

    node = cluster_config.NODE_NAME
    wait_for(lambda: cluster.kubectl("get", "node", node, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                                     check=False).stdout == "True", left(), f"node {node} Ready", interval=0.5, abort=died)
    mark("node Ready")
    wait_for(lambda: cluster.kubectl("-n", cluster_addons.NAMESPACE, "wait", "--for=condition=Available",
                                     "deployment/coredns", "deployment/traefik", "--timeout=5s",
                                     check=False, timeout=30).returncode == 0,
             left(), "CoreDNS and Traefik available", interval=0.5, abort=died)
    mark("add-ons available")
    # Traefik answers 404 for a host no Ingress names: the forwarder, the service route, kube-proxy's
    # DNAT and the pod network all work
    wait_for(lambda: http_status(cluster.ingress_url + "/", host="no-such-host.invalid") == 404, left(),
             "the ingress controller to answer through the host's loopback", interval=0.5, abort=died)
    mark("ingress answers")


def http_status(url: str, host: str | None = None, timeout: float = 5) -> int | None:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


# ---------------------------------------------------------------------------------------- down
def down(state: Path, started: list[procs.Proc] = ()) -> None:
    """Stop the cluster recorded in `state` and remove everything it made; safe to run twice and on a
    half-started cluster. `started`: the Proc objects, when this process started it (so it reaps them)."""
    state = Path(state)
    info = _read_state(state)
    if not info:
        if state.exists() and not _mounts_under(state):
            shutil.rmtree(state, ignore_errors=True)
        return
    lay = _layout(state, info)
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
    for point in _mounts_under(state):
        if _run("umount", point, check=False).returncode != 0:
            _run("umount", "-l", point, check=False)
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
    if _mounts_under(state):
        problems.append(f"mounts left under {state}: {_mounts_under(state)}")
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
