"""The images the test cluster runs, as OCI archives, and loading them into its containerd.

The project's own images (pause, operator, worker, and redis, Debian's redis-server for the chart's
Redis and Sentinel pods) come from `hack/images.sh`, which prints the path of its manifest
`{"pause": {"ref": ..., "archive": ...}, "operator": ..., "worker": ..., "redis": ...}`. The
cluster's add-ons (CoreDNS, Traefik) are single static binaries from the testbin cache: each gets
a tiny image of its own here (`buildah from scratch` + the binary as entrypoint), tagged by the
binary's hash and exported beside that manifest, so an unchanged binary is never rebuilt. There is
no registry: every pod uses `imagePullPolicy: Never`. As hack/images.sh asks of its readers, the
archives are imported under a shared lock on the cache's `.lock` (a rebuild holds it exclusively).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILDER_REVISION = "1"
"""Part of every add-on image's tag: bump it when binary_image() builds images differently."""


PROJECT_IMAGES = ("pause", "operator", "worker", "redis")
"""What hack/images.sh builds, every one loaded into the cluster."""


class ImageError(RuntimeError):
    """An image could not be built or loaded; the cluster cannot start without it."""


def project_images(timeout: float = 3600) -> tuple[dict, Path]:
    """hack/images.sh's manifest (it builds what is missing first) and its directory, the cache."""
    res = subprocess.run(["bash", str(REPO / "hack" / "images.sh")], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    if res.returncode != 0:
        raise ImageError(f"hack/images.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
    path = Path(res.stdout.strip().splitlines()[-1])
    manifest = json.loads(path.read_text())
    for name in PROJECT_IMAGES:
        entry = manifest.get(name) or {}
        if not entry.get("ref") or not Path(entry.get("archive", "")).is_file():
            raise ImageError(f"{path}: no usable {name!r} image in {manifest!r}")
    return {name: manifest[name] for name in PROJECT_IMAGES}, path.parent


def _buildah(*args: str, timeout: float = 300) -> str:
    res = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise ImageError(f"buildah {' '.join(args)} failed: {res.stderr.strip()[-2000:]}")
    return res.stdout.strip()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def binary_image(name: str, binary: Path, cache: Path) -> dict:
    """`{"ref", "archive"}` of an image holding only `binary` as `/<name>`, its entrypoint."""
    binary = Path(binary).resolve()
    tag = hashlib.sha256(f"{BUILDER_REVISION}:{_digest(binary)}".encode()).hexdigest()[:16]
    ref = f"localhost/mikrom/{name}:{tag}"
    cache = Path(cache)
    archive = cache / f"{name}-{tag}.tar"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions building the same image take turns
        if not archive.is_file():
            ctr = _buildah("from", "scratch")
            try:
                _buildah("copy", "--chmod", "0755", ctr, str(binary), f"/{name}")
                _buildah("config", "--entrypoint", json.dumps([f"/{name}"]), "--cmd", "", ctr)
                _buildah("commit", "--quiet", ctr, ref)
            finally:
                _buildah("rm", ctr)
            tmp = archive.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            try:
                _buildah("push", "--quiet", ref, f"oci-archive:{tmp}:{ref}")
            finally:
                _buildah("rmi", ref)  # the archive is the cache; buildah's store need not keep a copy
            tmp.rename(archive)
    return {"ref": ref, "archive": str(archive)}


def addon_images(bins: dict, cache: Path) -> dict:
    return {name: binary_image(name, Path(bins[name]), cache) for name in ("coredns", "traefik")}


def import_all(socket: Path, images: dict, cache: Path, timeout: float = 600) -> None:
    """Load every archive into containerd's `k8s.io` namespace (the one kubelet's CRI uses),
    unpacked for its snapshotter; all at once."""
    ctr = shutil.which("ctr")
    if ctr is None:
        raise ImageError("ctr not found (Debian's containerd package installs it)")

    def load(entry: dict) -> None:
        res = subprocess.run([ctr, "--address", str(socket), "-n", "k8s.io", "images", "import",
                              entry["archive"]], capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise ImageError(f"ctr images import {entry['archive']} failed: {res.stderr.strip()[-2000:]}")

    with open(Path(cache) / ".lock", "a") as lock, ThreadPoolExecutor(max_workers=len(images) or 1) as pool:
        fcntl.flock(lock, fcntl.LOCK_SH)
        for f in [pool.submit(load, entry) for entry in images.values()]:
            f.result()
