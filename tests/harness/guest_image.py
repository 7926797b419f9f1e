"""The guest the VM tests boot: a stock Debian cloud kernel and a busybox initramfs, built once into a
cache outside the repository by hack/test-image.sh.

Fixtures: `guest_image_dir` (the shared, read-only image directory) and `own_image_dir` (a
directory of the test's own holding the same kernel and initrd, to add files to).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def guest_image(vmlinux: bool = False) -> Path:
    """The image directory: `vmlinuz` and `initrd.img`, and with `vmlinux` also the uncompressed
    ELF kernel Firecracker boots on x86_64."""
    res = subprocess.run([str(REPO / "hack" / "test-image.sh"), *(["--vmlinux"] if vmlinux else [])],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"hack/test-image.sh failed:\n{res.stderr[-4000:]}")
    path = Path(res.stdout.strip().splitlines()[-1])
    wanted = ["vmlinuz", "initrd.img"] + (["vmlinux"] if vmlinux else [])
    missing = [name for name in wanted if not (path / name).is_file()]
    if missing:
        raise RuntimeError(f"hack/test-image.sh printed {path}, which lacks {missing}")
    return path


@pytest.fixture(scope="session")
def guest_image_dir() -> Path:
    return guest_image()


@pytest.fixture
def own_image_dir(guest_image_dir, tmp_path) -> Path:
    """An image directory of the test's own holding the guest's kernel and initrd, to add files to."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        if os.stat(guest_image_dir).st_dev == os.stat(images).st_dev:
            os.link(guest_image_dir / name, images / name)
        else:
            (images / name).write_bytes((guest_image_dir / name).read_bytes())
    return images
