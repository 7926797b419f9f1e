"""ServiceAccounts for RBAC tests: create one, mint a token and a kubeconfig that authenticates as
it, and ask the API server what it may do (`kubectl auth can-i --as=...`).

A component under test runs with a minted kubeconfig, so the Roles in deploy/rbac are what it is
allowed to do and a missing permission fails the test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str

    @property
    def user(self) -> str:
        """The username the API server gives the account's tokens (and `--as` impersonates)."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def create(self, cp) -> "ServiceAccount":
        """The namespace and the ServiceAccount, unless they exist (safe to run twice)."""
        if cp.kubectl("get", "namespace", self.namespace, check=False).returncode != 0:
            cp.kubectl("create", "namespace", self.namespace, check=False)
        if cp.kubectl("get", "serviceaccount", self.name, "-n", self.namespace, check=False).returncode != 0:
            cp.kubectl("create", "serviceaccount", self.name, "-n", self.namespace, check=False)
        return self

    def token(self, cp, duration: str = "4h", bound_to: tuple[str, str, str] | None = None) -> str:
        """A signed token for the account (`kubectl create token`); with `bound_to` (kind, name,
        uid), bound to that object, as the kubelet binds a pod's token to the pod."""
        args = ["create", "token", self.name, "-n", self.namespace, f"--duration={duration}"]
        if bound_to:
            kind, name, uid = bound_to
            args += [f"--bound-object-kind={kind}", f"--bound-object-name={name}", f"--bound-object-uid={uid}"]
        return cp.kubectl(*args).stdout.strip()

    def kubeconfig(self, cp, path: Path, duration: str = "4h", bound_to: tuple[str, str, str] | None = None) -> Path:
        """Write a kubeconfig (mode 0600) for the test cluster that authenticates with a fresh token of
        the account (see `token`) and nothing else: no client certificate that would win over it."""
        admin = yaml.safe_load(cp.kubeconfig.read_text())
        cluster = admin["clusters"][0]
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": self.name, "user": {"token": self.token(cp, duration, bound_to)}}],
            "contexts": [{"name": self.name, "context": {"cluster": cluster["name"], "user": self.name}}],
            "current-context": self.name,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def can(self, cp, *args: str) -> bool:
        """Whether the account may do what `args` says (`kubectl auth can-i ARGS`, impersonating it)."""
        res = cp.kubectl("auth", "can-i", *args, f"--as={self.user}", check=False)
        return res.stdout.strip() == "yes"


WORKER = ServiceAccount("mikrom", "mikrom-worker")
"""The node worker's account (deploy/rbac/worker.yaml)."""

OPERATOR = ServiceAccount("mikrom-system", "mikrom-operator")
"""The operator's account (deploy/rbac/operator.yaml)."""
