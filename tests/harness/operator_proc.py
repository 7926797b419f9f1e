"""Run `mikrom operator` as a real subprocess for the tests.

The operator authenticates as the ServiceAccount `mikrom-operator` (a token minted by
harness.serviceaccounts) with exactly the RBAC of `deploy/rbac/operator.yaml`, so a missing
permission fails the tests. Its settings come from MIKROM_* environment variables, its JSON log goes to a file, and it
can be killed with SIGKILL like a crashing Pod.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import procs
from .serviceaccounts import OPERATOR
from .waits import wait_for

REPO = Path(__file__).resolve().parents[2]
SA_NAMESPACE = OPERATOR.namespace
SA_NAME = OPERATOR.name

# The settings the tests run with: small, so the whole tier takes minutes, not hours.
TEST_ENV = {
    "MIKROM_NODE_LOST_AFTER_SECONDS": "6",
    "MIKROM_RECONCILE_INTERVAL_SECONDS": "1",
    "MIKROM_PROGRESS_TIMEOUT_SECONDS": "300",
    "MIKROM_DISPATCH_BACKOFF_SECONDS": "1",
    "MIKROM_MAX_DISPATCH_ATTEMPTS": "4",
    "MIKROM_DELETE_WAIT_SECONDS": "3",
    "MIKROM_REDIS_TIMEOUT_SECONDS": "2",
    "MIKROM_PEERING_LIFETIME_SECONDS": "6",
    "MIKROM_OPERATOR_WORKERS": "16",
}


def _peering_crd(kind: str, plural: str, scope: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }}}],
        },
    }


# kopf's peering resources (as in kopf's own peering.yaml): a deployment installs them with the CRDs.
PEERING_CRDS = [_peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
                _peering_crd("KopfPeering", "kopfpeerings", "Namespaced")]


def install(cp) -> None:
    """The CRDs from `crds/`, kopf's peering CRDs, and the operator's ServiceAccount and RBAC."""
    cp.kubectl("apply", "-f", str(REPO / "crds"))
    cp.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(c) for c in PEERING_CRDS))
    for crd in ("microvms.mikrom.io", "microvmnodes.mikrom.io", "ippools.mikrom.io",
                "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    if cp.kubectl("get", "namespace", SA_NAMESPACE, check=False).returncode != 0:
        cp.kubectl("create", "namespace", SA_NAMESPACE)
    cp.kubectl("apply", "-f", str(REPO / "deploy/rbac/operator.yaml"))


def service_account_kubeconfig(cp, path: Path) -> Path:
    """A kubeconfig that authenticates as system:serviceaccount:mikrom-system:mikrom-operator."""
    return OPERATOR.kubeconfig(cp, path)


@dataclass
class Operator:
    proc: procs.Proc
    liveness_port: int
    metrics_port: int = 0

    @property
    def name(self) -> str:
        return self.proc.name

    def alive(self) -> bool:
        return self.proc.alive()

    def wait_live(self, timeout: float = 60) -> None:
        """Until kopf's liveness endpoint answers (handlers registered, startup done)."""
        url = f"http://127.0.0.1:{self.liveness_port}/healthz"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as rsp:
                    return rsp.status == 200
            except OSError:
                return False

        wait_for(answers, timeout, f"{self.name} to be live",
                 abort=lambda: None if self.alive() else f"{self.name} exited:\n{self.proc.tail(80)}")

    def lines(self) -> list[str]:
        try:
            return self.proc.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def records(self) -> list[dict]:
        """The JSON log records (a line cut short by kill -9 is skipped)."""
        out = []
        for line in self.lines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def dispatches(self) -> list[dict]:
        """The operator's "dispatch" log records, one per message it sent (or tried to)."""
        return [r for r in self.records() if r.get("message") == "dispatch"]

    def problems(self) -> list[str]:
        """Lines showing an unhandled exception (kopf logs handler errors with their traceback)."""
        return [line for line in self.lines() if "Traceback" in line]

    def kill(self) -> None:
        """SIGKILL, as a node or the OOM killer would."""
        self.proc.kill()

    def stop(self) -> None:
        self.proc.stop(timeout=15)


def start(cp, redis_url: str, workdir: Path, name: str, kubeconfig: Path, namespace: str = "",
          env: dict | None = None, standalone: bool = False, peering: str = "") -> Operator:
    """Start `mikrom operator` (not yet waiting for it)."""
    port = procs.free_port()
    exe = Path(sys.executable).with_name("mikrom")
    argv = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "mikrom.cli"]),
            "operator", "--liveness", f"http://127.0.0.1:{port}/healthz"]
    argv += ["--standalone"] if standalone else ["--peering", peering or f"mikrom-{name}"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MIKROM_") and k != "KUBECONFIG"}
    full_env.update(TEST_ENV)
    full_env.update({"KUBECONFIG": str(kubeconfig), "MIKROM_BROKER_URL": redis_url, "MIKROM_NAMESPACE": namespace,
                     "PYTHONUNBUFFERED": "1", "MIKROM_METRICS_ADDRESS": "127.0.0.1",
                     "MIKROM_METRICS_PORT": str(procs.free_port())})
    full_env.update(env or {})
    proc = procs.start(name, argv, workdir, env=full_env, cwd=str(workdir))
    return Operator(proc=proc, liveness_port=port, metrics_port=int(full_env["MIKROM_METRICS_PORT"]))
