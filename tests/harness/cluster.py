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
kube-proxy's iptables rules vanish with it): see cluster_host.py.
"""

from __future__ import annotations

import json
import os
import shutil
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

from . import binaries, cluster_addons, cluster_config, cluster_host, cluster_images, controlplane, netns, procs
from .cluster_config import Layout
from .cluster_host import ClusterError
from .cluster_forward import enter_netns
from .waits import wait_for

STATE_FILE = "state.json"
FORWARDER = Path(__file__).with_name("cluster_forward.py")
BINARIES = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kine",
            "coredns", "traefik"]


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
        return cluster_host.cluster_pids(self.layout, self.pids)

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
                 host_dirs_created=[str(d) for d in cluster_host.HOST_DIRS if not d.exists()])
    started: list[procs.Proc] = []
    pids: dict[str, int] = {}

    def start(component: str, argv: list[str], in_netns: bool = True) -> procs.Proc:
        p = procs.start(component, (nsenter(lay) if in_netns else []) + argv, lay.log_dir)
        started.append(p)
        pids[component] = p.pid
        _write_state(lay, pids=pids)
        return p

    try:
        cluster_host.prepare_netns(lay)
        cluster_host.prepare_cgroups(lay)
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
        return lay.containerd_socket.exists() and cluster_host.run("ctr", "--address", str(lay.containerd_socket), "version",
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
        if state.exists() and not cluster_host.mounts_under(state):
            shutil.rmtree(state, ignore_errors=True)
        return
    cluster_host.teardown(_layout(state, info), info, started)
