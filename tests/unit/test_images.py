"""Images: paths stay inside the image directory, downloads are verified, cached once and capped."""

from __future__ import annotations

import hashlib
import os

import pytest
from harness.http_files import FileServer
from mikrom.worker import images, urlguard
from mikrom.worker.images import ChecksumMismatch, ImageNotFound, ImageRefused, ImageTooLarge


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    (d / "kernels").mkdir(parents=True)
    (d / "kernels" / "vmlinux").write_bytes(b"kernel")
    return d


def test_path_inside_the_image_dir_resolves(image_dir):
    assert images.resolve_path(image_dir, "kernels/vmlinux") == (image_dir / "kernels" / "vmlinux").resolve()


@pytest.mark.parametrize("rel", ["/etc/passwd", "../secret", "kernels/../../secret", "kernels/../kernels/vmlinux"])
def test_absolute_paths_and_dotdot_are_refused_naming_the_field(image_dir, rel):
    with pytest.raises(ImageRefused) as err:
        images.resolve_path(image_dir, rel, field="spec.image.kernel.path")
    assert "spec.image.kernel.path" in str(err.value)
    assert err.value.reason == "InvalidSpec"


def test_symlink_leading_out_of_the_image_dir_is_refused(image_dir, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("no")
    (image_dir / "kernels" / "escape").symlink_to(secret)
    (image_dir / "dirlink").symlink_to(tmp_path)
    with pytest.raises(ImageRefused, match="outside the image directory"):
        images.resolve_path(image_dir, "kernels/escape", field="spec.image.kernel.path")
    with pytest.raises(ImageRefused, match="spec.image.rootfs.path"):
        images.resolve_path(image_dir, "dirlink/secret", field="spec.image.rootfs.path")


def test_symlink_staying_inside_the_image_dir_is_accepted(image_dir):
    (image_dir / "current").symlink_to("kernels/vmlinux")
    assert images.resolve_path(image_dir, "current") == (image_dir / "kernels" / "vmlinux").resolve()


def test_missing_image_is_not_found_and_a_directory_is_refused(image_dir):
    with pytest.raises(ImageNotFound):
        images.resolve_path(image_dir, "kernels/none")
    with pytest.raises(ImageRefused, match="not a regular file"):
        images.resolve_path(image_dir, "kernels")


LOOPBACK = urlguard.parse_cidrs("127.0.0.0/8")
"""The test server is on loopback, which image URLs reach only when the node allows it."""


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(300_000)
    (root / "rootfs.ext4").write_bytes(data)
    server = FileServer(root)
    yield server, data
    server.close()


def _cache_files(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_download_with_the_right_digest_is_cached_once(served, tmp_path):
    server, data = served
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    first = images.fetch(server.url("rootfs.ext4"), digest, cache, timeout=10, allowed_cidrs=LOOPBACK)
    assert first == cache / "sha256" / digest
    assert first.read_bytes() == data
    second = images.fetch(server.url("rootfs.ext4"), digest.upper(), cache, timeout=10, allowed_cidrs=LOOPBACK)
    assert second == first
    assert server.hits == ["/rootfs.ext4"]
    assert _cache_files(cache) == [digest]


def test_wrong_digest_raises_checksum_mismatch_and_leaves_nothing(served, tmp_path):
    server, _ = served
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatch) as err:
        images.fetch(server.url("rootfs.ext4"), "0" * 64, cache, timeout=10, allowed_cidrs=LOOPBACK)
    assert err.value.reason == "ChecksumMismatch"
    assert _cache_files(cache) == []


def test_oversize_download_raises_image_too_large_and_leaves_nothing(served, tmp_path):
    server, data = served
    cache = tmp_path / "cache"
    with pytest.raises(ImageTooLarge) as err:
        images.fetch(server.url("rootfs.ext4"), hashlib.sha256(data).hexdigest(), cache, timeout=10,
                     max_bytes=len(data) - 1, allowed_cidrs=LOOPBACK)
    assert err.value.reason == "ImageTooLarge"
    assert _cache_files(cache) == []


def test_unreachable_url_raises_image_download_failed(served, tmp_path):
    server, _ = served
    with pytest.raises(images.ImageDownloadFailed) as err:
        images.fetch(server.url("missing"), "1" * 64, tmp_path / "cache", timeout=10, allowed_cidrs=LOOPBACK)
    assert err.value.reason == "ImageDownloadFailed"


def test_file_urls_other_schemes_and_bad_digests_are_refused(tmp_path):
    src = tmp_path / "kernel"
    src.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(ImageRefused, match="only http"):
        images.fetch(src.as_uri(), digest, tmp_path / "cache")
    with pytest.raises(ImageRefused, match="only http"):
        images.fetch("ftp://example.invalid/x", digest, tmp_path / "cache")
    with pytest.raises(ImageRefused, match="sha256"):
        images.fetch("https://example.invalid/x", "abc", tmp_path / "cache")


def test_each_vm_gets_its_own_sparse_copy_of_the_rootfs_made_once(tmp_path):
    src = tmp_path / "base.ext4"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    src.chmod(0o444)  # as a cached download is
    vm_dir = tmp_path / "vms" / "uid-1"
    copy = images.prepare_rootfs(src, vm_dir)
    assert copy.read_bytes()[:4] == b"head" and copy.stat().st_size == src.stat().st_size
    assert copy.stat().st_mode & 0o777 == 0o600, "the VM's own disk is writable by its owner only"
    assert copy.stat().st_blocks * 512 < 8 << 20  # the hole stayed a hole
    copy.write_bytes(b"guest wrote this")
    assert images.prepare_rootfs(src, vm_dir) == copy
    assert copy.read_bytes() == b"guest wrote this"  # a restart keeps the VM's disk
    assert src.read_bytes()[:4] == b"head"
    assert sorted(p.name for p in vm_dir.iterdir()) == ["rootfs.img"]
