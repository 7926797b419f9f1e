"""Run the node worker (`mikrom worker`) as a real subprocess for the tests.

The worker runs as the ServiceAccount `mikrom-worker` (a kubeconfig holding a token minted by
harness.serviceaccounts, so deploy/rbac/worker.yaml is what it is allowed to do), against the
session's Redis, with its state directory in a temporary directory. Its bridge, taps, NAT rules and
VMMs live in a network namespace the test creates (`MIKROM_NETNS`, harness.netns), never on the
host's interfaces.

`kill()` is `kill -9` of the worker process alone: the VMMs it started run in their own sessions
and survive, as they would on a node. `cleanup()` stops whatever VMM is left under the state
directory, by pid.

Fixtures: `worker_kubeconfig`, `make_worker`, `celery_client`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mikrom import names

from . import procs
from .microvms import MicroVMClient
from .serviceaccounts import WORKER
from .vms import vmm_pids
from .waits import wait_for

# hack/demo.py and bench/boot.py start the same stack as the tests and import these from here; the
# tests import them from harness.netns, harness.guest_image and harness.vms.
from .guest_image import guest_image  # noqa: F401
from .netns import create as netns_create, delete as netns_delete  # noqa: F401
from .netns import link_exists, ping, run as netns_run  # noqa: F401
from .vms import VMs, create_pool, e2e_skip_reason  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
"""libfaketime (Debian package `faketime`, hack/system-deps.sh)."""
RBAC = REPO / "deploy" / "rbac" / "worker.yaml"
SA_NAMESPACE = WORKER.namespace
SA_NAME = WORKER.name


def service_account_kubeconfig(cp, path: Path, duration: str = "4h") -> Path:
    """Apply the worker's RBAC and write a kubeconfig that authenticates as its ServiceAccount."""
    if cp.kubectl("get", "namespace", SA_NAMESPACE, check=False).returncode != 0:
        cp.kubectl("create", "namespace", SA_NAMESPACE, check=False)
    cp.kubectl("apply", "-f", str(RBAC))
    return WORKER.kubeconfig(cp, path, duration)


def install_crds(cp) -> None:
    cp.kubectl("apply", "-f", str(REPO / "crds"))
    for crd in ("microvms", "microvmnodes", "ippools"):
        # a CRD created a moment ago may have no status yet, which `kubectl wait` reports as an error
        wait_for(lambda: cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}.mikrom.io", "--timeout=30s",
                                    check=False).returncode == 0, 60, f"CRD {crd}.mikrom.io to be Established",
                 interval=0.5)


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
        def exited() -> str | None:
            if not self.proc.alive():
                return f"worker exited ({self.proc.popen.returncode}):\n{self.proc.tail(80)}"
            return None

        try:
            wait_for(lambda: text in self.log_text(), timeout, f"the worker to log {text!r}", abort=exited)
        except TimeoutError as exc:
            raise type(exc)(f"{exc}:\n{self.proc.tail(80)}") from None

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

    def fake_clock(self, offset: str) -> "WorkerProc":
        """Run the worker (from its next start) with its wall clock `offset` off ("-5m", "+300s"),
        through libfaketime as LD_PRELOAD: CLOCK_REALTIME only, so CLOCK_MONOTONIC and
        CLOCK_BOOTTIME (the lease's clock, the host's uptime) stay true, as on a node whose
        clock is wrong. The VMMs' supervisors get a clean environment and the true clock."""
        if not FAKETIME_LIB.exists():
            raise FileNotFoundError(f"{FAKETIME_LIB}: apt-get install faketime (hack/system-deps.sh)")
        self.env.update({"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        return self

    @contextlib.contextmanager
    def crash_looping(self, up_until: str = "registered MicroVMNode"):
        """For the block, a crash-looping worker: started, and kill -9'ed as soon as it logs
        `up_until` (by default its first heartbeat round, registration), over and over. Yields
        the list of starts so far; re-raises what went wrong in the loop at the end."""
        stop, starts, failed = threading.Event(), [], []

        def loop() -> None:
            try:
                while not stop.is_set():
                    if self.proc is not None:
                        self.kill()  # a crash, never a clean stop
                    self.generation += 1
                    argv = [sys.executable, "-m", "mikrom.cli", "worker", "--node", self.node, "--loglevel", "info",
                            *self.extra_args]
                    self.proc = procs.start(f"worker-{self.node}-{self.generation}", argv, self.logdir,
                                            env=self.env, cwd=str(REPO))
                    starts.append(time.monotonic())
                    wait_for(lambda: up_until in self.log_text() or not self.proc.alive() or stop.is_set(), 60,
                             f"the worker to log {up_until!r}", interval=0.05)
                    self.kill()
            except BaseException as exc:  # noqa: BLE001 - handed to the test at the end
                failed.append(exc)

        t = threading.Thread(target=loop, name=f"crash-loop-{self.node}", daemon=True)
        t.start()
        try:
            yield starts
        finally:
            stop.set()
            t.join(90)
            self.kill()
        if failed:
            raise failed[0]

    def cleanup(self) -> None:
        """Stop the worker and every VMM process left under its state directory, and remove the
        host cgroups of its VMs (a VM outlives its worker on purpose, so a test that ends with VMs
        still running would leave their empty groups on this machine)."""
        self.stop()
        for pid in vmm_pids(self.state_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._remove_host_cgroups()

    def _remove_host_cgroups(self) -> None:
        from mikrom.settings import Settings
        from mikrom.worker import hostcgroup
        from mikrom.worker.runtime import host_cgroup_settings

        cfg = hostcgroup.HostCgroupConfig.from_dict(host_cgroup_settings(Settings.from_env(self.env)))
        if cfg is None:
            return
        try:
            uids = [entry.name for entry in self.vms_dir.iterdir() if entry.is_dir()]
        except OSError:
            return
        for uid in uids:  # the supervisors exit once their VMM is gone: wait for the groups to empty
            hostcgroup.remove(cfg, uid, timeout=10)

    # ------------------------------------------------------------------ tools
    def celery(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`celery -A mikrom.celery_app ARGS` with the worker's environment (broker, settings)."""
        return subprocess.run([sys.executable, "-m", "celery", "-A", "mikrom.celery_app", *args],
                              env=self.env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"


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


def client_app(broker_url: str):
    """A Celery app for the test process, configured like mikrom.celery_app but on `broker_url`."""
    from celery import Celery

    from mikrom.celery_app import configure
    from mikrom.settings import Settings

    app = Celery("mikrom-tests")
    configure(app, Settings(broker_url=broker_url))
    return app


def broadcast_until(app, task: str, kwargs: dict, check, timeout: float, what: str, every: float = 3.0):
    """Send the broadcast `task` every `every` seconds until `check` holds, and return what it
    returned. Redis fanout is pub/sub: a worker that has only just started may not have subscribed
    yet, and beat simply sends again next period."""
    sent_at = [float("-inf")]

    def sent_and_checked():
        if time.monotonic() - sent_at[0] >= every:
            app.send_task(task, kwargs=kwargs)
            sent_at[0] = time.monotonic()
        return check()

    return wait_for(sent_and_checked, timeout, what)


# ------------------------------------------------------------------------------------ fixtures

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
    nodes = MicroVMClient(kube_api, "")
    for w in made:
        w.cleanup()
        # a node without a worker must not be offered to later tests' VMs
        nodes.delete_cluster_object(names.MICROVMNODES, w.node)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def send_create(app, worker: "WorkerProc", vm: dict):
    """A create message for MicroVM `vm` on `worker`'s node queue, as the operator sends it."""
    m = vm["metadata"]
    return app.send_task(names.CREATE_VM, queue=names.node_queue(worker.node),
                         kwargs={"namespace": m["namespace"], "name": m["name"], "uid": m["uid"], "intent": "create"})


@pytest.fixture
def celery_client(redis):
    app = client_app(redis.url(db=BROKER_DB))
    yield app
    app.close()

