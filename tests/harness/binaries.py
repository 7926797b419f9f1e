"""Where the control-plane binaries come from.

Order, as controller-runtime's envtest does it: `TEST_ASSET_<NAME>` for one binary, then the
directory `KUBEBUILDER_ASSETS`, then the cache that `hack/testbin.sh` fills from the Go module
proxy (built on first use, reused afterwards).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MIKROM_TESTBIN_CACHE", Path.home() / ".cache/mikrom/testbin"))

# which hack/testbin.sh component builds each binary
_COMPONENT = {
    "kube-apiserver": "kube",
    "kubectl": "kube",
    "kube-controller-manager": "kube",
    "kube-scheduler": "kube",
    "kubelet": "kube",
    "kube-proxy": "kube",
    "coredns": "coredns",
    "traefik": "traefik",
    "kine": "kine",
    "helm": "helm",
    "kwok": "kwok",
    "etcd": None,
}


def find(name: str, build: bool = True) -> Path | None:
    env = os.environ.get("TEST_ASSET_" + name.upper().replace("-", "_"))
    if env:
        return Path(env)
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / name).is_file():
        return Path(assets) / name
    cached = CACHE / "bin" / name
    if cached.exists():
        return cached
    component = _COMPONENT.get(name)
    if build and component:
        subprocess.run([str(REPO / "hack/testbin.sh"), component], check=True, timeout=7200)
        if cached.exists():
            return cached
    return Path(shutil.which(name)) if shutil.which(name) else None


def require(name: str) -> Path:
    path = find(name)
    if path is None:
        raise FileNotFoundError(f"{name}: not found (set TEST_ASSET_{name.upper().replace('-', '_')} or run hack/testbin.sh)")
    return path
