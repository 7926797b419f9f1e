"""The chart's RBAC and its admission policy on a real kube-apiserver: what the operator's and the
worker's ServiceAccounts may do (`kubectl auth can-i`), and that a worker, with a real token bound
to its pod on a node, writes only its own MicroVMNode and the status of MicroVMs placed on that
node (worker-admissionpolicy.yaml). The resources are the chart's own, rendered by `helm template`.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from harness import binaries
from harness.serviceaccounts import ServiceAccount

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mikrom"
RBAC_TEMPLATES = ["operator-serviceaccount", "operator-clusterrole", "operator-clusterrolebinding",
                  "worker-serviceaccount", "worker-clusterrole", "worker-clusterrolebinding", "worker-role",
                  "worker-rolebinding", "worker-admissionpolicy", "worker-admissionpolicybinding"]


def helm_template(release: str, namespace: str) -> list[dict]:
    argv = [str(binaries.require("helm")), "template", release, str(CHART), "-n", namespace]
    for name in RBAC_TEMPLATES:
        argv += ["--show-only", f"templates/{name}.yaml"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def chart_rbac(control_plane):
    """The chart's ServiceAccounts, RBAC and admission policy, under a release of this module's own
    in a namespace of its own (cluster-scoped names carry the release, so nothing is shared)."""
    cp = control_plane
    release = "adm" + uuid.uuid4().hex[:6]
    namespace = f"{release}-system"
    cp.kubectl("create", "namespace", namespace)
    cp.kubectl("apply", "-f", str(CHART / "crds"))
    for crd in ("microvms.mikrom.io", "microvmnodes.mikrom.io"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    docs = helm_template(release, namespace)
    cp.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    names = {"release": release, "namespace": namespace, "operator": f"{release}-mikrom-operator",
             "worker": f"{release}-mikrom-worker", "nodes": [f"{release}-n1", f"{release}-n2"]}
    for node in names["nodes"]:
        cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
    yield names
    policy = f"{release}-mikrom-worker-own-node"
    cp.kubectl("delete", "validatingadmissionpolicybinding", policy, "--ignore-not-found", check=False)
    cp.kubectl("delete", "validatingadmissionpolicy", policy, "--ignore-not-found", check=False)
    for kind in ("clusterrolebinding", "clusterrole"):
        for who in ("operator", "worker"):
            cp.kubectl("delete", kind, names[who], "--ignore-not-found", check=False)
    cp.kubectl("delete", "microvmnode", *names["nodes"], "--ignore-not-found", check=False)
    cp.kubectl("delete", "node", *names["nodes"], "--ignore-not-found", check=False)


@pytest.mark.parametrize("verb,resource,expected", [
    ("watch", "microvms.mikrom.io", True),
    ("patch", "microvms.mikrom.io", True),
    ("patch", "microvms.mikrom.io --subresource=status", True),
    ("patch", "microvmnodes.mikrom.io", True),
    ("patch", "ippools.mikrom.io --subresource=status", True),
    ("create", "clusterkopfpeerings.kopf.dev", True),
    ("create", "events", True),
    ("delete", "microvms.mikrom.io", False),
    ("create", "microvms.mikrom.io", False),
    ("get", "secrets", False),
    ("create", "pods", False),
    ("update", "customresourcedefinitions.apiextensions.k8s.io", False),
])
def test_the_operators_service_account_may_do_exactly_what_it_needs(control_plane, chart_rbac, verb, resource, expected):
    operator = ServiceAccount(chart_rbac["namespace"], chart_rbac["operator"])
    assert operator.can(control_plane, verb, *resource.split(), "-A") is expected, (verb, resource)


@pytest.mark.parametrize("verb,resource,expected", [
    ("watch", "microvms.mikrom.io", True),
    ("patch", "microvms.mikrom.io --subresource=status", True),
    ("delete", "microvms.mikrom.io", True),
    ("create", "microvmnodes.mikrom.io", True),
    ("patch", "microvmnodes.mikrom.io --subresource=status", True),
    ("patch", "microvms.mikrom.io", False),
    ("create", "microvms.mikrom.io", False),
    ("delete", "microvmnodes.mikrom.io", False),
    ("patch", "ippools.mikrom.io", False),
    ("get", "secrets", False),
    ("create", "pods", False),
    ("patch", "nodes", False),
])
def test_the_workers_service_account_may_do_exactly_what_it_needs(control_plane, chart_rbac, verb, resource, expected):
    worker = ServiceAccount(chart_rbac["namespace"], chart_rbac["worker"])
    assert worker.can(control_plane, verb, *resource.split(), "-A") is expected, (verb, resource)


def test_the_worker_writes_the_fleet_report_configmap_of_its_own_namespace_only(control_plane, chart_rbac):
    worker = ServiceAccount(chart_rbac["namespace"], chart_rbac["worker"])
    assert worker.can(control_plane, "update", "configmaps/mikrom-fleet-report", "-n", chart_rbac["namespace"])
    assert not worker.can(control_plane, "update", "configmaps/other", "-n", chart_rbac["namespace"])
    assert not worker.can(control_plane, "update", "configmaps/mikrom-fleet-report", "-n", "default")


class Worker:
    """kubectl as the worker's ServiceAccount with a token bound to its pod on `node` (or, with
    node None, an ordinary token bound to nothing)."""

    def __init__(self, cp, tmp_path: Path, names: dict, node: str | None):
        self.cp = cp
        ns, sa = names["namespace"], names["worker"]
        bound_to = None
        if node:
            pod = f"worker-{node}"
            manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": ns},
                        "spec": {"nodeName": node, "serviceAccountName": sa,
                                 "containers": [{"name": "worker", "image": "worker:never-pulled"}]}}
            cp.kubectl("apply", "-f", "-", input=json.dumps(manifest))
            uid = cp.kubectl("get", "pod", pod, "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout.strip()
            bound_to = ("Pod", pod, uid)
        self.kubeconfig = ServiceAccount(ns, sa).kubeconfig(cp, tmp_path / f"worker-{node or 'unbound'}.kubeconfig",
                                                            duration="1h", bound_to=bound_to)

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(binaries.require("kubectl")), "--kubeconfig", str(self.kubeconfig),
                               "--request-timeout=30s", *args], input=input, capture_output=True, text=True, timeout=60)

    def whoami_node(self) -> list[str]:
        res = self.kubectl("auth", "whoami", "-o", "json")
        assert res.returncode == 0, res.stderr
        extra = json.loads(res.stdout)["status"]["userInfo"].get("extra", {})
        return extra.get("authentication.kubernetes.io/node-name", [])


def _node_manifest(name: str) -> str:
    return json.dumps({"apiVersion": "mikrom.io/v1alpha1", "kind": "MicroVMNode", "metadata": {"name": name},
                       "spec": {"schedulable": True}})


def _vm(cp, namespace: str, name: str, node: str) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "mikrom.io/v1alpha1", "kind": "MicroVM", "metadata": {"name": name},
        "spec": {"vcpus": 1, "memoryMiB": 128,
                 "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}))
    cp.kubectl("patch", "microvm", name, "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"node": node, "phase": "Scheduled"}}))


def test_a_worker_writes_only_its_own_microvmnode_and_the_vms_placed_on_its_node(control_plane, chart_rbac, tmp_path):
    cp = control_plane
    n1, n2 = chart_rbac["nodes"]
    ns = chart_rbac["namespace"]
    worker = Worker(cp, tmp_path, chart_rbac, n1)
    assert worker.whoami_node() == [n1], "a pod-bound token names the pod's node"

    # its own MicroVMNode: create, labels, status
    res = worker.kubectl("create", "-f", "-", input=_node_manifest(n1))
    assert res.returncode == 0, res.stderr
    res = worker.kubectl("label", "microvmnode", n1, "mikrom.io/zone=a")
    assert res.returncode == 0, res.stderr
    res = worker.kubectl("patch", "microvmnode", n1, "--subresource=status", "--type=merge",
                         "-p", '{"status": {"kvm": true}}')
    assert res.returncode == 0, res.stderr

    # another node's: neither created nor written
    res = worker.kubectl("create", "-f", "-", input=_node_manifest(n2))
    assert res.returncode != 0 and f"may write only MicroVMNode {n1}, not {n2}" in res.stderr, res.stderr
    cp.kubectl("create", "-f", "-", input=_node_manifest(n2))  # the admin is not confined
    res = worker.kubectl("patch", "microvmnode", n2, "--subresource=status", "--type=merge",
                         "-p", '{"status": {"kvm": true}}')
    assert res.returncode != 0 and "ValidatingAdmissionPolicy" in res.stderr and n2 in res.stderr, res.stderr

    # MicroVMs: the status of those placed on its node only, and it may not move one onto it
    _vm(cp, ns, "mine", n1)
    _vm(cp, ns, "theirs", n2)
    res = worker.kubectl("patch", "microvm", "mine", "-n", ns, "--subresource=status", "--type=merge",
                         "-p", '{"status": {"phase": "Running"}}')
    assert res.returncode == 0, res.stderr
    res = worker.kubectl("patch", "microvm", "theirs", "-n", ns, "--subresource=status", "--type=merge",
                         "-p", '{"status": {"phase": "Running"}}')
    assert res.returncode != 0 and f"{ns}/theirs is placed on {n2}" in res.stderr, res.stderr
    res = worker.kubectl("patch", "microvm", "theirs", "-n", ns, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"node": n1}}))
    assert res.returncode != 0, "a worker may not pull another node's VM onto its own"
    res = worker.kubectl("patch", "microvm", "mine", "-n", ns, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"node": n2}}))
    assert res.returncode != 0, "nor hand its own VM to another node"
    res = worker.kubectl("delete", "microvm", "theirs", "-n", ns, "--wait=false")
    assert res.returncode != 0 and "placed on" in res.stderr, res.stderr
    res = worker.kubectl("delete", "microvm", "mine", "-n", ns, "--wait=false")
    assert res.returncode == 0, res.stderr
    assert cp.kubectl("get", "microvm", "theirs", "-n", ns, "-o", "jsonpath={.status.phase}").stdout == "Scheduled"


def test_a_worker_token_bound_to_no_node_writes_nothing(control_plane, chart_rbac, tmp_path):
    worker = Worker(control_plane, tmp_path, chart_rbac, None)
    assert worker.whoami_node() == []
    node = chart_rbac["nodes"][0]
    res = worker.kubectl("patch", "microvmnode", node, "--subresource=status", "--type=merge",
                         "-p", '{"status": {"kvm": false}}')
    if control_plane.kubectl("get", "microvmnode", node, check=False).returncode != 0:
        control_plane.kubectl("create", "-f", "-", input=_node_manifest(node))
        res = worker.kubectl("patch", "microvmnode", node, "--subresource=status", "--type=merge",
                             "-p", '{"status": {"kvm": false}}')
    assert res.returncode != 0 and "the token names no node" in res.stderr, res.stderr
    # reading stays allowed: RBAC, not the policy, governs reads
    assert worker.kubectl("get", "microvmnodes").returncode == 0
