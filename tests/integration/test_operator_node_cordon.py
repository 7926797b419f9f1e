"""Node maintenance the Kubernetes way: `kubectl cordon` of the Node named like a MicroVMNode
keeps new VMs off it (Pending/Unschedulable naming the cordon), shown on the MicroVMNode as
condition NodeCordoned while the user's own spec.schedulable stays as it was; `kubectl uncordon`
places the waiting VM there. A bare Node object stands in for the kubelet's."""

from __future__ import annotations

import pytest
from kubernetes import client

from harness.microvms import T
from harness.procs import wait_for
from mikrom import names


@pytest.fixture
def core_node(kube_api):
    made = []

    def make(name: str):
        client.CoreV1Api(kube_api).create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}},
                                               _request_timeout=T)
        made.append(name)

    yield make
    for name in made:
        try:
            client.CoreV1Api(kube_api).delete_node(name, _request_timeout=T)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


def _cordoned(mvms, node: str) -> dict:
    return next((c for c in (mvms.node(node) or {}).get("status", {}).get("conditions") or []
                 if c["type"] == "NodeCordoned"), {})


def test_a_cordoned_node_takes_no_new_vm_until_it_is_uncordoned(mikrom_cluster, operators, worker, mvms, core_node):
    sel = {"test": mvms.label}
    node = f"kvm-{mvms.label}"
    worker.add_node(node, vcpus=4, labels=sel)
    core_node(node)
    operators(env={"MIKROM_RECONCILE_INTERVAL_SECONDS": "120"})  # only watch events place the VM
    mikrom_cluster.kubectl("cordon", node)
    cond = wait_for(lambda: _cordoned(mvms, node).get("status") == "True" and _cordoned(mvms, node), 20,
                    "the MicroVMNode to show NodeCordoned=True")
    assert cond["reason"] == "NodeUnschedulable" and f"Node {node} is cordoned" in cond["message"]
    assert mvms.node(node)["spec"]["schedulable"] is True  # the user's field is left alone

    mvms.create("new", vcpus=1, memoryMiB=256, nodeSelector=sel)
    st = wait_for(lambda: mvms.status("new") if mvms.status("new").get("reason") == names.UNSCHEDULABLE else None,
                  15, "the new VM to be Pending/Unschedulable")
    assert st["phase"] == "Pending" and not st.get("node")
    assert f"{node}: cordoned: Node {node} is cordoned (spec.unschedulable" in st["message"], st["message"]
    assert mvms.condition("new", names.SCHEDULED)["reason"] == names.UNSCHEDULABLE

    mikrom_cluster.kubectl("uncordon", node)
    mvms.wait_phase("new", "Running", timeout=30)
    assert mvms.status("new")["node"] == node
    wait_for(lambda: _cordoned(mvms, node).get("status") == "False", 20, "NodeCordoned=False after the uncordon")
    assert mvms.node(node)["spec"]["schedulable"] is True
