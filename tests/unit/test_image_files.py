"""Image `path`s name regular files only: a FIFO, a device or a socket in the image directory is
refused at once, naming the field, and never opened in a way that blocks the worker."""

from __future__ import annotations

import os
import socket
import time

import pytest

from mikrom.worker import images
from mikrom.worker.images import ImageRefused


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "vmlinux").write_bytes(b"kernel")
    return d


def _quick(call, limit: float = 5.0):
    started = time.monotonic()
    try:
        return call()
    finally:
        assert time.monotonic() - started < limit, "refusing a special file must not wait for it"


def test_a_fifo_in_the_image_dir_is_refused_naming_the_field(image_dir):
    os.mkfifo(image_dir / "pipe")
    with pytest.raises(ImageRefused) as err:
        _quick(lambda: images.resolve_path(image_dir, "pipe", field="spec.image.kernel.path"))
    assert str(err.value) == "spec.image.kernel.path: 'pipe' is not a regular file (a FIFO)"
    assert err.value.reason == "InvalidSpec"


def test_a_device_in_the_image_dir_is_refused():
    # /dev itself as the image directory: its character devices are real, and no mknod (root) is needed
    with pytest.raises(ImageRefused, match=r"spec.image.initrd.path: 'null' is not a regular file \(a device\)"):
        _quick(lambda: images.resolve_path("/dev", "null", field="spec.image.initrd.path"))


def test_a_unix_socket_in_the_image_dir_is_refused(image_dir):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(image_dir / "sock"))
        with pytest.raises(ImageRefused, match=r"not a regular file \(a socket\)"):
            images.resolve_path(image_dir, "sock", field="spec.image.rootfs.path")


def test_a_symlink_to_a_fifo_inside_the_image_dir_is_refused(image_dir):
    os.mkfifo(image_dir / "pipe")
    (image_dir / "current").symlink_to("pipe")
    with pytest.raises(ImageRefused, match="spec.image.kernel.path: 'current' is not a regular file"):
        _quick(lambda: images.resolve_path(image_dir, "current", field="spec.image.kernel.path"))


def test_the_opened_file_is_checked_not_the_name_a_final_symlink_is_not_followed(image_dir):
    (image_dir / "link").symlink_to("vmlinux")
    with pytest.raises(ImageRefused, match=r"spec.image.kernel.path: 'link' is not a regular file \(a symlink\)"):
        images.open_regular(image_dir / "link", "spec.image.kernel.path", "link")
    fd = images.open_regular(image_dir / "vmlinux", "spec.image.kernel.path", "vmlinux")
    try:
        assert os.read(fd, 16) == b"kernel"
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


def test_a_rootfs_replaced_by_a_fifo_after_it_was_resolved_is_refused_without_waiting(tmp_path):
    # what the copy sees if the image directory changed between resolve_path and the first start
    src = tmp_path / "rootfs.img"
    os.mkfifo(src)
    vm_dir = tmp_path / "vms" / "uid-1"
    with pytest.raises(ImageRefused) as err:
        _quick(lambda: images.prepare_rootfs(src, vm_dir, timeout=8), limit=4)
    assert str(err.value) == "spec.image.rootfs: 'rootfs.img' is not a regular file (a FIFO)"
    assert not vm_dir.exists() or not any(vm_dir.iterdir())


def test_the_rootfs_copy_reads_the_file_that_was_checked(tmp_path):
    src = tmp_path / "base.ext4"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(32 << 20)
        f.write(b"tail")
    copy = images.prepare_rootfs(src, tmp_path / "vm")
    assert copy.read_bytes()[:4] == b"head" and copy.stat().st_size == src.stat().st_size
    assert copy.stat().st_blocks * 512 < 8 << 20, "the copy from the checked descriptor is still sparse"
