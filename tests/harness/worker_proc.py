"""Run the node worker (`mikrom worker`) as a real subprocess for the tests.

The worker runs as the ServiceAccount `mikrom-worker` (a kubeconfig holding a token from
`kubectl create token`, so deploy/rbac/worker.yaml is what it is allowed to do), against the
session's Redis, with its state directory in a temporary directory. Its bridge, taps, NAT rules and
VMMs live in a network namespace the test creates (`MIKROM_NETNS`), never on the host's interfaces.

`kill()` is `kill -9` of the worker process alone: the VMMs it started run in their own sessions
and survive, as they would on a node. `cleanup()` stops whatever VMM is left under the state
directory, by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from . import procs
from .microvms import MicroVMClient

REPO = Path(__file__).resolve().parents[2]
RBAC = REPO / "deploy" / "rbac" / "worker.yaml"
SA_NAMESPACE = "mikrom"
SA_NAME = "mikrom-worker"


def service_account_kubeconfig(cp, path: Path, namespace: str = SA_NAMESPACE, name: str = SA_NAME,
                               duration: str = "4h") -> Path:
    """Apply the worker's RBAC and write a kubeconfig that authenticates as its ServiceAccount."""
    if cp.kubectl("get", "namespace", namespace, check=False).returncode != 0:
        cp.kubectl("create", "namespace", namespace, check=False)
    cp.kubectl("apply", "-f", str(RBAC))
    token = cp.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
    admin = yaml.safe_load(cp.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "mikrom-test", "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "worker", "context": {"cluster": "mikrom-test", "user": name}}],
        "current-context": "worker",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def install_crds(cp) -> None:
    cp.kubectl("apply", "-f", str(REPO / "crds"))
    for crd in ("microvms", "microvmnodes", "ippools"):
        # a CRD created a moment ago may have no status yet, which `kubectl wait` reports as an error
        deadline = time.monotonic() + 60
        while True:
            res = cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}.mikrom.io", "--timeout=30s",
                             check=False)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {crd}.mikrom.io not Established: {res.stderr}")
            time.sleep(0.5)


@dataclass
class WorkerProc:
    node: str
    env: dict
    logdir: Path
    state_dir: Path
    proc: procs.Proc | None = None
    generation: int = 0
    extra_args: list = field(default_factory=list)

    # ------------------------------------------------------------------ process
    def start(self, wait: float = 60.0) -> "WorkerProc":
        self.generation += 1
        argv = [sys.executable, "-m", "mikrom.cli", "worker", "--node", self.node, "--loglevel", "info",
                *self.extra_args]
        self.proc = procs.start(f"worker-{self.node}-{self.generation}", argv, self.logdir, env=self.env,
                                cwd=str(REPO))
        self.wait_log("ready.", wait)
        self.wait_log(f"registered MicroVMNode {self.node}", wait)  # and heartbeating
        return self

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if not self.proc.alive():
                raise RuntimeError(f"worker exited ({self.proc.popen.returncode}):\n{self.proc.tail(80)}")
            time.sleep(0.2)
        raise TimeoutError(f"worker did not log {text!r} within {timeout}s:\n{self.proc.tail(80)}")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MIKROM_METRICS_PORT']}/metrics"

    def log_text(self) -> str:
        try:
            return self.proc.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9 the worker process only (not its VMMs)."""
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=20)

    def cleanup(self) -> None:
        """Stop the worker and every VMM process left under its state directory."""
        self.stop()
        for pid in vmm_pids(self.state_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ tools
    def celery(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`celery -A mikrom.celery_app ARGS` with the worker's environment (broker, settings)."""
        return subprocess.run([sys.executable, "-m", "celery", "-A", "mikrom.celery_app", *args],
                              env=self.env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"


def vmm_pids(state_dir: Path, uid: str | None = None) -> list[int]:
    """Live VMM processes (QEMU or Firecracker) whose command line names a VM under `state_dir`."""
    root = str((Path(state_dir) / "vms").resolve()) + "/" + (uid or "")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if root in cmd and "consolecap" not in cmd and stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            found.append(int(entry))
    return sorted(found)


def worker_env(*, kubeconfig: Path, broker_url: str, node: str, state_dir: Path, image_dir: Path,
               netns: str | None = None, **settings) -> dict:
    """The worker's environment: only what it needs, plus MIKROM_<SETTING> overrides."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update({
        "KUBECONFIG": str(kubeconfig),
        "MIKROM_BROKER_URL": broker_url,
        "MIKROM_NODE_NAME": node,
        "MIKROM_STATE_DIR": str(state_dir),
        "MIKROM_IMAGE_DIR": str(image_dir),
        "MIKROM_QEMU_ACCEL": "tcg",
        "POD_NAMESPACE": SA_NAMESPACE,
        "PYTHONUNBUFFERED": "1",
        "MIKROM_METRICS_ADDRESS": "127.0.0.1",
        "MIKROM_METRICS_PORT": str(procs.free_port()),
    })
    if netns:
        env["MIKROM_NETNS"] = netns
    for key, value in settings.items():
        env["MIKROM_" + key.upper()] = str(value)
    return env


def new_node_name(prefix: str = "node") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def netns_create() -> str:
    name = "mkt-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
    return name


def netns_delete(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], timeout=10, capture_output=True)


def client_app(broker_url: str):
    """A Celery app for the test process, configured like mikrom.celery_app but on `broker_url`."""
    from celery import Celery

    from mikrom.celery_app import configure
    from mikrom.settings import Settings

    app = Celery("mikrom-tests")
    configure(app, Settings(broker_url=broker_url))
    return app


def guest_image() -> Path:
    """The test guest image directory (vmlinuz + initrd.img), built once by hack/test-image.sh."""
    res = subprocess.run([str(REPO / "hack" / "test-image.sh")], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"hack/test-image.sh failed:\n{res.stderr[-4000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ fixtures
# Test modules import these names to use them as fixtures.

BROKER_DB = 6
"""Redis database of the worker tests (other suites use others; queues never mix)."""


@pytest.fixture(scope="session")
def worker_kubeconfig(control_plane, artifacts_dir) -> Path:
    install_crds(control_plane)
    return service_account_kubeconfig(control_plane, artifacts_dir / "worker" / "kubeconfig")


@pytest.fixture
def make_worker(control_plane, kube_api, redis, worker_kubeconfig, artifacts_dir, tmp_path):
    """A factory of real `mikrom worker` processes; each is stopped, and its VMMs killed, at the end."""
    made: list[WorkerProc] = []
    dirs: list[Path] = []

    def make(node: str | None = None, netns: str | None = None, image_dir: Path | None = None, start: bool = True,
             **settings) -> WorkerProc:
        node = node or new_node_name()
        # short: a VM's unix sockets live under it and must stay below 108 bytes
        state = Path(tempfile.mkdtemp(prefix=f"mkw-{node[-6:]}-", dir="/tmp"))
        dirs.append(state)
        settings.setdefault("heartbeat_seconds", 2)
        env = worker_env(kubeconfig=worker_kubeconfig, broker_url=redis.url(db=BROKER_DB), node=node,
                         state_dir=state, image_dir=image_dir or tmp_path / "no-images", netns=netns, **settings)
        w = WorkerProc(node=node, env=env, logdir=artifacts_dir / "worker", state_dir=state)
        made.append(w)
        return w.start() if start else w

    yield make
    from kubernetes import client

    nodes = client.CustomObjectsApi(kube_api)
    for w in made:
        w.cleanup()
        try:  # a node without a worker must not be offered to later tests' VMs
            nodes.delete_cluster_custom_object("mikrom.io", "v1alpha1", "microvmnodes", w.node, _request_timeout=(5, 30))
        except client.ApiException:
            pass
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def celery_client(redis):
    app = client_app(redis.url(db=BROKER_DB))
    yield app
    app.close()


# ------------------------------------------------------------------------------------ e2e

def e2e_skip_reason() -> str | None:
    """Why real VM boots cannot run here, or None."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, tap devices)")
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    return "worker e2e tests need " + " and ".join(missing) if missing else None


class VMs(MicroVMClient):
    """The test's MicroVMs, through the admin client."""

    def __init__(self, api_client, namespace: str, pool: str | None = None):
        super().__init__(api_client, namespace)
        self.pool = pool
        self.node: str | None = None
        """Pin new VMs to this MicroVMNode (the test's worker), so the session's other nodes never get them."""

    def manifest(self, name: str, network: bool = True, **spec) -> dict:
        body = {"apiVersion": "mikrom.io/v1alpha1", "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "vmm": "qemu",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}
        if network and self.pool:
            body["spec"]["network"] = {"pool": self.pool}
        if self.node:
            body["spec"]["nodeName"] = self.node
        body["spec"].update(spec)
        return body

    def wait_phase(self, name: str, phase: str, timeout: float = 90, avoid: tuple = ()) -> dict:
        """Poll until `name` is in `phase`; fail at once if it reaches a phase in `avoid`."""
        deadline = time.monotonic() + timeout
        st: dict = {}
        while time.monotonic() < deadline:
            st = self.status(name)
            if st.get("phase") == phase:
                return st
            if st.get("phase") in avoid:
                raise AssertionError(f"{name} reached {st.get('phase')} while waiting for {phase}: {st}")
            time.sleep(0.2)
        raise AssertionError(f"{name} not {phase} within {timeout}s: {st}")

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get(name) is None:
                return
            time.sleep(0.2)
        raise AssertionError(f"{name} still exists after {timeout}s: {self.status(name)}")

    def events(self, name: str) -> list:
        items = self.core.list_namespaced_event(self.ns, _request_timeout=(5, 30)).items
        return sorted((e for e in items if e.involved_object.name == name),
                      key=lambda e: e.metadata.creation_timestamp)

    def wait_event(self, name: str, reason: str, timeout: float = 20, type_: str | None = None):
        """The first Event `reason` on `name` (Events are written just after the status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(name):
                if e.reason == reason and (type_ is None or e.type == type_):
                    return e
            time.sleep(0.2)
        raise AssertionError(f"no {reason} event on {name} within {timeout}s: "
                             f"{[(e.type, e.reason) for e in self.events(name)]}")

    def remove_all(self, timeout: float = 30) -> None:
        """Delete every MicroVM of the test; strip finalizers of those the flow did not finish."""
        for name in self.names():
            try:
                self.delete(name)
            except ApiException:
                pass
        deadline = time.monotonic() + timeout
        while self.names() and time.monotonic() < deadline:
            time.sleep(0.5)
        for name in self.names():
            try:
                self.patch(name, {"metadata": {"finalizers": None}})
            except ApiException:
                pass


def create_pool(api_client, name: str, cidr: str, block_size: int = 26) -> None:
    from kubernetes import client

    client.CustomObjectsApi(api_client).create_cluster_custom_object(
        "mikrom.io", "v1alpha1", "ippools",
        {"apiVersion": "mikrom.io/v1alpha1", "kind": "IPPool", "metadata": {"name": name},
         "spec": {"cidr": cidr, "blockSize": block_size}}, _request_timeout=(5, 30))


def netns_run(netns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)


def ping(netns: str, ip: str, count: int = 2) -> subprocess.CompletedProcess:
    """Ping `ip` from inside the namespace (busybox's ping: iputils is not always installed)."""
    return netns_run(netns, "busybox", "ping", "-c", str(count), "-W", "3", ip, timeout=30)


def link_exists(netns: str, name: str) -> bool:
    return netns_run(netns, "ip", "link", "show", "dev", name).returncode == 0


@pytest.fixture(scope="session")
def guest_image_dir() -> Path:
    return guest_image()


@pytest.fixture(scope="session")
def mikrom_operator_cluster(control_plane, worker_kubeconfig, artifacts_dir):
    """The control plane with the operator's RBAC and peering CRDs, and its kubeconfig."""
    from . import operator_proc

    operator_proc.install(control_plane)
    return operator_proc.service_account_kubeconfig(control_plane, artifacts_dir / "operator" / "kubeconfig")


@pytest.fixture
def netns():
    name = netns_create()
    yield name
    netns_delete(name)


@pytest.fixture
def operator_env() -> dict:
    """Settings for the test's operator; a test module overrides this fixture to change them."""
    return {}


@pytest.fixture
def fleet(control_plane, kube_api, redis, mikrom_operator_cluster, namespace, artifacts_dir, operator_env,
          make_worker):
    """The real operator (watching this test's namespace, on the worker tests' Redis database), an
    IPPool of the test's own, and a client for the test's MicroVMs. At the end every MicroVM is
    deleted through the normal flow (the worker must confirm), and the operator stopped; the test's
    workers (`make_worker`, set up first so torn down last) are still there to confirm."""
    import random

    from . import operator_proc

    pool = "wk-" + uuid.uuid4().hex[:6]
    create_pool(kube_api, pool, f"10.{random.randint(100, 250)}.{random.randint(0, 255) & 0xF0}.0/20", 26)
    op = operator_proc.start(control_plane, redis.url(db=BROKER_DB), artifacts_dir / "operator",
                             f"operator-{namespace}", mikrom_operator_cluster, namespace=namespace,
                             env={"MIKROM_NODE_LOST_AFTER_SECONDS": "40", "MIKROM_DELETE_WAIT_SECONDS": "30",
                                  "MIKROM_PROGRESS_TIMEOUT_SECONDS": "120", **operator_env},
                             standalone=True)
    op.wait_live()
    vms = VMs(kube_api, namespace, pool)
    vms.operator = op
    yield vms
    try:
        vms.remove_all()
    finally:
        op.stop()
        from kubernetes import client
        try:
            client.CustomObjectsApi(kube_api).delete_cluster_custom_object("mikrom.io", "v1alpha1", "ippools", pool,
                                                                           _request_timeout=(5, 30))
        except client.ApiException:
            pass
