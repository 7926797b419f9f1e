"""What a jailed Firecracker finds in its chroot: each file named by its role, shared images
read-only and untouched, the VM's own disk the only file handed to the VM's uid.

The jailer is tests/data/firecracker/standin_jailer.py (see its docstring): it drops to the VM's
uid:gid and opens every file a request names, as Firecracker would, recording the inode and
whether it opened it writable. Needs root (chown, setuid), as the real jailer does.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from mikrom.worker.vmm import FirecrackerDriver, JailerConfig, VMMStartFailed, VMSpec
from mikrom.worker.vmm.sandbox import recorded_ids

STANDIN = Path(__file__).resolve().parents[1] / "data" / "firecracker" / "standin_jailer.py"
UID = "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer (and its stand-in) needs root")


@pytest.fixture
def driver(tmp_path) -> FirecrackerDriver:
    jailer = tmp_path / "bin" / "jailer"
    jailer.parent.mkdir()
    jailer.write_text(f"#!/bin/sh\nexec {sys.executable} -I {STANDIN} \"$@\"\n")
    jailer.chmod(0o755)
    drv = FirecrackerDriver(jailer=JailerConfig(binary=str(jailer), chroot_base=str(tmp_path / "srv")),
                            sandbox={"uid_start": 64300, "uid_count": 100})
    yield drv
    drv.stop(tmp_path / "vms" / UID, timeout=5)


def opened(tmp_path: Path) -> dict[str, dict]:
    record = json.loads((tmp_path / "srv" / "firecracker" / UID / "standin.json").read_text())
    return {o["path"]: o for o in record["opened"]}


def writable_by(uid: int, gid: int, directory: Path, name: str) -> bool:
    """Whether `uid`:`gid` may open directory/name for writing (the directory is entered as root
    first: the test's own directories above the jail are not the VM's to traverse)."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                os.close(os.open(name, os.O_RDWR, dir_fd=dir_fd))
                os._exit(0)
            except PermissionError:
                os._exit(1)
            except BaseException:  # noqa: BLE001 - anything else is a broken test, not an answer
                os._exit(2)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(dir_fd)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"probe failed ({code})"
    return code == 0


def test_an_initrd_named_like_the_rootfs_neither_replaces_the_disk_nor_becomes_writable(tmp_path, driver):
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\x7fELF kernel")
    shared = images / "rootfs.img"  # a shared image used as the initrd, named like the VM's disk
    shared.write_bytes(b"shared initramfs")
    shared.chmod(0o644)
    before = os.stat(shared)
    state = tmp_path / "vms" / UID
    state.mkdir(parents=True)
    disk = state / "rootfs.img"  # the VM's own copy, as images.prepare_rootfs names it
    disk.write_bytes(b"\0" * 4096)
    spec = VMSpec(uid=UID, name="collide", vcpus=1, memory_mib=128, kernel=str(images / "vmlinux"),
                  initrd=str(shared), rootfs=str(disk), state_dir=state)

    driver.start(spec)
    assert driver.wait_ready(spec, timeout=20) < 20
    ids = recorded_ids(state)
    root = tmp_path / "srv" / "firecracker" / UID / "root"
    files = opened(tmp_path)

    # The VMM's disk is the VM's own copy, opened writable; the initrd is the shared image, read-only.
    assert files["/rootfs"]["ino"] == os.stat(disk).st_ino and files["/rootfs"]["writable"]
    assert files["/initrd"]["ino"] == os.stat(root / "initrd").st_ino and not files["/initrd"]["writable"]
    assert (root / "initrd").read_bytes() == b"shared initramfs"
    assert sorted(p.name for p in root.iterdir()) == ["initrd", "kernel", "rootfs", "run"]

    # The shared image is not chowned, not re-moded and not writable by the VM's uid, in the jail or out.
    after = os.stat(shared)
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (before.st_uid, before.st_gid, 0o644)
    assert shared.read_bytes() == b"shared initramfs"
    jailed = os.stat(root / "initrd")
    assert jailed.st_uid == 0 and not jailed.st_mode & 0o022
    assert not writable_by(ids.uid, ids.gid, root, "initrd")
    assert not writable_by(ids.uid, ids.gid, root, "kernel")
    # Only the VM's own disk is the VM's.
    assert os.stat(disk).st_uid == ids.uid and stat.S_IMODE(os.stat(disk).st_mode) == 0o600
    assert writable_by(ids.uid, ids.gid, root, "rootfs")


def test_a_shared_image_writable_by_others_is_copied_read_only_not_linked(tmp_path, driver):
    images = tmp_path / "images"
    images.mkdir()
    kernel = images / "vmlinux"
    kernel.write_bytes(b"\x7fELF kernel")
    kernel.chmod(0o666)  # a careless image directory: a link would let the VM's uid rewrite it
    state = tmp_path / "vms" / UID
    state.mkdir(parents=True)
    spec = VMSpec(uid=UID, name="careless", vcpus=1, memory_mib=128, kernel=str(kernel), state_dir=state)
    driver.start(spec)
    assert driver.wait_ready(spec, timeout=20) < 20
    jailed = os.stat(tmp_path / "srv" / "firecracker" / UID / "root" / "kernel")
    assert jailed.st_ino != os.stat(kernel).st_ino
    assert (jailed.st_uid, stat.S_IMODE(jailed.st_mode)) == (0, 0o444)
    assert stat.S_IMODE(os.stat(kernel).st_mode) == 0o666


def test_a_rootfs_outside_the_vms_state_dir_is_refused_before_anything_is_chowned(tmp_path, driver):
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\x7fELF kernel")
    shared = images / "disk.img"
    shared.write_bytes(b"\0" * 4096)
    shared.chmod(0o644)
    state = tmp_path / "vms" / UID
    state.mkdir(parents=True)
    spec = VMSpec(uid=UID, name="shared-disk", vcpus=1, memory_mib=128, kernel=str(images / "vmlinux"),
                  rootfs=str(shared), state_dir=state)
    with pytest.raises(VMMStartFailed, match="not the VM's own copy"):
        driver.start(spec)
    assert os.stat(shared).st_uid == 0 and stat.S_IMODE(os.stat(shared).st_mode) == 0o644
    assert not (tmp_path / "srv" / "firecracker" / UID).exists()
