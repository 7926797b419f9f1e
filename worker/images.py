"""VM images on the node: where a kernel or rootfs may come from, and each VM's own disk.

Three rules from the design (DESIGN.md section 5):
- an image `path` is only ever resolved inside the node's image directory: no absolute paths, no
  `..` components, no symlink that leads out (`resolve_path`);
- an image `url` always comes with a sha256 and is downloaded once into a content-addressed cache,
  `<cache>/sha256/<hex>`, through a temporary file that is fsynced, verified and then renamed, so
  the cache never holds a partial or unverified file (`fetch`);
- every VM boots from its own copy of the rootfs, made with a reflink or sparse copy (`prepare_rootfs`).

Errors carry a CamelCase `reason` for the MicroVM's conditions.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20


class ImageError(Exception):
    """Base of image errors; `reason` goes into the MicroVM's condition."""

    reason = "ImageError"


class ImageRefused(ImageError):
    """The spec names an image the node will not use (escape from the image dir, bad digest...).
    Retrying cannot help: the spec must change."""

    reason = "InvalidSpec"


class ImageNotFound(ImageError):
    """A `path` image is not in the node's image directory (it may appear later)."""

    reason = "ImageNotFound"


class ChecksumMismatch(ImageError):
    """The downloaded bytes do not have the declared sha256; nothing was cached."""

    reason = "ChecksumMismatch"


class ImageDownloadFailed(ImageError):
    """The download failed or timed out; a retry may succeed."""

    reason = "ImageDownloadFailed"


class ImageTooLarge(ImageError):
    """The image is bigger than the node accepts."""

    reason = "ImageTooLarge"


class RootfsCopyFailed(ImageError):
    """Copying the rootfs for the VM failed (disk full, timeout)."""

    reason = "RootfsCopyFailed"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def resolve_path(image_dir: str | os.PathLike, rel: str, field: str = "spec.image.path") -> Path:
    """The absolute path of `rel` inside `image_dir`, or ImageRefused naming `field`.

    Checked twice: lexically (no absolute path, no `..`) so the error names the mistake, and after
    resolving symlinks, so a link inside the directory cannot point outside it.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise ImageRefused(f"{field}: empty path")
    if "\x00" in rel:
        raise ImageRefused(f"{field}: NUL byte in path")
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise ImageRefused(f"{field}: absolute paths are not allowed ({rel!r}); give a path relative to the image directory")
    if ".." in pure.parts:
        raise ImageRefused(f"{field}: '..' is not allowed in {rel!r}")
    root = Path(image_dir).resolve()
    try:
        real = (root / pure).resolve(strict=True)
    except FileNotFoundError:
        raise ImageNotFound(f"{field}: {rel!r} does not exist in the image directory") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on older Pythons
        raise ImageRefused(f"{field}: cannot resolve {rel!r}: {exc}") from None
    if not real.is_relative_to(root):
        raise ImageRefused(f"{field}: {rel!r} leads outside the image directory (through a symlink)")
    if not real.is_file():
        raise ImageRefused(f"{field}: {rel!r} is not a regular file")
    return real


def cached_path(cache_dir: str | os.PathLike, sha256: str) -> Path:
    return Path(cache_dir) / "sha256" / sha256.lower()


def fetch(url: str, sha256: str, cache_dir: str | os.PathLike, timeout: float = 600.0,
          max_bytes: int = 4 << 30, field: str = "spec.image.url") -> Path:
    """The cached file for `sha256`, downloading `url` first if the cache does not have it.

    `timeout` bounds the whole download (and each socket operation); `max_bytes` caps its size.
    Supports http://, https:// and file:// URLs.
    """
    digest = (sha256 or "").strip().lower()
    if not _SHA256.match(digest):
        raise ImageRefused(f"{field}: a url needs a sha256 of 64 hex digits")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ImageRefused(f"{field}: unsupported URL scheme {scheme!r} (http, https or file)")
    target = cached_path(cache_dir, digest)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{digest[:16]}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _download(url, out, timeout, max_bytes)
            out.flush()
            os.fsync(out.fileno())
        if got != digest:
            raise ChecksumMismatch(f"{field}: {url} has sha256 {got}, the spec says {digest}")
        # Content-addressed, so never written again; readable by a jailed VMM's unprivileged uid.
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _download(url: str, out, timeout: float, max_bytes: int) -> str:
    """Stream `url` into `out`; returns the sha256 hex of what was written."""
    deadline = time.monotonic() + timeout
    hasher = hashlib.sha256()
    size = 0
    request = urllib.request.Request(url, headers={"User-Agent": "mikrom-worker"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageTooLarge(f"{url} is {int(length)} bytes, more than the limit of {max_bytes}")
            while True:
                if time.monotonic() > deadline:
                    raise ImageDownloadFailed(f"{url}: download took longer than {timeout:.0f}s")
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ImageTooLarge(f"{url} is larger than the limit of {max_bytes} bytes")
                hasher.update(chunk)
                out.write(chunk)
                # Under gevent a fast local source never blocks on a socket; yield now and then
                # so one big download cannot starve the worker's other greenlets.
                time.sleep(0)
    except ImageError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageDownloadFailed(f"{url}: {exc}") from exc
    return hasher.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_rootfs(src: str | os.PathLike, vm_dir: str | os.PathLike, name: str = "rootfs.img",
                   timeout: float = 600.0) -> Path:
    """The VM's own writable copy of `src`, made once: a VM that restarts keeps its disk.

    `cp --reflink=auto --sparse=always` shares blocks on filesystems that can (btrfs, xfs) and
    skips holes elsewhere; the copy is written under a temporary name and renamed when complete.
    """
    vm_dir = Path(vm_dir)
    dest = vm_dir / name
    if dest.is_file():
        return dest
    vm_dir.mkdir(parents=True, exist_ok=True)
    tmp = vm_dir / f".{name}.part"
    tmp.unlink(missing_ok=True)
    try:
        res = subprocess.run(["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(tmp)], check=False,
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RootfsCopyFailed(f"copying {src} failed: {res.stderr.strip()}")
        # The VM's disk: writable by its VMM, private to it (the source may be a read-only cache entry).
        os.chmod(tmp, 0o600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        _fsync_dir(vm_dir)
    except subprocess.TimeoutExpired as exc:
        tmp.unlink(missing_ok=True)
        raise RootfsCopyFailed(f"copying {src} took longer than {timeout:.0f}s") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
