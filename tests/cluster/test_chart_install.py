"""The chart on the real one-node cluster: `helm install --wait` with the images hack/images.sh
built, every component running under the chart's own ServiceAccounts, the example MicroVM booting
(QEMU, TCG) with its VMM in a host cgroup of its own, the VMM surviving the worker pod's deletion
and a `helm upgrade`, `kubectl mikrom console --via-pod` through the worker pod, the lifecycle, the admission policy refusing a worker another node's writes,
Flower through the Ingress (its login, the VM's create task in its API, a screenshot of its task
list), and `helm uninstall` leaving no pod well within the worker's grace period.

Redis is the chart's own standalone StatefulSet (hack/images.sh's Debian redis-server image, no
persistence: the cluster has no storage provisioner) with the password the chart generates, which
an upgrade must keep (test_chart_sentinel.py runs Sentinel with `redis.auth.existingSecret`). The VMs' groups go under the cluster's own cgroup root, so tearing
the cluster down takes any VM a failed test left with it. The tests run in order against one
release (installing takes minutes).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from harness import binaries, cluster_config, cluster_pods
from harness.cluster_addons import INGRESS_CLASS
from harness.screenshot import screenshot
from harness.terminal import Terminal
from harness.vms import vmm_pids
from harness.waits import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mikrom"
NODE = cluster_config.NODE_NAME
COMPONENTS = {"operator": 2, "worker": 1, "beat": 1, "flower": 1}
INSTALL_TIMEOUT = "10m"
GRACE_SECONDS = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["terminationGracePeriodSeconds"]
UNINSTALL_BOUND = 90
"""Seconds from `helm uninstall` to no pod left: far below the worker's grace period, which a worker
whose Redis went in the same uninstall used to run out (its event heartbeats reconnected forever)."""


class Release:
    def __init__(self, cluster, name: str, namespace: str, state: Path, parent: str, values: Path, tenant: str,
                 flower_host: str):
        self.cluster, self.name, self.namespace = cluster, name, namespace
        self.state, self.parent, self.values, self.tenant, self.flower_host = state, parent, values, tenant, flower_host

    def helm(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(binaries.require("helm")), "--kubeconfig", str(self.cluster.kubeconfig), *args],
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            events = self.kubectl("get", "events", "-n", self.namespace, "--sort-by=.lastTimestamp", check=False).stdout
            pods = self.kubectl("get", "pods", "-n", self.namespace, "-o", "wide", check=False).stdout
            raise AssertionError(f"helm {' '.join(args)} failed: {res.stderr}\n{pods}\n{events[-4000:]}")
        return res

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, **kw)

    def pods(self, component: str) -> list[dict]:
        out = self.kubectl("get", "pods", "-n", self.namespace, "-l",
                           f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}",
                           "-o", "json").stdout
        return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]

    def vm(self, name: str) -> dict | None:
        res = self.kubectl("get", "microvm", name, "-n", self.tenant, "-o", "json", check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def logs(self, component: str) -> str:
        return self.kubectl("logs", "-n", self.namespace, "-l", f"app.kubernetes.io/component={component}",
                            "--tail=60", "--all-containers", check=False).stdout


def _ready(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cgroups(pid: int) -> set[str]:
    return {line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if line}


def _ref(image: dict) -> tuple[str, str]:
    repository, tag = image["ref"].rsplit(":", 1)
    return repository, tag


@pytest.fixture(scope="module")
def release(cluster, guest_image_dir, artifacts_dir):
    name = "mk" + uuid.uuid4().hex[:6]
    namespace, tenant = f"{name}-system", f"{name}-tenant"
    # short: a VM's unix sockets live under the state directory and must stay below 108 bytes; not
    # under /tmp, which is the worker's emptyDir (the chart refuses it)
    Path("/var/lib/mikrom-test").mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="mkc-", dir="/var/lib/mikrom-test"))
    (state / "images").mkdir()
    for f in ("vmlinuz", "initrd.img"):
        shutil.copy(guest_image_dir / f, state / "images" / f)
    parent = cluster.layout.cgroup_root.strip("/") + "/mikrom-vms"
    flower_host = f"flower.{name}.test"
    operator_repo, operator_tag = _ref(cluster.images["operator"])
    worker_repo, worker_tag = _ref(cluster.images["worker"])
    values = {
        "images": {"operator": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
                   "worker": {"repository": worker_repo, "tag": worker_tag, "pullPolicy": "Never"}},
        "settings": {"NODE_LOST_AFTER_SECONDS": "30", "RECONCILE_INTERVAL_SECONDS": "2"},
        "worker": {"stateDir": str(state), "imageDir": str(state / "images"),
                   "hostCgroup": {"parent": parent},
                   # this machine's /dev/kvm cannot boot stock kernels (TESTBED.md): QEMU emulates
                   "env": {"MIKROM_QEMU_ACCEL": "tcg", "MIKROM_CLUSTER_SERVICE_CIDR": cluster_config.SERVICE_CIDR,
                           "MIKROM_CLUSTER_POD_CIDR": cluster_config.POD_CIDR}},
        "flower": {"ingress": {"enabled": True, "className": INGRESS_CLASS, "hosts": [flower_host]}},
    }
    # the in-chart StatefulSet with a generated password; no storage provisioner here
    redis_repo, redis_tag = _ref(cluster.images["redis"])
    values["redis"] = {"image": {"repository": redis_repo, "tag": redis_tag, "pullPolicy": "Never"},
                       "persistence": {"enabled": False}}
    values_file = state / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    r = Release(cluster, name, namespace, state, parent, values_file, tenant, flower_host)
    r.create_task = None  # (VM uid, task id) of the example VM's create, once it ran
    r.kubectl("create", "namespace", namespace)
    r.kubectl("create", "namespace", tenant)
    try:
        yield r
    finally:
        try:
            # whatever a failed test left: VMs first (their finalizer needs the operator and the worker)
            r.kubectl("delete", "microvms", "--all", "-n", tenant, "--timeout=90s", check=False, timeout=120)
            r.helm("uninstall", name, "-n", namespace, "--wait", "--timeout", "3m", check=False)
            for pid in vmm_pids(state):
                os.kill(pid, signal.SIGKILL)
            # the worker's MicroVMNode outlives the release (as CRDs and MicroVMs do); no operator is
            # left to lift its finalizer
            r.kubectl("patch", "microvmnode", NODE, "--type=merge", "-p", '{"metadata": {"finalizers": null}}',
                      check=False)
            r.kubectl("delete", "microvmnode", NODE, "--ignore-not-found", check=False)
            for ns in (tenant, namespace):
                r.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        finally:
            shutil.rmtree(state, ignore_errors=True)
            try:
                state.parent.rmdir()  # unless another session's state is in it
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------

def test_helm_install_wait_brings_every_component_up(release):
    release.helm("install", release.name, str(CHART), "-n", release.namespace, "-f", str(release.values),
                 "--wait", "--timeout", INSTALL_TIMEOUT)
    expected = {**COMPONENTS, "redis": 1}
    # `--wait` counts a DaemonSet with maxUnavailable 1 on one node as ready with no pod ready
    for component, count in expected.items():
        def up(component=component, count=count):
            pods = release.pods(component)
            return len(pods) == count and all(_ready(p) for p in pods)
        try:
            wait_for(up, 300, f"{count} {component} pod(s) Running and Ready")
        except Exception:
            raise AssertionError(f"{component}: {release.logs(component)[-3000:]}") from None
    # each runs under the chart's own ServiceAccount (or none at all)
    accounts = {c: {p["spec"].get("serviceAccountName") for p in release.pods(c)} for c in COMPONENTS}
    assert accounts["operator"] == {f"{release.name}-mikrom-operator"}
    assert accounts["worker"] == {f"{release.name}-mikrom-worker"}
    # the two operator replicas share the peering: both appear in it, one is active
    def peers() -> dict:
        res = release.kubectl("get", "clusterkopfpeering", "mikrom", "-o", "json", check=False)
        return json.loads(res.stdout).get("status", {}) if res.returncode == 0 else {}
    wait_for(lambda: len(peers()) >= 2, 120, "both operator replicas in the peering")


def test_the_worker_registers_its_node(release):
    def ready() -> bool:
        res = release.kubectl("get", "microvmnode", NODE, "-o", "json", check=False)
        if res.returncode != 0:
            return False
        conditions = json.loads(res.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    wait_for(ready, 120, f"MicroVMNode {NODE} Ready", abort=lambda: not release.pods("worker"))


def _wait_phase(release, name: str, phase: str, timeout: float = 240) -> dict:
    def reached():
        vm = release.vm(name)
        return vm if vm and vm.get("status", {}).get("phase") == phase else None
    try:
        return wait_for(reached, timeout, f"MicroVM {name} {phase}")
    except Exception:
        vm = release.vm(name)
        raise AssertionError(f"{name} not {phase}: {json.dumps((vm or {}).get('status'), indent=1)}\n"
                             f"{release.logs('worker')[-3000:]}") from None


def _assert_in_own_group(release, pid: int, uid: str, vcpus: int, memory_mib: int) -> None:
    own = f"/{release.parent}/{uid}"
    assert _cgroups(pid) == {own}, f"pid {pid}: {Path(f'/proc/{pid}/cgroup').read_text()}"
    assert Path("/sys/fs/cgroup/cpu", release.parent, uid, "cpu.cfs_quota_us").read_text().strip() == str(vcpus * 100000)
    assert int(Path("/sys/fs/cgroup/memory", release.parent, uid, "memory.limit_in_bytes").read_text()) == \
        (memory_mib + 256) << 20


def test_the_example_microvm_runs_with_its_vmm_in_a_host_cgroup_of_its_own(release):
    release.kubectl("apply", "-n", release.tenant, "-f", str(REPO / "examples" / "microvm.yaml"))
    vm = _wait_phase(release, "hello", "Running")
    pid, uid = vm["status"]["pid"], vm["metadata"]["uid"]
    assert vm["status"]["node"] == NODE and _alive(pid)
    # the create task's id, for Flower's task list below
    release.create_task = (uid, vm["status"]["dispatch"]["taskId"])
    _assert_in_own_group(release, pid, uid, vm["spec"]["vcpus"], vm["spec"]["memoryMiB"])


def _host_relay(release, uid: str, hold: float = 3.0) -> tuple[bool, int, bytes]:
    """The console relay run on the node itself (not in the pod), sending nothing for `hold`
    seconds: (whether it stayed attached that long, its exit status, what it printed)."""
    relay = subprocess.Popen([sys.executable, "-m", "mikrom.worker", "console-relay", uid, "--state-dir",
                              str(release.state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        relay.wait(timeout=hold)
        held = False
    except subprocess.TimeoutExpired:
        held = True
    relay.stdin.close()  # as a detach does: the relay lets go of the console
    out = relay.stdout.read()
    return held, relay.wait(timeout=30), out


def test_kubectl_mikrom_console_reaches_the_vm_through_kubectl_exec_in_the_node_s_worker_pod(release):
    vm = release.vm("hello")
    uid = vm["metadata"]["uid"]
    env = dict(os.environ, KUBECONFIG=str(release.cluster.kubeconfig),
               PATH=f"{Path(sys.executable).parent}:{binaries.require('kubectl').parent}:{os.environ['PATH']}")
    plugin = ["kubectl", "mikrom", "console", "-n", release.tenant, "hello", "--via-pod",
              "--worker-namespace", release.namespace, "--pod-state-dir", str(release.state)]
    # the read-only log, read in the pod: what the supervisor wrote on the node
    log = subprocess.run(plugin + ["--log"], capture_output=True, env=env, timeout=60)
    assert log.returncode == 0, log.stderr
    on_node = (release.state / "vms" / uid / "console.log").read_bytes()
    assert log.stdout and on_node.startswith(log.stdout[:4096]), "the pod's log is the node's"

    # interactive: the relay in the worker pod holds the VM's console (one client at a time, so a
    # second client on the node is refused) until Ctrl-] detaches, which frees it again
    term = Terminal()
    attached = subprocess.Popen(plugin, stdin=term.slave, stdout=term.slave, stderr=term.slave, env=env,
                                start_new_session=True)
    try:
        term.expect(b"Ctrl-] detaches", timeout=30)
        # attached once the guest's serial echoes what is typed (the banner comes before the relay
        # in the pod has connected)
        term.seen = b""
        term.type(b"\r")
        term.expect(b"\n", timeout=60)
        held, status, out = wait_for(lambda: (r := _host_relay(release, uid, hold=2.0))[1] != 0 and r, 60,
                                     "the console to be held by the relay in the worker pod")
        assert not held and b"in use" in out, out
        assert attached.poll() is None, "the plugin is still attached"
        term.type(b"\x1d")  # Ctrl-]
        assert attached.wait(timeout=30) == 0
        term.expect(b"detached", timeout=5)
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.wait()
        term.close()
    wait_for(lambda: (r := _host_relay(release, uid))[0] and r[1] == 0 and b"in use" not in r[2], 30,
             "the console to be free once the pod's relay let go")
    assert release.vm("hello")["status"]["phase"] == "Running"


def test_deleting_the_worker_pod_and_upgrading_the_release_keep_the_vm_running(release):
    vm = release.vm("hello")
    pid = vm["status"]["pid"]
    (old,) = release.pods("worker")
    release.kubectl("delete", "pod", old["metadata"]["name"], "-n", release.namespace, "--wait=true", timeout=400)
    assert _alive(pid), "the VMM died with the worker pod"
    wait_for(lambda: [p for p in release.pods("worker") if _ready(p) and p["metadata"]["uid"] != old["metadata"]["uid"]],
             300, "a new worker pod Ready")
    assert _alive(pid) and release.vm("hello")["status"]["pid"] == pid
    assert release.vm("hello")["status"]["phase"] == "Running"

    (before,) = release.pods("worker")
    password = _flower_login(release)
    broker = _redis_password(release)
    release.helm("upgrade", release.name, str(CHART), "-n", release.namespace, "-f", str(release.values),
                 "--set", "worker.podAnnotations.example\\.com/upgraded=yes", "--wait", "--timeout", INSTALL_TIMEOUT)
    (after,) = release.pods("worker")
    assert after["metadata"]["uid"] != before["metadata"]["uid"], "the upgrade replaced the worker pod"
    assert after["metadata"]["annotations"].get("example.com/upgraded") == "yes"
    assert _alive(pid), "the VMM died in the upgrade"
    assert _flower_login(release) == password, "the upgrade kept Flower's generated password"
    assert _redis_password(release) == broker, "the upgrade kept the broker's password"
    vm = release.vm("hello")
    assert vm["status"]["pid"] == pid and vm["status"]["phase"] == "Running"
    _assert_in_own_group(release, pid, vm["metadata"]["uid"], vm["spec"]["vcpus"], vm["spec"]["memoryMiB"])


def test_stop_start_and_delete_work_under_the_charts_service_accounts(release):
    vm = release.vm("hello")
    uid, pid = vm["metadata"]["uid"], vm["status"]["pid"]
    groups = [h / release.parent / uid for h in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/memory"))]
    release.kubectl("patch", "microvm", "hello", "-n", release.tenant, "--type=merge",
                    "-p", '{"spec": {"runStrategy": "Halted"}}')
    _wait_phase(release, "hello", "Stopped")
    wait_for(lambda: not _alive(pid), 60, "the VMM to exit")
    wait_for(lambda: not any(g.exists() for g in groups), 30, "the stopped VM's host cgroup to go")

    release.kubectl("patch", "microvm", "hello", "-n", release.tenant, "--type=merge",
                    "-p", '{"spec": {"runStrategy": "Always"}}')
    vm = _wait_phase(release, "hello", "Running")
    assert vm["status"]["pid"] != pid
    _assert_in_own_group(release, vm["status"]["pid"], uid, vm["spec"]["vcpus"], vm["spec"]["memoryMiB"])

    release.kubectl("delete", "microvm", "hello", "-n", release.tenant, "--timeout=120s", timeout=180)
    assert release.vm("hello") is None
    assert not _alive(vm["status"]["pid"])
    assert not any(g.exists() for g in groups)


def test_the_service_accounts_may_do_what_their_component_needs_and_no_more(release):
    ns = release.namespace
    operator = f"system:serviceaccount:{ns}:{release.name}-mikrom-operator"
    worker = f"system:serviceaccount:{ns}:{release.name}-mikrom-worker"

    def can(user: str, *args: str) -> bool:
        return release.kubectl("auth", "can-i", *args, as_user=user, check=False).stdout.strip() == "yes"

    assert can(operator, "patch", "microvms.mikrom.io", "-A")
    assert can(operator, "create", "clusterkopfpeerings.kopf.dev")
    assert not can(operator, "delete", "microvms.mikrom.io", "-A")
    assert not can(operator, "get", "secrets", "-n", ns)
    assert can(worker, "patch", "microvms.mikrom.io", "--subresource=status", "-A")
    assert can(worker, "create", "microvmnodes.mikrom.io")
    assert not can(worker, "patch", "microvms.mikrom.io", "-A")
    assert not can(worker, "get", "secrets", "-n", ns)
    assert not can(worker, "create", "pods", "-n", ns)


CROSS_NODE = """
import json
from kubernetes import client, config
config.load_incluster_config()
api = client.CustomObjectsApi()
out = {}
for name in ("%(own)s", "%(other)s"):
    try:
        api.patch_cluster_custom_object_status("mikrom.io", "v1alpha1", "microvmnodes", name,
                                               {"status": {"kvm": True}}, _request_timeout=10)
        out[name] = "allowed"
    except client.ApiException as exc:
        out[name] = {"status": exc.status, "message": json.loads(exc.body).get("message", "")}
print(json.dumps(out))
"""


def test_the_admission_policy_refuses_the_worker_writes_to_another_nodes_objects(release):
    other = f"{release.name}-elsewhere"
    release.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "mikrom.io/v1alpha1", "kind": "MicroVMNode", "metadata": {"name": other},
        "spec": {"schedulable": False}}))
    try:
        (pod,) = release.pods("worker")
        out = cluster_pods.python_in(release.cluster, release.namespace, pod["metadata"]["name"],
                                     CROSS_NODE % {"own": NODE, "other": other})
        assert out[NODE] == "allowed"
        assert out[other]["status"] == 403, out
        assert f"may write only MicroVMNode {NODE}, not {other}" in out[other]["message"], out
    finally:
        release.kubectl("delete", "microvmnode", other, "--ignore-not-found", check=False)


def _request(release, path: str, auth: tuple[str, str] | None = None) -> urllib.request.Request:
    req = urllib.request.Request(release.cluster.ingress_url + path, headers={"Host": release.flower_host})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    return req


def _get(release, path: str, auth: tuple[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(_request(release, path, auth), timeout=10) as resp:
            return resp.status
    except OSError as exc:
        return getattr(exc, "code", None)


def _get_json(release, path: str, auth: tuple[str, str]):
    with urllib.request.urlopen(_request(release, path, auth), timeout=10) as resp:
        return json.loads(resp.read())


def _redis_password(release) -> str:
    data = json.loads(release.kubectl("get", "secret", f"{release.name}-mikrom-redis", "-n", release.namespace,
                                      "-o", "json").stdout)["data"]
    return base64.b64decode(data["redis-password"]).decode()


def _flower_login(release) -> tuple[str, str]:
    secret = json.loads(release.kubectl("get", "secret", f"{release.name}-mikrom-flower", "-n", release.namespace,
                                        "-o", "json").stdout)["data"]
    return base64.b64decode(secret["username"]).decode(), base64.b64decode(secret["password"]).decode()


def test_flower_answers_through_the_ingress_with_its_generated_login_only(release):
    login = _flower_login(release)
    assert login[0] == "admin" and len(login[1]) >= 24
    wait_for(lambda: _get(release, "/flower/", login) == 200, 120, "Flower through the Ingress")
    assert _get(release, "/flower/") == 401
    assert _get(release, "/flower/", ("admin", "wrong")) == 401
    assert _get(release, "/flower/api/workers", login) == 200
    assert _get(release, "/flower/metrics", login) == 404, "/metrics must not be on the Ingress"


def test_flowers_api_lists_the_create_task_of_the_vm_and_its_task_page_renders(release):
    login = _flower_login(release)
    assert release.create_task, "the example MicroVM's test did not get it Running"
    vm_uid, task_id = release.create_task
    # the operator's task-sent event and the worker's task events, through Redis, reached Flower

    def listed() -> dict | None:
        tasks = _get_json(release, "/flower/api/tasks?taskname=create_vm_task", login)
        return tasks if (tasks.get(task_id) or {}).get("state") == "SUCCESS" else None
    task = wait_for(listed, 60, f"Flower to list create_vm_task {task_id} as SUCCESS")[task_id]
    assert task["uuid"] == task_id and task["name"] == "create_vm_task", task
    assert vm_uid in task["kwargs"] and "hello" in task["kwargs"], task
    assert task["worker"] == f"mikrom@{NODE}", task

    # a picture of Flower's task list (for people, not asserted beyond being one)
    path = REPO / ".test-artifacts" / "screenshots" / "chart-flower-tasks.png"
    screenshot(f"{release.cluster.ingress_url}/flower/tasks", path, basic_auth=login, host=release.flower_host,
               width=1400, height=900)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) \
        == (1400, 900), f"{path}: not a 1400x900 PNG"


def test_helm_uninstall_leaves_no_pod_well_within_the_workers_grace_period(release):
    t0 = time.monotonic()
    release.helm("uninstall", release.name, "-n", release.namespace, "--wait", "--timeout", "5m")

    def left() -> list[str]:
        items = json.loads(release.kubectl("get", "pods", "-n", release.namespace, "-o", "json").stdout)["items"]
        return [p["metadata"]["name"] for p in items]
    # the worker's warm shutdown ends with its tasks, although its Redis goes in the same uninstall
    assert UNINSTALL_BOUND < GRACE_SECONDS / 3
    wait_for(lambda: not left(), UNINSTALL_BOUND - (time.monotonic() - t0),
             f"no pod left in {release.namespace} {UNINSTALL_BOUND} s after helm uninstall (grace {GRACE_SECONDS} s)")
    assert release.kubectl("get", "clusterrole", f"{release.name}-mikrom-operator", check=False).returncode != 0
    assert release.kubectl("get", "validatingadmissionpolicy", f"{release.name}-mikrom-worker-own-node",
                           check=False).returncode != 0
    # the pre-delete hook removed the default IPPool while the operator could still release it
    assert release.kubectl("get", "ippool", "default", check=False).returncode != 0
    assert release.kubectl("get", "crd", "microvms.mikrom.io", check=False).returncode == 0, "CRDs stay"
    assert not vmm_pids(release.state)
