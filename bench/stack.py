"""What a benchmark starts, in one place: what the integration tests start (tests/harness), a real
kube-apiserver on kine, a real redis-server, Mikrom's CRDs and the operator's RBAC, and `mikrom
operator` as its own process with the mikrom-operator ServiceAccount; plus reading the API server's
request counters from its /metrics.

    stack = Stack.start(workdir, namespaces=["bench"])
    op = stack.operator("operator", "bench", env=stack.production_env())
    ...
    stack.close()
"""

from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from harness import controlplane, operator_proc, redis_server  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mikrom.settings import Settings  # noqa: E402


@dataclass
class Stack:
    workdir: Path
    cp: controlplane.ControlPlane
    redis: redis_server.RedisServer
    operator_kubeconfig: Path
    processes: list = field(default_factory=list)
    operators: list = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path, namespaces: list[str]) -> "Stack":
        started: list = []
        try:
            cp = controlplane.start(workdir / "controlplane")
            started += cp.processes
            redis = redis_server.start(workdir / "redis")
            started.append(redis.proc)
            operator_proc.install(cp)
            kubeconfig = operator_proc.service_account_kubeconfig(cp, workdir / "operator.kubeconfig")
            for ns in namespaces:
                cp.kubectl("create", "namespace", ns)
        except BaseException:
            for p in reversed(started):
                p.stop()
            raise
        return cls(workdir, cp, redis, kubeconfig, started)

    @property
    def broker(self) -> str:
        return self.redis.url(db=0)

    @staticmethod
    def production_env() -> dict:
        """The operator's own defaults (or this environment's MIKROM_* values) in place of the short
        timings the tests run with."""
        defaults = Settings.from_env()
        return {key: str(getattr(defaults, key[len("MIKROM_"):].lower())) for key in operator_proc.TEST_ENV}

    def operator(self, name: str, namespace: str, env: dict | None = None, wait: bool = True) -> operator_proc.Operator:
        """Start `mikrom operator` (standalone) serving `namespace`."""
        op = operator_proc.start(self.cp, self.broker, self.workdir / "operator", name, self.operator_kubeconfig,
                                 namespace=namespace, standalone=True, env=env)
        self.operators.append(op)
        if wait:
            op.wait_live()
        return op

    def request_totals(self) -> collections.Counter:
        """The API server's `apiserver_request_total`, summed by (verb, resource, subresource)."""
        text = self.cp.kubectl("get", "--raw", "/metrics", timeout=60).stdout
        out: collections.Counter = collections.Counter()
        for family in text_string_to_metric_families(text):
            if family.name != "apiserver_request":
                continue
            for s in family.samples:
                if s.name == "apiserver_request_total":
                    out[(s.labels.get("verb", ""), s.labels.get("resource", ""), s.labels.get("subresource", ""))] += \
                        s.value
        return out

    def close(self) -> None:
        for op in self.operators:
            op.stop()
        for p in reversed(self.processes):
            p.stop()


def rss_mib(pid: int) -> float:
    """A process's resident set, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()
