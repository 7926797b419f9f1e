"""A MicroVM deleted while the operator missed its DELETED event (a watch down, a replica paused by
peering) is forgotten by the view once a LIST of the MicroVMs, made with the operator's own RBAC,
no longer shows it: a phantom never holds node capacity. Real API server, real CRDs and RBAC."""

from __future__ import annotations

import dataclasses

import pytest
from kubernetes import client, config

from mikrom import kube
from mikrom.operator import sweep
from mikrom.operator.state import State


@pytest.fixture
def operator_api(operator_kubeconfig):
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(operator_kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    kube.set_api(api)
    yield api
    kube.set_api(None)
    api.close()


def test_a_vm_deleted_behind_the_operators_back_is_forgotten_by_the_next_list(operator_api, mvms, namespace,
                                                                               monkeypatch):
    state = State()
    monkeypatch.setattr(sweep, "STATE", state)
    monkeypatch.setattr(sweep, "SETTINGS", dataclasses.replace(sweep.SETTINGS, namespace=namespace))
    monkeypatch.setattr(sweep, "LIST_PAGE", 2)  # three VMs: two pages of one snapshot
    for name in ("a", "b", "c"):
        vm = mvms.create(name)
        state.observe_vm({**vm, "status": {"phase": "Running", "node": "n1"}})
    gone = mvms.get("b")["metadata"]["uid"]
    mvms.delete("b")  # no finalizer (no operator runs): gone at once, and the view is not told

    assert state.allocated()["n1"][2] == 3
    assert sweep.prune_vms() == [f"vm/{gone}"]
    assert state.vm(gone) is None
    assert state.allocated()["n1"][2] == 2
    assert sweep.prune_vms() == []  # the others are listed: kept
