"""The Firecracker driver through `jailer`: the worker's settings switch it on, the jail holds what
the unprivileged VMM must open, and start, ready, stop and cleanup work through the jail.

The jailer here is tests/data/firecracker/standin_jailer.py (its docstring says what it leaves
out): it builds the jail directory, drops to the jail's uid:gid and answers Firecracker's API,
opening every file a request names as that uid. The requests it served are checked against
Firecracker's API specification. Needs root (chown, setuid), as the real jailer does: the e2e tier.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from harness.firecracker_api import load_api, validate_request
from mikrom.settings import Settings
from mikrom.worker import vmm
from mikrom.worker.locks import NodeLocks
from mikrom.worker.runtime import Runtime
from mikrom.worker.vmm import FirecrackerDriver, JailerConfig, VMIds, VMSpec, running_pid
from mikrom.worker.vmm.sandbox import recorded_ids

STANDIN = Path(__file__).resolve().parents[1] / "data" / "firecracker" / "standin_jailer.py"
JAIL_RANGE = {"uid_start": 64100, "uid_count": 100}
UID = "5f0c2d7e-1b2a-4c3d-9e8f-a0b1c2d3e4f5"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer (and its stand-in) needs root")


@pytest.fixture
def jailer(tmp_path) -> Path:
    path = tmp_path / "bin" / "jailer"
    path.parent.mkdir()
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -I {STANDIN} \"$@\"\n")
    path.chmod(0o755)
    return path


def make_files(tmp_path: Path, kernel_mode: int = 0o644) -> VMSpec:
    images = tmp_path / "images"
    images.mkdir()
    kernel = images / "vmlinux"
    kernel.write_bytes(b"\x7fELF kernel")
    kernel.chmod(kernel_mode)
    initrd = images / "initrd.img"
    initrd.write_bytes(b"initramfs")
    initrd.chmod(0o644)
    state = tmp_path / "vms" / UID
    state.mkdir(parents=True)
    rootfs = state / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    rootfs.chmod(0o644)  # the jail makes it 0600 and the VM uid's
    return VMSpec(uid=UID, name="jailed", vcpus=2, memory_mib=128, kernel=str(kernel), initrd=str(initrd),
                  rootfs=str(rootfs), kernel_args="console=ttyS0", state_dir=state)


def driver_for(tmp_path: Path, jailer: Path) -> FirecrackerDriver:
    return FirecrackerDriver(jailer=JailerConfig(binary=str(jailer), chroot_base=str(tmp_path / "srv")),
                             sandbox=JAIL_RANGE)


def jail_ids(spec: VMSpec) -> VMIds:
    """The VM's uid/gid, as recorded in its state directory when it started."""
    ids = recorded_ids(spec.state_dir)
    assert ids and 64100 <= ids.uid < 64200 and ids.gid == ids.uid
    return ids


def proc_ids(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])


def test_a_jailed_vm_starts_unprivileged_with_chroot_paths_and_leaves_nothing_behind(tmp_path, jailer):
    driver = driver_for(tmp_path, jailer)
    spec = make_files(tmp_path)
    kernel_stat = os.stat(spec.kernel)
    pid = driver.start(spec)
    try:
        assert driver.wait_ready(spec, timeout=20) < 20
        jail = tmp_path / "srv" / "firecracker" / UID
        root = jail / "root"
        ids = jail_ids(spec)
        assert proc_ids(pid) == (ids.uid, ids.gid), "the VMM runs as the VM's own uid:gid"
        assert driver.api_socket(spec) == root / "run" / "firecracker.socket"
        assert stat.S_ISSOCK(os.stat(driver.api_socket(spec)).st_mode)

        # The shared kernel is hard-linked, not chowned in place; the VM's rootfs belongs to the jail.
        assert os.stat(root / "kernel").st_ino == kernel_stat.st_ino
        assert (os.stat(spec.kernel).st_uid, os.stat(spec.kernel).st_mode) == (kernel_stat.st_uid, kernel_stat.st_mode)
        assert os.stat(root / "rootfs").st_ino == os.stat(spec.rootfs).st_ino
        assert os.stat(spec.rootfs).st_uid == ids.uid and stat.S_IMODE(os.stat(spec.rootfs).st_mode) == 0o600

        record = json.loads((jail / "standin.json").read_text())
        argv = record["argv"]
        assert (argv[argv.index("--uid") + 1], argv[argv.index("--gid") + 1]) == (str(ids.uid), str(ids.gid))
        assert argv[argv.index("--cgroup-version") + 1] == "2"
        assert record["cgroup"] == ["cpu.max=200000 100000", f"memory.max={(128 + 64) << 20}"]
        api = load_api()
        paths = []
        for req in record["requests"]:
            validate_request(api, req["method"], req["path"], req["body"])
            paths.append(req["path"])
        assert paths == ["/boot-source", "/machine-config", "/drives/rootfs", "/actions"]
        boot = record["requests"][0]["body"]
        assert (boot["kernel_image_path"], boot["initrd_path"]) == ("/kernel", "/initrd")
        assert driver.start(spec) == pid, "starting a running VM returns the running one"
    finally:
        driver.stop(spec.state_dir, timeout=5)
    assert running_pid(spec.state_dir) is None
    assert not (tmp_path / "srv" / "firecracker" / UID).exists(), "the jail goes with the VMM"
    assert Path(spec.kernel).exists() and Path(spec.rootfs).exists()
    assert json.loads((Path(spec.state_dir) / "exit.json").read_text())["returncode"] == 0, \
        "stopped by Ctrl-Alt-Del, not killed"


def test_a_kernel_only_root_can_read_is_copied_into_the_jail_for_the_vmm(tmp_path, jailer):
    driver = driver_for(tmp_path, jailer)
    spec = make_files(tmp_path, kernel_mode=0o600)
    driver.start(spec)
    try:
        assert driver.wait_ready(spec, timeout=20) < 20
        jailed_kernel = tmp_path / "srv" / "firecracker" / UID / "root" / "kernel"
        assert os.stat(jailed_kernel).st_ino != os.stat(spec.kernel).st_ino
        # readable by the VM's group alone, and nobody's to change
        jailed = os.stat(jailed_kernel)
        assert (jailed.st_uid, jailed.st_gid, stat.S_IMODE(jailed.st_mode)) == (0, jail_ids(spec).gid, 0o440)
        assert os.stat(spec.kernel).st_uid == 0 and stat.S_IMODE(os.stat(spec.kernel).st_mode) == 0o600
    finally:
        driver.stop(spec.state_dir, timeout=5)


def test_a_file_the_jailed_vmm_cannot_open_fails_the_start_with_firecrackers_message(tmp_path, jailer):
    driver = driver_for(tmp_path, jailer)
    spec = make_files(tmp_path)
    real_populate = driver._populate_jail

    def populate_then_take_the_rootfs_back(s):
        real_populate(s)
        os.chown(s.rootfs, 0, 0)

    driver._populate_jail = populate_then_take_the_rootfs_back
    with pytest.raises(vmm.VMMStartFailed, match=r"/drives/rootfs answered 400: .*Cannot open /rootfs"):
        driver.start(spec)
    assert running_pid(spec.state_dir) is None
    driver.stop(spec.state_dir, timeout=5)


def test_the_worker_settings_switch_the_jailer_on_for_firecracker_only(tmp_path, jailer):
    off = Runtime(Settings(state_dir=str(tmp_path)), NodeLocks(tmp_path / "locks"))
    assert "jailer" not in off.driver_configs()["firecracker"]
    assert off.tap_owner("firecracker", off.local(UID)) is None

    on = Runtime(Settings(state_dir=str(tmp_path), jailer_binary=str(jailer), vm_uid_range_start=64100,
                          vm_uid_range_size=100, jailer_chroot_base=str(tmp_path / "srv"),
                          firecracker_binary="/opt/fc/firecracker"), NodeLocks(tmp_path / "locks"))
    spec = make_files(tmp_path)
    # The tap is made before the VMM starts, for the uid the VM's jail will have.
    owner = on.tap_owner("firecracker", on.local(UID))
    assert owner == jail_ids(spec).uid
    assert on.tap_owner("qemu", on.local(UID)) is None
    driver = vmm.get_driver("firecracker", sandbox=on.sandbox_config(), **on.driver_configs()["firecracker"])
    argv = driver.command(spec)
    assert argv[argv.index("--uid") + 1] == str(owner)
    assert argv[0] == str(jailer)
    assert argv[argv.index("--exec-file") + 1] == "/opt/fc/firecracker"
    assert argv[argv.index("--chroot-base-dir") + 1] == str(tmp_path / "srv")
    # A restarted worker rebuilds the driver from the config saved in vm.json: the same jail.
    again = vmm.get_driver("firecracker", **json.loads(json.dumps(driver.config())))
    assert again.command(spec) == argv
