"""The chart on the real one-node cluster: `helm install --wait` with the images hack/images.sh
built, every component running under the chart's own ServiceAccounts, the example MicroVM booting
(QEMU, TCG) with its VMM in a host cgroup of its own, the VMM surviving the worker pod's deletion
and a `helm upgrade`, the lifecycle, the admission policy refusing a worker another node's writes,
Flower through the Ingress, and `helm uninstall` leaving no pod.

Redis is the chart's StatefulSet when the cluster has a Redis image (`cluster.images["redis"]`),
else a real redis-server this module starts inside the cluster's network namespace, on the node's
address (`externalRedis`), with its password in a Secret. The VMs' groups go under the
cluster's own cgroup root, so tearing the cluster down takes any VM a failed test left with it.
The tests run in order against one release (installing takes minutes).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from harness import binaries, cluster_config, cluster_pods, procs
from harness.cluster import nsenter
from harness.cluster_addons import INGRESS_CLASS
from harness.waits import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mikrom"
NODE = cluster_config.NODE_NAME
COMPONENTS = {"operator": 2, "worker": 1, "beat": 1, "flower": 1}
INSTALL_TIMEOUT = "10m"
GRACE_SECONDS = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["terminationGracePeriodSeconds"]


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


def _start_redis(cluster, workdir: Path) -> tuple[procs.Proc, int, str]:
    """redis-server on the node's address inside the cluster's namespace, password in its config."""
    port = procs.free_port()
    password = secrets.token_hex(16)
    conf = workdir / "redis.conf"
    conf.write_text(f"bind {cluster_config.NODE_IP}\nport {port}\nrequirepass {password}\nsave \"\"\n"
                    f"appendonly no\ndir {workdir}\nprotected-mode yes\ndaemonize no\n")
    conf.chmod(0o600)
    proc = procs.start(f"chart-redis-{port}", [*nsenter(cluster.layout), shutil.which("redis-server"), str(conf)],
                       workdir)
    wait_for(lambda: "Ready to accept connections" in proc.log.read_text(errors="replace") or not proc.alive(),
             30, "redis-server to listen")
    assert proc.alive(), proc.tail(40)
    return proc, port, password


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
    redis = None
    if "redis" not in cluster.images:  # no Redis image built: a real redis-server beside the cluster
        redis_dir = artifacts_dir / f"chart-redis-{name}"
        redis_dir.mkdir(parents=True)
        redis, port, password = _start_redis(cluster, redis_dir)
        procs.STARTED.append(redis)
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
    if redis:
        values["redis"] = {"enabled": False}
        values["externalRedis"] = {"url": f"redis://{cluster_config.NODE_IP}:{port}/0", "existingSecret": "broker",
                                   "existingSecretPasswordKey": "redis-password"}
    else:  # the in-chart StatefulSet; no storage provisioner here
        repository, tag = _ref(cluster.images["redis"])
        values["redis"] = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
                           "persistence": {"enabled": False}}
    values_file = state / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    r = Release(cluster, name, namespace, state, parent, values_file, tenant, flower_host)
    r.external_redis = redis is not None
    r.kubectl("create", "namespace", namespace)
    r.kubectl("create", "namespace", tenant)
    if redis:
        secret_file = state / "redis-password"
        secret_file.write_text(password)
        secret_file.chmod(0o600)
        r.kubectl("create", "secret", "generic", "broker", "-n", namespace,
                  f"--from-file=redis-password={secret_file}")
        secret_file.unlink()
    try:
        yield r
    finally:
        try:
            # whatever a failed test left: VMs first (their finalizer needs the operator and the worker)
            r.kubectl("delete", "microvms", "--all", "-n", tenant, "--timeout=90s", check=False, timeout=120)
            r.helm("uninstall", name, "-n", namespace, "--wait", "--timeout", "3m", check=False)
            for pid in _vmm_pids(state):
                os.kill(pid, signal.SIGKILL)
            # the worker's MicroVMNode outlives the release (as CRDs and MicroVMs do); no operator is
            # left to lift its finalizer
            r.kubectl("patch", "microvmnode", NODE, "--type=merge", "-p", '{"metadata": {"finalizers": null}}',
                      check=False)
            r.kubectl("delete", "microvmnode", NODE, "--ignore-not-found", check=False)
            for ns in (tenant, namespace):
                r.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        finally:
            if redis:
                redis.stop()
                procs.STARTED.remove(redis)
            shutil.rmtree(state, ignore_errors=True)
            try:
                state.parent.rmdir()  # unless another session's state is in it
            except OSError:
                pass


def _vmm_pids(state: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(state) + "/" in cmd and _alive(int(entry)):
                found.append(int(entry))
    return found


# ---------------------------------------------------------------------------------------------

def test_helm_install_wait_brings_every_component_up(release):
    release.helm("install", release.name, str(CHART), "-n", release.namespace, "-f", str(release.values),
                 "--wait", "--timeout", INSTALL_TIMEOUT)
    expected = {**COMPONENTS, **({} if release.external_redis else {"redis": 1})}
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
    _assert_in_own_group(release, pid, uid, vm["spec"]["vcpus"], vm["spec"]["memoryMiB"])


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


def _get(release, path: str, auth: tuple[str, str] | None = None) -> int | None:
    req = urllib.request.Request(release.cluster.ingress_url + path, headers={"Host": release.flower_host})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except OSError as exc:
        return getattr(exc, "code", None)


def _redis_password(release) -> str:
    name = "broker" if release.external_redis else f"{release.name}-mikrom-redis"
    data = json.loads(release.kubectl("get", "secret", name, "-n", release.namespace, "-o", "json").stdout)["data"]
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


def test_helm_uninstall_leaves_no_pod(release):
    release.helm("uninstall", release.name, "-n", release.namespace, "--wait", "--timeout", "5m")

    def left() -> list[str]:
        items = json.loads(release.kubectl("get", "pods", "-n", release.namespace, "-o", "json").stdout)["items"]
        return [p["metadata"]["name"] for p in items]
    # within the worker's grace period: a worker whose Redis went in the same uninstall keeps
    # reconnecting in its warm shutdown until it is killed
    grace = GRACE_SECONDS + 60
    wait_for(lambda: not left(), grace, f"no pod left in {release.namespace}")
    assert release.kubectl("get", "clusterrole", f"{release.name}-mikrom-operator", check=False).returncode != 0
    assert release.kubectl("get", "validatingadmissionpolicy", f"{release.name}-mikrom-worker-own-node",
                           check=False).returncode != 0
    # the pre-delete hook removed the default IPPool while the operator could still release it
    assert release.kubectl("get", "ippool", "default", check=False).returncode != 0
    assert release.kubectl("get", "crd", "microvms.mikrom.io", check=False).returncode == 0, "CRDs stay"
    assert not _vmm_pids(release.state)
