"""The worker's pod shape on the real node: privileged, hostPID, hostNetwork, from the built worker
image. It sees the host's /dev/kvm and /dev/net/tun, and the worker's own QEMU driver boots the
test guest (TCG) inside it, from the guest image mounted by hostPath."""

from __future__ import annotations

import os
import uuid

import pytest

from harness import cluster_pods

BOOT = """
import json, uuid
from pathlib import Path
from mikrom.worker.vmm import QemuDriver, VMSpec
spec = VMSpec(uid=str(uuid.uuid4()), name="in-pod", vcpus=1, memory_mib=128, kernel="/images/vmlinuz",
              initrd="/images/initrd.img", state_dir="/tmp/vm")
driver = QemuDriver(accel="tcg")
pid = driver.start(spec)
try:
    seconds = driver.wait_ready(spec, timeout=90)
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
finally:
    driver.stop(spec.state_dir, timeout=20)
print(json.dumps({"pid": pid, "seconds": seconds, "cgroup": cgroup,
                  "console": Path("/tmp/vm/console.log").read_text(errors="replace")[-3000:]}))
"""


@pytest.fixture(scope="module")
def worker_pod(cluster, guest_image_dir):
    ns = "ct-wk-" + uuid.uuid4().hex[:6]
    cluster.kubectl("create", "namespace", ns)
    spec = cluster_pods.sleeper(
        "worker", cluster.images["worker"]["ref"], hostPID=True, hostNetwork=True,
        container={"securityContext": {"privileged": True},
                   "volumeMounts": [{"name": "images", "mountPath": "/images", "readOnly": True}]},
        volumes=[{"name": "images", "hostPath": {"path": str(guest_image_dir), "type": "Directory"}}])
    cluster_pods.apply(cluster, ns, [spec])
    cluster_pods.wait_ready(cluster, ns, "worker")
    yield ns
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_worker_pod_sees_the_hosts_kvm_and_tun_devices(cluster, worker_pod):
    out = cluster_pods.exec_in(cluster, worker_pod, "worker", "stat", "-c", "%n %F %t:%T", "/dev/kvm",
                               "/dev/net/tun").stdout.split("\n")
    host = [f"{p} character special file {os.major(os.stat(p).st_rdev):x}:{os.minor(os.stat(p).st_rdev):x}"
            for p in ("/dev/kvm", "/dev/net/tun")]
    assert out[:2] == host


def test_the_worker_pod_shares_the_hosts_pids_and_the_nodes_network(cluster, worker_pod):
    out = cluster_pods.python_in(cluster, worker_pod, "worker", (
        "import json, os; print(json.dumps({'pid1': open('/proc/1/cmdline').read(), "
        "'net': os.readlink('/proc/self/ns/net')}))"))
    assert out["pid1"] == open("/proc/1/cmdline").read()
    assert out["net"] == f"net:[{os.stat(cluster.layout.netns_path).st_ino}]"


def test_the_worker_pod_boots_the_test_guest_with_qemu(cluster, worker_pod, record_property):
    out = cluster_pods.python_in(cluster, worker_pod, "worker", BOOT, timeout=180)
    record_property("boot_seconds", round(out["seconds"], 3))
    assert "MIKROM-READY" in out["console"]
    # the VMM ran in the pod: in a container cgroup under kubelet's cgroup root
    assert f"{cluster.layout.cgroup_root}/kubepods" in out["cgroup"], out["cgroup"]
    assert not os.path.exists(f"/proc/{out['pid']}/cmdline") or b"qemu" not in open(
        f"/proc/{out['pid']}/cmdline", "rb").read()
