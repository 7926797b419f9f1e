"""The VMM sandbox as data: QEMU's command line and what the supervisor hands it (seccomp policy,
descriptors instead of paths, the uid it drops to), the per-VM uid allocator, the VMM's
environment, and the settings that switch each part. The processes themselves (a real QEMU's
/proc/<pid>/status and environ) are checked in tests/e2e/test_vmm_sandbox.py."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from mikrom.settings import Settings
from mikrom.worker import vmm
from mikrom.worker.locks import NodeLocks
from mikrom.worker.runtime import Runtime
from mikrom.worker.vmm import QemuDriver, SandboxConfig, SandboxUnavailable, VMSpec, claim_ids, sandbox
from mikrom.worker.vmm.base import Driver, LaunchPlan
from mikrom.worker.vmm.sandbox import recorded_ids

POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
UID = "6a1e0b4c-2d3f-4e5a-8b9c-0d1e2f3a4b5c"


def make_spec(tmp_path: Path, uid: str = UID, tap: str | None = "mk0123456789ab") -> VMSpec:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "vmlinuz").write_bytes(b"kernel")
    (images / "initrd.img").write_bytes(b"initrd")
    state = tmp_path / "vms" / uid
    state.mkdir(parents=True)
    (state / "rootfs.img").write_bytes(b"\0" * 512)
    return VMSpec(uid=uid, name="sandboxed", vcpus=1, memory_mib=128, kernel=str(images / "vmlinuz"),
                  initrd=str(images / "initrd.img"), rootfs=str(state / "rootfs.img"), tap=tap,
                  mac="02:00:00:00:00:01", state_dir=state, netns="mkt-test")


def option(argv: list[str], name: str) -> list[str]:
    """Every value given to `name` on the command line."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


# ------------------------------------------------------------------------------------ QEMU

def test_qemu_runs_under_the_seccomp_filter_as_the_vms_own_uid_without_runas(tmp_path):
    driver = QemuDriver(accel="tcg", sandbox={"uid_start": 300000, "uid_count": 1000})
    spec = make_spec(tmp_path)
    plan = driver.launch_plan(spec)
    assert option(plan.argv, "-sandbox") == [POLICY]
    # QEMU's own -runas needs setuid(), which the filter denies: the supervisor drops instead.
    assert "-runas" not in plan.argv and "-run-with" not in plan.argv
    ids = recorded_ids(spec.state_dir)
    assert plan.run_as == ids and 300000 <= ids.uid < 301000 and ids.gid == ids.uid
    assert plan.groups == [], "under TCG the VMM needs no group, not even root's"
    assert plan.netns == "mkt-test" and plan.argv[0] == "qemu-system-x86_64", "no `ip netns exec` as root"
    assert plan.supervisor_args()[:6] == ["--netns", "mkt-test", "--run-as", f"{ids.uid}:{ids.gid}", "--groups", ""]


def test_qemu_opens_no_path_itself_every_file_tap_and_socket_is_a_descriptor(tmp_path):
    driver = QemuDriver(accel="tcg")
    spec = make_spec(tmp_path)
    plan = driver.launch_plan(spec)
    state = Path(spec.state_dir).resolve()
    fds = {number: (kind, arg) for number, kind, arg in plan.fds}
    assert sorted(kind for kind, _ in fds.values()) == ["listen", "rdwr", "read", "read", "read", "tap"]
    assert all(number >= 100 for number in fds), "clear of the supervisor's own descriptors"

    kernel = int(option(plan.argv, "-kernel")[0].removeprefix("/proc/self/fd/"))
    initrd = int(option(plan.argv, "-initrd")[0].removeprefix("/proc/self/fd/"))
    assert fds[kernel] == ("read", spec.kernel) and fds[initrd] == ("read", spec.initrd)
    chardev = option(plan.argv, "-chardev")[0]
    qmp = int(chardev.split("fd=")[1].split(",")[0])
    assert fds[qmp] == ("listen", str(state / "qmp.sock")) and option(plan.argv, "-qmp") == []
    tap = option(plan.argv, "-netdev")[0]
    assert tap.startswith("tap,id=n0,fd=") and "ifname" not in tap and "script" not in tap
    assert fds[int(tap.split("fd=")[1])] == ("tap", spec.tap)
    # The disk is an fd set of a read-write and a read-only descriptor of the VM's own copy.
    disk = [dict(kv.split("=", 1) for kv in a.split(",")) for a in option(plan.argv, "-add-fd")]
    assert {fds[int(d["fd"])] for d in disk} == {("rdwr", spec.rootfs), ("read", spec.rootfs)}
    assert {d["set"] for d in disk} == {"1"} and "file=/dev/fdset/1" in option(plan.argv, "-drive")[0]
    # No path QEMU would open as the VM's uid; the name ties the process to its state dir.
    for arg in plan.argv:
        assert spec.kernel not in arg and spec.initrd not in arg
    assert option(plan.argv, "-name") == [f"guest={state}/"]


def test_seccomp_and_the_uid_drop_can_each_be_switched_off(tmp_path):
    spec = make_spec(tmp_path)
    plain = QemuDriver(accel="tcg", sandbox={"seccomp": False}).launch_plan(spec)
    assert "-sandbox" not in plain.argv and plain.run_as is not None
    root = QemuDriver(accel="tcg", sandbox={"unprivileged": False}).launch_plan(spec)
    assert option(root.argv, "-sandbox") == [POLICY] and root.run_as is None
    assert "--run-as" not in root.supervisor_args()


@pytest.mark.parametrize("mode, gid, groups", [(0o666, 0, []), (0o660, 108, [108])])
def test_dev_kvm_is_reached_through_its_group_or_as_anyone(mode, gid, groups):
    assert sandbox.groups_for_device(0o20000 | mode, gid) == groups


@pytest.mark.parametrize("mode, gid", [(0o600, 0), (0o660, 0), (0o640, 108)])
def test_a_dev_kvm_only_root_may_use_refuses_an_unprivileged_qemu_naming_the_way_out(mode, gid):
    with pytest.raises(SandboxUnavailable, match="MIKROM_VMM_UNPRIVILEGED"):
        sandbox.groups_for_device(0o20000 | mode, gid)


# ------------------------------------------------------------------------------------ uid allocator

def state(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "vms" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_vm_keeps_the_uid_recorded_in_its_state_dir_across_restarts(tmp_path):
    config = SandboxConfig(uid_start=400000, uid_count=5000)
    first = claim_ids(state(tmp_path, "vm-a"), config)
    assert json.loads((tmp_path / "vms" / "vm-a" / "sandbox.json").read_text()) == {"uid": first.uid, "gid": first.gid}
    assert claim_ids(state(tmp_path, "vm-a"), config) == first
    # the same VM on another node (another VM directory) starts from the same place: deterministic
    assert claim_ids(state(tmp_path / "other", "vm-a"), config) == first


def test_vms_whose_hashes_collide_still_get_different_uids_until_the_range_is_full(tmp_path):
    config = SandboxConfig(uid_start=400000, uid_count=2)
    a = claim_ids(state(tmp_path, "vm-a"), config)
    b = claim_ids(state(tmp_path, "vm-b"), config)
    assert a != b and {a.uid, b.uid} == {400000, 400001}
    with pytest.raises(SandboxUnavailable, match="no free VM uid left in 400000..400001"):
        claim_ids(state(tmp_path, "vm-c"), config)
    shutil.rmtree(tmp_path / "vms" / "vm-a")  # a deleted VM frees its uid
    assert claim_ids(state(tmp_path, "vm-c"), config) == a


def test_vms_claiming_at_the_same_time_never_share_a_uid(tmp_path):
    config = SandboxConfig(uid_start=400000, uid_count=16)
    got: dict[str, int] = {}

    def claim(name: str) -> None:
        got[name] = claim_ids(state(tmp_path, name), config).uid

    threads = [threading.Thread(target=claim, args=(f"vm-{n}",)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 16 and sorted(got.values()) == list(range(400000, 400016))


def test_a_recorded_uid_another_vm_records_or_outside_the_range_is_replaced(tmp_path):
    config = SandboxConfig(uid_start=400000, uid_count=1000)
    a = claim_ids(state(tmp_path, "vm-a"), config)
    (state(tmp_path, "vm-b") / "sandbox.json").write_text(json.dumps({"uid": a.uid, "gid": a.gid}))
    b = claim_ids(tmp_path / "vms" / "vm-b", config)
    assert b != a and recorded_ids(tmp_path / "vms" / "vm-b") == b
    narrower = SandboxConfig(uid_start=500000, uid_count=10)
    assert 500000 <= claim_ids(tmp_path / "vms" / "vm-a", narrower).uid < 500010


def test_a_new_uid_is_never_one_a_live_process_or_a_local_account_has(tmp_path, monkeypatch):
    config = SandboxConfig(uid_start=400000, uid_count=3)
    monkeypatch.setattr(sandbox, "_live_uids", lambda: {400000})
    monkeypatch.setattr(sandbox, "_local_accounts", lambda: {400001})
    assert claim_ids(state(tmp_path, "vm-a"), config).uid == 400002


def test_the_local_accounts_are_read_from_the_files_and_include_root():
    assert 0 in sandbox._local_accounts()


def test_a_uid_range_reaching_root_or_past_the_largest_uid_is_refused():
    for start, count in ((0, 10), (4294967290, 10), (1000, 0)):
        with pytest.raises(ValueError, match="VM uid range"):
            SandboxConfig(uid_start=start, uid_count=count)


# ------------------------------------------------------------------------------------ environment

def test_the_vmm_environment_is_path_and_lang_only():
    worker = {"PATH": "/usr/bin:/bin", "MIKROM_BROKER_URL": "redis://:secret@redis:6379/0",
              "KUBECONFIG": "/etc/kube", "HOME": "/root", "LANG": "de_DE.UTF-8", "LD_PRELOAD": "/x.so"}
    assert sandbox.vmm_environment(worker) == {"PATH": "/usr/bin:/bin", "LANG": "C"}
    assert sandbox.vmm_environment({})["PATH"] == sandbox.DEFAULT_PATH


# ------------------------------------------------------------------------------------ settings

def test_the_worker_settings_set_the_sandbox_and_a_restart_keeps_it(tmp_path):
    settings = Settings(state_dir=str(tmp_path), vm_uid_range_start=700000, vm_uid_range_size=42,
                        vmm_seccomp=False, vmm_unprivileged=True)
    runtime = Runtime(settings, NodeLocks(tmp_path / "locks"))
    assert runtime.sandbox_config() == SandboxConfig(uid_start=700000, uid_count=42, seccomp=False,
                                                     unprivileged=True)
    driver = vmm.get_driver("qemu", sandbox=runtime.sandbox_config(), **runtime.driver_configs()["qemu"])
    saved = json.loads(json.dumps(driver.config()))
    assert saved["sandbox"] == {"uid_start": 700000, "uid_count": 42, "seccomp": False, "unprivileged": True}
    again = vmm.get_driver("qemu", **saved)
    assert again.sandbox == driver.sandbox
    assert Settings().vm_uid_range_start == 200000 and Settings().vm_uid_range_size == 65536
    assert Settings().vmm_seccomp and Settings().vmm_unprivileged


def test_the_writable_disk_must_be_the_vms_own_copy_never_a_shared_image(tmp_path):
    spec = make_spec(tmp_path)
    spec.rootfs = spec.initrd  # a shared image from the image directory
    with pytest.raises(vmm.VMMStartFailed, match="not the VM's own copy"):
        QemuDriver(accel="tcg").start(spec)
    assert not (Path(spec.state_dir) / "vm.json").exists()


# ------------------------------------------------------------------------------------ the supervisor

_VMM = """
import os, sys, time
print("got", os.read(100, 64).decode(), flush=True)
# what it was started with (Python itself may add LC_CTYPE to os.environ afterwards)
start_env = open("/proc/self/environ", "rb").read().split(b"\\0")
print("env", ",".join(sorted(v.split(b"=")[0].decode() for v in start_env if v)), flush=True)
print("MIKROM-READY", flush=True)
time.sleep(60)
"""


class PassingDriver(Driver):
    """A Python "VMM" handed one file as descriptor 100; its argv names the state dir."""

    name = "passing"

    def __init__(self, passed: Path, **kwargs):
        super().__init__(**kwargs)
        self.passed = passed

    def available(self):
        return True

    def launch_plan(self, spec):
        plan = LaunchPlan(argv=[sys.executable, "-c", _VMM, f"{Path(spec.state_dir).resolve()}/vmm"])
        plan.pass_fd("read", self.passed)
        return plan


def test_the_vmm_reads_what_it_is_handed_and_gets_none_of_the_callers_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MIKROM_BROKER_URL", "redis://:secret@127.0.0.1:1/0")
    monkeypatch.setenv("KUBECONFIG", "/etc/kubeconfig")
    passed = tmp_path / "handed.txt"
    passed.write_text("handed over")
    driver = PassingDriver(passed)
    spec = VMSpec(uid="uid-passing", name="passing", vcpus=1, memory_mib=64, kernel=str(passed),
                  state_dir=tmp_path / "vm")
    driver.start(spec)
    try:
        driver.wait_ready(spec, timeout=20)
        console = (spec.state_dir / "console.log").read_text()
        assert "got handed over" in console
        assert "env LANG,PATH\n" in console, console
    finally:
        driver.stop(spec.state_dir, timeout=0)


def test_a_fifo_where_a_file_should_be_fails_the_start_at_once(tmp_path):
    fifo = tmp_path / "not-a-file"
    os.mkfifo(fifo)
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k")
    spec = VMSpec(uid="uid-fifo", name="fifo", vcpus=1, memory_mib=64, kernel=str(kernel), state_dir=tmp_path / "vm")
    t0 = time.monotonic()
    with pytest.raises(vmm.VMMStartFailed, match="not-a-file for the VMM: not a regular file"):
        PassingDriver(fifo).start(spec)
    assert time.monotonic() - t0 < 10
