"""The VMM sandbox on real QEMU guests (TCG): what the kernel says about the running VMM process
(/proc/<pid>/status and environ), with the driver alone and with `mikrom worker`.

Each VM's QEMU must run as the VM's own unprivileged uid/gid (none of root's groups), under a
seccomp filter (`Seccomp: 2`, from `-sandbox`) with no_new_privs, and with none of the worker's
environment (which holds the broker URL with its password). The VM must still boot, answer ping,
stop through QMP and restart as the same uid. Bridges, taps and VMMs live in network namespaces
the tests create; the only traffic is a ping into them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from harness.netns import ping
from harness.vms import e2e_skip_reason, vmm_pids
from mikrom.worker import netdev
from mikrom.worker.vmm import QemuDriver, VMSpec, restart_from_saved, running_pid
from mikrom.worker.vmm.sandbox import recorded_ids

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

BOOT_TIMEOUT = 60.0
BRIDGE = "mkbr0"
GATEWAY = "10.232.0.1"
PREFIX = 24
SECRET_URL = "redis://:do-not-leak@127.0.0.1:1/0"


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


def assert_sandboxed(pid: int, uid: int, gid: int) -> None:
    status = proc_status(pid)
    assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
    assert status["Groups"] == "", "none of root's supplementary groups"
    assert status["Seccomp"] == "2", "QEMU's -sandbox installs a seccomp filter"
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    env = proc_environ(pid)
    assert not [k for k in env if k.startswith("MIKROM_")], sorted(env)
    assert set(env) <= {"PATH", "LANG"}, sorted(env)


@pytest.fixture
def network(netns):
    netdev.ensure_bridge(BRIDGE, f"{GATEWAY}/{PREFIX}", netns=netns)
    return netns


@pytest.fixture
def vms_dir():
    """A short VM directory: QMP sockets live in it and unix socket paths stop at 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mks-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stopper():
    """Stops every VM a test started, whatever happened in the test."""
    dirs: list[Path] = []
    yield dirs
    for state in dirs:
        QemuDriver().stop(state, timeout=0)


def make_spec(kernel: Path, initrd: Path, vms_dir: Path, netns: str, host: int) -> VMSpec:
    uid = str(uuid.uuid4())
    tap = netdev.tap_name_for_uid(uid)
    netdev.ensure_tap(tap, BRIDGE, netns=netns)  # root's: QEMU gets it as a descriptor
    return VMSpec(uid=uid, name=f"vm-{host}", vcpus=1, memory_mib=128, kernel=str(kernel), initrd=str(initrd),
                  kernel_args=netdev.kernel_ip_arg(f"10.232.0.{host}", GATEWAY, PREFIX), tap=tap,
                  mac=netdev.mac_for_uid(uid), state_dir=vms_dir / uid, netns=netns)


def test_each_qemu_runs_as_its_vms_own_uid_under_seccomp_without_the_workers_environment(
        guest_image_dir, network, vms_dir, stopper, monkeypatch):
    # What a worker holds in its environment must not reach the VMM or its supervisor.
    monkeypatch.setenv("MIKROM_BROKER_URL", SECRET_URL)
    driver = QemuDriver(accel="tcg")
    specs = [make_spec(guest_image_dir / "vmlinuz", guest_image_dir / "initrd.img", vms_dir, network, h)
             for h in (2, 3)]
    stopper.extend(s.state_dir for s in specs)
    pids = [driver.start(s) for s in specs]
    for spec in specs:
        driver.wait_ready(spec, timeout=BOOT_TIMEOUT)

    ids = [recorded_ids(s.state_dir) for s in specs]
    assert ids[0].uid != ids[1].uid, "two VMs never share a uid"
    for pid, spec, vm in zip(pids, specs, ids):
        assert 200000 <= vm.uid < 200000 + 65536
        assert_sandboxed(pid, vm.uid, vm.gid)
        supervisor = json.loads((spec.state_dir / "run.json").read_text())["supervisor_pid"]
        assert not [k for k in proc_environ(supervisor) if k.startswith("MIKROM_")]
        # The VMM's own files stay root's: it was handed descriptors, not the state dir.
        assert all(p.stat().st_uid == 0 for p in spec.state_dir.iterdir())
    assert ping(network, "10.232.0.2").returncode == 0
    assert ping(network, "10.232.0.3").returncode == 0

    # QMP (the bound socket QEMU was handed) still stops the guest politely...
    first = specs[0]
    driver.stop(first.state_dir, timeout=30)
    assert "MIKROM-POWEROFF" in (first.state_dir / "console.log").read_text()
    assert json.loads((first.state_dir / "exit.json").read_text())["returncode"] == 0
    # ...and a restart from vm.json runs as the same uid, reachable again.
    pid = restart_from_saved(first.state_dir)
    driver.wait_ready(first, timeout=BOOT_TIMEOUT)
    assert_sandboxed(pid, ids[0].uid, ids[0].gid)
    assert ping(network, "10.232.0.2").returncode == 0
    for spec in specs:
        driver.stop(spec.state_dir, timeout=30)
        assert running_pid(spec.state_dir) is None


def test_a_kernel_only_root_may_read_boots_from_a_copy_for_the_vms_group_alone(guest_image_dir, network,
                                                                             tmp_path, vms_dir, stopper):
    images = tmp_path / "images"
    images.mkdir()
    kernel = images / "vmlinuz"
    shutil.copyfile(guest_image_dir / "vmlinuz", kernel)  # a copy: the shared cache keeps its mode
    kernel.chmod(0o600)
    before = os.stat(kernel)
    spec = make_spec(kernel, guest_image_dir / "initrd.img", vms_dir, network, 4)
    stopper.append(spec.state_dir)
    driver = QemuDriver(accel="tcg")
    pid = driver.start(spec)
    driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
    vm = recorded_ids(spec.state_dir)
    assert_sandboxed(pid, vm.uid, vm.gid)
    copy = os.stat(spec.state_dir / "kernel")
    assert (copy.st_uid, copy.st_gid, copy.st_mode & 0o777) == (0, vm.gid, 0o440)
    after = os.stat(kernel)
    assert (after.st_uid, after.st_gid, after.st_mode, after.st_ino) == \
        (before.st_uid, before.st_gid, before.st_mode, before.st_ino), "the source is never changed"
    driver.stop(spec.state_dir, timeout=30)


def test_a_vm_the_worker_starts_runs_sandboxed_and_keeps_its_uid_when_the_worker_restarts(
        fleet, make_worker, netns, guest_image_dir):
    worker = make_worker(netns=netns, image_dir=guest_image_dir)
    assert worker.env["MIKROM_BROKER_URL"].count("@"), "the worker's environment holds the broker's password"
    fleet.node = worker.node
    fleet.create("sandboxed")
    st = fleet.wait_phase("sandboxed", "Running", timeout=90, avoid=("Failed",))
    uid = fleet.get("sandboxed")["metadata"]["uid"]
    vm = recorded_ids(worker.vms_dir / uid)
    assert vm and vm.uid >= 200000
    assert_sandboxed(st["pid"], vm.uid, vm.gid)
    assert ping(netns, st["ipAddress"]).returncode == 0

    # a new worker adopts the running VM as it is
    worker.kill()
    worker.start()
    assert vmm_pids(worker.state_dir, uid) == [st["pid"]]
    assert_sandboxed(st["pid"], vm.uid, vm.gid)
    fleet.patch("sandboxed", {"spec": {"runStrategy": "Halted"}})
    fleet.wait_phase("sandboxed", "Stopped", timeout=60, avoid=("Failed",))
    fleet.patch("sandboxed", {"spec": {"runStrategy": "Always"}})
    st = fleet.wait_phase("sandboxed", "Running", timeout=90, avoid=("Failed",))
    assert_sandboxed(st["pid"], vm.uid, vm.gid)
