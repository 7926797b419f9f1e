"""Fixtures for the operator's integration tests: the CRDs and the operator's RBAC installed in the
real API server, operator processes running as the `mikrom-operator` ServiceAccount, a fake worker
on the real Redis, and a small client for the test's MicroVMs."""

from __future__ import annotations

import copy
import uuid


import pytest
import yaml
from harness import fake_worker, operator_proc, procs, redis_server
from harness.microvms import T, MicroVMClient
from harness.waits import wait_for

from mikrom import names

STARTED = procs.STARTED


@pytest.fixture(scope="session")
def mikrom_cluster(control_plane):
    """The control plane with Mikrom's CRDs, kopf's peering CRDs and the operator's RBAC."""
    operator_proc.install(control_plane)
    return control_plane


@pytest.fixture(scope="session")
def operator_kubeconfig(mikrom_cluster, artifacts_dir):
    return operator_proc.service_account_kubeconfig(mikrom_cluster, artifacts_dir / "operator.kubeconfig")


@pytest.fixture
def broker_url(redis):
    return redis.url(db=2)


@pytest.fixture
def worker(mikrom_cluster, broker_url):
    w = fake_worker.FakeWorker(str(mikrom_cluster.kubeconfig), broker_url)
    yield w
    w.close()


@pytest.fixture
def operators(mikrom_cluster, operator_kubeconfig, broker_url, namespace, worker, kube_api, artifacts_dir):
    """Start operator processes for this test: `operators(name, env={...}, ...)`. At the end they
    are stopped, none may have logged a traceback, and the test's MicroVMs are removed."""
    started: list[operator_proc.Operator] = []

    def start(name: str = "operator", env: dict | None = None, wait: bool = True, broker: str | None = None,
              **kw) -> operator_proc.Operator:
        op = operator_proc.start(mikrom_cluster, broker or broker_url, artifacts_dir / "operators",
                                 f"{namespace}-{name}", operator_kubeconfig, namespace=kw.pop("namespace", namespace),
                                 env=env, **kw)
        started.append(op)
        STARTED.append(op.proc)
        if wait:
            op.wait_live()
        return op

    yield start
    for op in started:
        op.stop()
        STARTED.remove(op.proc)
    MicroVMs(mikrom_cluster, kube_api, namespace).remove_all()
    tracebacks = {op.name: [line[:400] for line in op.problems()[:3]] for op in started if op.problems()}
    assert not tracebacks, f"unhandled exceptions in the operator log: {tracebacks}"


BASE_VM = {
    "apiVersion": names.API_VERSION,
    "kind": "MicroVM",
    "metadata": {},
    "spec": {"vcpus": 1, "memoryMiB": 256, "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}},
}


class MicroVMs(MicroVMClient):
    """The test's MicroVMs, via the admin client and kubectl."""

    def __init__(self, cp, api_client, namespace: str):
        super().__init__(api_client, namespace)
        self.cp = cp
        self.label = "t" + uuid.uuid4().hex[:8]
        """A label value unique to this test, for its nodes' selectors."""

    def manifest(self, name: str, **spec) -> dict:
        body = copy.deepcopy(BASE_VM)
        body["metadata"] = {"name": name, "namespace": self.ns}
        body["spec"].update(spec)
        return body

    def apply(self, body: dict, check: bool = True):
        return self.cp.kubectl("apply", "-n", self.ns, "-f", "-", input=yaml.safe_dump(body), check=check)

    def events(self, uid: str) -> list:
        evs = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.uid={uid}",
                                              _request_timeout=T).items
        return sorted(evs, key=lambda e: int(e.metadata.resource_version))  # creation order

    def wait_events(self, uid: str, reason: str, count: int = 1, timeout: float = 15) -> list:
        """The object's Events with `reason` once there are `count` of them (Events are recorded
        after the status they report, so they may trail it a little)."""
        return wait_for(lambda: [e for e in self.events(uid) if e.reason == reason][:count] if
                        len([e for e in self.events(uid) if e.reason == reason]) >= count else None, timeout,
                        f"{count} {reason} event(s)")

    def node(self, name: str) -> dict | None:
        return self.cluster_object(names.MICROVMNODES, name)

    def pool(self, name: str) -> dict | None:
        return self.cluster_object(names.IPPOOLS, name)


@pytest.fixture
def mvms(mikrom_cluster, kube_api, namespace) -> MicroVMs:
    return MicroVMs(mikrom_cluster, kube_api, namespace)


@pytest.fixture
def restartable_redis(artifacts_dir, namespace):
    r = redis_server.start(artifacts_dir / f"redis-{namespace}")
    yield r
    r.stop()
