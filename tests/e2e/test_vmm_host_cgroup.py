"""A VMM in a cgroup of its own under the host's cgroup root (worker/hostcgroup.py), with a real
QEMU microvm guest and this machine's real cgroups (v1 hierarchies plus v2 at `unified`).

Each test uses a parent group of its own (`mikrom-e2e-<random>`) and removes it, so nothing is
left in the host's hierarchies. "A pod" is imitated as a container runtime sees one: a cgroup in
every hierarchy, all of whose processes are SIGKILLed when it goes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from harness.waits import wait_for
from mikrom.worker import hostcgroup
from mikrom.worker.vmm import QemuDriver, VMSpec, running_pid

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates cgroups in the host's hierarchies"),
    pytest.mark.skipif(not Path("/sys/fs/cgroup").is_dir(), reason="no cgroup mount"),
]

ROOT = "/sys/fs/cgroup"
BOOT_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def parent():
    """A parent group of the test's own, removed (with anything left in it) afterwards."""
    name = f"mikrom-e2e-{uuid.uuid4().hex[:8]}"
    yield name
    for suffix in ("", "-pod"):
        for hier in hostcgroup.hierarchies(ROOT):
            top = hier.path / f"{name}{suffix}"
            if not top.exists():
                continue
            for group in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _kill_all(group)
                group.rmdir()
            _kill_all(top)
            top.rmdir()


@pytest.fixture
def state_root():
    """Short: a VM's unix sockets live under its state directory and must stay below 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mkcg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _kill_all(group: Path) -> None:
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not (group / "cgroup.procs").read_text().split(), timeout=10, what=f"{group} to empty")


def _spec(guest_image_dir: Path, state_root: Path, vcpus: int = 1, memory_mib: int = 128) -> VMSpec:
    uid = str(uuid.uuid4())
    return VMSpec(uid=uid, name="cg", vcpus=vcpus, memory_mib=memory_mib, kernel=str(guest_image_dir / "vmlinuz"),
                  initrd=str(guest_image_dir / "initrd.img"), kernel_args="console=ttyS0",
                  state_dir=state_root / uid)


def _cgroups(pid: int) -> dict[str, str]:
    return hostcgroup.parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_the_vmm_and_its_supervisor_run_in_their_own_capped_group_in_every_hierarchy(guest_image_dir, state_root,
                                                                                     parent):
    cfg = {"root": ROOT, "parent": parent, "memory_overhead_mib": 256}
    driver = QemuDriver(accel="tcg", host_cgroup=cfg)
    spec = _spec(guest_image_dir, state_root, vcpus=2, memory_mib=192)
    pid = driver.start(spec)
    try:
        driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
        supervisor = json.loads((spec.state_dir / "run.json").read_text())["supervisor_pid"]
        hierarchies = hostcgroup.hierarchies(ROOT)
        own = f"/{parent}/{spec.uid}"
        for who in (pid, supervisor):
            groups = _cgroups(who)
            assert len(groups) == len(hierarchies), groups
            assert set(groups.values()) == {own}, f"pid {who} is not in {own} everywhere: {groups}"
        cpu = Path(ROOT, "cpu", parent, spec.uid)
        memory = Path(ROOT, "memory", parent, spec.uid)
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "200000"
        assert int((memory / "memory.limit_in_bytes").read_text()) == (192 + 256) << 20
        assert int((memory / "memory.usage_in_bytes").read_text()) > 64 << 20, \
            "the guest's RAM is charged to the VM's own group"
        cpuset = Path(ROOT, "cpuset", parent, spec.uid)
        assert (cpuset / "cpuset.cpus").read_text().strip() == Path(ROOT, "cpuset", "cpuset.cpus").read_text().strip()
    finally:
        driver.stop(spec.state_dir, timeout=5)
    assert running_pid(spec.state_dir) is None
    for hier in hostcgroup.hierarchies(ROOT):
        assert not (hier.path / parent / spec.uid).exists(), f"{hier.path} keeps the stopped VM's group"


STARTER = """
import ctypes, json, os, sys
from mikrom.worker.vmm import QemuDriver, VMSpec
for path in json.loads(sys.argv[1]):
    with open(path, "w") as f:
        f.write("0")  # this process joins the "pod"
if sys.argv[4] == "unshare":
    # a cgroup namespace of its own, rooted at the pod's group, as a container on a v2 host has
    assert ctypes.CDLL(None, use_errno=True).unshare(0x02000000) == 0, os.strerror(ctypes.get_errno())
    assert open("/proc/self/cgroup").read().splitlines()[-1] == "0::/"
spec = VMSpec.from_dict(json.loads(sys.argv[2]))
driver = QemuDriver(accel="tcg", host_cgroup=json.loads(sys.argv[3]))
print(driver.start(spec), flush=True)
"""


def _start_inside_a_pod(pod_procs: list[Path], spec: VMSpec, host_cgroup: dict | None,
                        unshare_cgroupns: bool = False) -> int:
    argv = [sys.executable, "-c", STARTER, json.dumps([str(p) for p in pod_procs]),
            json.dumps(spec.to_dict()), json.dumps(host_cgroup), "unshare" if unshare_cgroupns else "-"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.strip().splitlines()[-1])


def _pod(parent: str) -> list[Path]:
    pod = hostcgroup.create(hostcgroup.HostCgroupConfig(root=ROOT, parent=f"{parent}-pod"), "worker",
                            vcpus=2, memory_mib=4096)
    return pod.procs


def _delete_pod(procs: list[Path]) -> None:
    for path in procs:
        _kill_all(path.parent)


@pytest.mark.parametrize("cgroupns", [False, True], ids=["host-cgroupns", "own-cgroupns"])
def test_a_vm_outlives_the_deletion_of_the_pod_that_started_it(guest_image_dir, state_root, parent, cgroupns):
    pod = _pod(parent)
    spec = _spec(guest_image_dir, state_root)
    # "The host's" cgroup namespace is this test's (pid 1's may be out of reach in a sandbox).
    cfg = {"root": ROOT, "parent": parent, "memory_overhead_mib": 256, "namespace": f"/proc/{os.getpid()}/ns/cgroup"}
    pid = _start_inside_a_pod(pod, spec, cfg, unshare_cgroupns=cgroupns)
    driver = QemuDriver(accel="tcg", host_cgroup=cfg)
    try:
        driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
        assert set(_cgroups(pid).values()) == {f"/{parent}/{spec.uid}"}, _cgroups(pid)
        if cgroupns:
            # The supervisor entered pid 1's cgroup namespace before joining: with cgroup2 mounted
            # `nsdelegate` (systemd's pure v2 hosts) a move out of the pod's namespace is refused.
            assert os.readlink(f"/proc/{pid}/ns/cgroup") == os.readlink("/proc/self/ns/cgroup")
        _delete_pod(pod)
        assert _alive(pid), "the VMM died with the pod"
        assert running_pid(spec.state_dir) == pid
    finally:
        driver.stop(spec.state_dir, timeout=5)


def test_without_a_host_cgroup_the_vm_dies_with_the_pod(guest_image_dir, state_root, parent):
    """The reason for all of the above: a detached VMM left in the pod's cgroup is killed with it."""
    pod = _pod(parent)
    spec = _spec(guest_image_dir, state_root)
    pid = _start_inside_a_pod(pod, spec, None)
    try:
        assert set(_cgroups(pid).values()) == {f"/{parent}-pod/worker"}
        _delete_pod(pod)
        wait_for(lambda: not _alive(pid), timeout=10, what="the VMM to die with its pod")
    finally:
        QemuDriver().stop(spec.state_dir, timeout=0)


def test_a_start_that_cannot_create_the_group_fails_naming_it_and_starts_nothing(guest_image_dir, state_root):
    driver = QemuDriver(accel="tcg", host_cgroup={"root": str(state_root / "no-cgroup-here"), "parent": "mikrom"})
    spec = _spec(guest_image_dir, state_root)
    from mikrom.worker.vmm import VMMStartFailed
    with pytest.raises(VMMStartFailed, match="no-cgroup-here"):
        driver.start(spec)
    assert running_pid(spec.state_dir) is None
