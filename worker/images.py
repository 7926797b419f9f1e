"""VM images on the node: where a kernel or rootfs may come from, and each VM's own disk.

Three rules from the design (DESIGN.md section 5):
- an image `path` is only ever resolved inside the node's image directory: no absolute paths, no
  `..` components, no symlink that leads out, and only a regular file, checked on the opened file
  (`resolve_path`), so a FIFO or a device can never block the worker;
- an image `url` is `http(s)` only, always comes with a sha256 and may reach only public
  addresses unless the node allows more (`urlguard`); it is downloaded once into a
  content-addressed cache, `<cache>/sha256/<hex>`, through a temporary file that is fsynced,
  verified and then renamed, so the cache never holds a partial or unverified file (`fetch`);
- every VM boots from its own copy of the rootfs, made with a reflink or sparse copy (`prepare_rootfs`).

Errors carry a CamelCase `reason` for the MicroVM's conditions. Their messages reach the tenant
(status, Events), so they never carry what the tenant should not learn: no digest of fetched
bytes, no remote status or body, no local error text that tells a refused port from a filtered
one, no credentials or query of a URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import stat
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Sequence

import urllib3

from . import spawn, urlguard

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_REDIRECTS = 5
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0
"""Per socket operation; the whole download is bounded by `fetch`'s timeout."""
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
"""How an image file that fstat found regular is opened for reading (see `open_regular`)."""


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

    Checked lexically (no absolute path, no `..`) so the error names the mistake, then after
    resolving symlinks, so a link inside the directory cannot point outside it, and last on the
    opened file itself (`open_regular`): only a regular file, and the file that was opened is the
    one inside the directory, whatever changed between the resolution and the open.
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
    except (OSError, RuntimeError):  # RuntimeError: symlink loop on older Pythons
        raise ImageRefused(f"{field}: {rel!r} cannot be resolved (a symlink loop?)") from None
    if not real.is_relative_to(root):
        raise ImageRefused(f"{field}: {rel!r} leads outside the image directory (through a symlink)")
    fd = open_regular(real, field, rel)
    try:
        # an intermediate directory swapped for a symlink after the resolution would lead elsewhere
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not opened.is_relative_to(root):
            raise ImageRefused(f"{field}: {rel!r} leads outside the image directory (through a symlink)")
    finally:
        os.close(fd)
    return real


def open_regular(path: str | os.PathLike, field: str, shown: str) -> int:
    """A read-only file descriptor of `path` if it is a regular file; ImageRefused naming `field`
    (and `shown`, what the spec called it) otherwise.

    Opening a FIFO or a tty waits for the other side, reading a device never ends, opening a
    socket fails, and a check of the path before the open can be answered by another file than
    the one opened. So the path is first opened with O_PATH (which opens nothing: no wait, no
    side effect of a device) without following a final symlink, checked with fstat, and only then
    the very inode that was checked is opened for reading, through /proc/self/fd.
    """
    try:
        handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageNotFound(f"{field}: {shown!r} does not exist") from None
    except OSError:
        raise ImageRefused(f"{field}: {shown!r} cannot be opened") from None
    try:
        mode = os.fstat(handle).st_mode
        if not stat.S_ISREG(mode):
            raise ImageRefused(f"{field}: {shown!r} is not a regular file ({_kind(mode)})")
        try:
            fd = os.open(f"/proc/self/fd/{handle}", OPEN_FLAGS)
        except OSError:
            raise ImageRefused(f"{field}: {shown!r} cannot be opened") from None
    finally:
        os.close(handle)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # cannot happen: the same inode
            raise ImageRefused(f"{field}: {shown!r} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a file"


def cached_path(cache_dir: str | os.PathLike, sha256: str) -> Path:
    return Path(cache_dir) / "sha256" / sha256.lower()


def fetch(url: str, sha256: str, cache_dir: str | os.PathLike, timeout: float = 600.0,
          max_bytes: int = 4 << 30, field: str = "spec.image.url",
          allowed_cidrs: Sequence[urlguard.Network] = ()) -> Path:
    """The cached file for `sha256`, downloading `url` first if the cache does not have it.

    Only http:// and https://. Every address the URL's host (and each redirect's) resolves to must
    pass `urlguard`, unless `allowed_cidrs` names its range, and the connection goes to the address
    that was checked. `timeout` bounds the whole download, redirects included; `max_bytes` caps its
    size.
    """
    digest = (sha256 or "").strip().lower()
    if not _SHA256.match(digest):
        raise ImageRefused(f"{field}: a url needs a sha256 of 64 hex digits")
    try:
        urlguard.parse(url)
    except urlguard.URLRefused as exc:
        raise ImageRefused(f"{field}: {exc}") from None
    target = cached_path(cache_dir, digest)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{digest[:16]}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _download(url, out, timeout, max_bytes, field, allowed_cidrs)
            out.flush()
            os.fsync(out.fileno())
        if got != digest:
            # never the digest of what came: that would hand out the digest of whatever the URL reaches
            raise ChecksumMismatch(f"{field}: sha256 does not match")
        # Content-addressed, so never written again; readable by a jailed VMM's unprivileged uid.
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _download(url: str, out, timeout: float, max_bytes: int, field: str,
              allowed: Sequence[urlguard.Network]) -> str:
    """Stream `url` into `out`; returns the sha256 hex of what was written."""
    deadline = time.monotonic() + timeout
    hasher = hashlib.sha256()
    size = 0
    try:
        with _open(url, deadline, field, allowed) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageTooLarge(f"{field}: the image is larger than the limit of {max_bytes} bytes")
            while True:
                if time.monotonic() > deadline:
                    raise _failed(field, url, f"took longer than {timeout:.0f}s")
                # read1 returns after one receive: a server trickling bytes cannot hold one read
                # open past the deadline
                chunk = resp.read1(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ImageTooLarge(f"{field}: the image is larger than the limit of {max_bytes} bytes")
                hasher.update(chunk)
                out.write(chunk)
                # Under gevent a fast source may never block on the socket; yield now and then
                # so one big download cannot starve the worker's other greenlets.
                time.sleep(0)
    except ImageError:
        raise
    except urllib3.exceptions.NewConnectionError:  # before TimeoutError, of which it is a subclass
        raise _failed(field, url, "connection failed") from None
    except urllib3.exceptions.TimeoutError:
        raise _failed(field, url, "timed out") from None
    except urllib3.exceptions.SSLError:
        raise _failed(field, url, "TLS handshake or certificate check failed") from None
    except (urllib3.exceptions.HTTPError, OSError, ValueError):
        raise _failed(field, url, "connection failed") from None
    return hasher.hexdigest()


@contextlib.contextmanager
def _open(url: str, deadline: float, field: str, allowed: Sequence[urlguard.Network]):
    """The response of a GET of `url` (status 200), following up to MAX_REDIRECTS redirects, each
    hop's host checked and its checked address connected to."""
    origin = urlguard.parse(url)
    current = origin
    for hop in range(MAX_REDIRECTS + 1):
        addresses = _addresses(current, allowed, field, url, redirected=hop > 0)
        headers = {"Host": current.host_header, "User-Agent": "mikrom-worker", "Accept-Encoding": "identity"}
        if origin.credentials is not None and current.origin == origin.origin:
            # the URL's userinfo, and only to its own origin: a redirect elsewhere does not get it
            headers["Authorization"] = "Basic " + base64.b64encode(origin.credentials.encode()).decode()
        pool, resp = _request(current, addresses, headers, deadline)
        status = resp.status
        if status == 200:
            try:
                yield resp
            finally:
                resp.close()
                pool.close()
            return
        location = resp.headers.get("Location") if status in REDIRECT_STATUSES else None
        resp.close()  # neither a body nor a reason phrase of an answer other than 200 is used
        pool.close()
        if location is None:
            raise _failed(field, url, f"HTTP {status}")
        try:
            current = urlguard.parse(urllib.parse.urljoin(current.url, location))
        except urlguard.URLRefused:
            raise ImageRefused(f"{field}: the URL redirects to a URL that is not allowed") from None
    raise _failed(field, url, f"more than {MAX_REDIRECTS} redirects")


def _addresses(target: urlguard.Target, allowed, field: str, url: str, redirected: bool) -> list:
    try:
        return urlguard.resolve(target.host, target.port, allowed)
    except urlguard.HostNotAllowed:
        log.info("image download from %s refused: %s's host is not allowed", urlguard.redact(url),
                 "a redirect" if redirected else "the URL")
        if redirected:
            raise ImageRefused(f"{field}: the URL redirects to a host that is not allowed") from None
        raise ImageRefused(f"{field}: the URL's host is not allowed") from None
    except (OSError, UnicodeError):
        raise _failed(field, url, "the host name does not resolve") from None


def _request(target: urlguard.Target, addresses: list, headers: dict, deadline: float):
    """(pool, response) of a GET to the first of `addresses` that accepts a connection.

    The pool is made for the checked address itself, so nothing resolves the name again; the
    name stays in the Host header, the TLS server name (SNI) and the certificate check.
    """
    last: Exception = urllib3.exceptions.ConnectTimeoutError("no time left")
    for ip in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_SECONDS, remaining),
                                  read=min(READ_TIMEOUT_SECONDS, remaining))
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(str(ip), target.port, timeout=timeout, retries=False,
                                               cert_reqs="CERT_REQUIRED", server_hostname=target.host,
                                               assert_hostname=target.host)
        else:
            pool = urllib3.HTTPConnectionPool(str(ip), target.port, timeout=timeout, retries=False)
        try:
            resp = pool.urlopen("GET", target.request_path, headers=headers, redirect=False, retries=False,
                                preload_content=False, decode_content=False, assert_same_host=False)
            return pool, resp
        except urllib3.exceptions.ConnectTimeoutError as exc:  # NewConnectionError too: try the next address
            pool.close()
            last = exc
        except BaseException:
            pool.close()
            raise
    raise last


def _failed(field: str, url: str, detail: str) -> ImageDownloadFailed:
    """One message for every cause, so a download cannot tell the tenant whether a port is
    closed, filtered or answering; the node's log keeps a hint (never a remote body or a URL's
    credentials or query)."""
    log.info("image download from %s failed: %s", urlguard.redact(url), detail)
    return ImageDownloadFailed(f"{field}: the download failed")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_rootfs(src: str | os.PathLike, vm_dir: str | os.PathLike, name: str = "rootfs.img",
                   timeout: float = 600.0, field: str = "spec.image.rootfs") -> Path:
    """The VM's own writable copy of `src`, made once: a VM that restarts keeps its disk.

    `cp --reflink=auto --sparse=always` shares blocks on filesystems that can (btrfs, xfs) and
    skips holes elsewhere; the copy is written under a temporary name and renamed when complete.
    `cp` reads the file this process opened and checked (`open_regular`, handed over as its stdin),
    not whatever the path names by the time it runs.
    """
    vm_dir = Path(vm_dir)
    dest = vm_dir / name
    if dest.is_file():
        return dest
    src_fd = open_regular(src, field, Path(src).name)
    vm_dir.mkdir(parents=True, exist_ok=True)
    tmp = vm_dir / f".{name}.part"
    tmp.unlink(missing_ok=True)
    try:
        res = spawn.run(["cp", "--reflink=auto", "--sparse=always", "--", "/dev/stdin", str(tmp)],
                        timeout=timeout, stdin_fd=src_fd)
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
    finally:
        os.close(src_fd)
    return dest
