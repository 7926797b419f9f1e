"""The operator's cluster view keeps of each MicroVM what its decisions read, nothing more: its
memory per VM is the VM's spec and status, whatever is piled onto the object's metadata."""

from __future__ import annotations

from mikrom import names
from mikrom.operator.state import State


def _vm(**meta) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": "MicroVM",
            "metadata": {"name": "web", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7",
                         "generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z",
                         "finalizers": [names.FINALIZER], **meta},
            "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Always"},
            "status": {"phase": "Running", "node": "n1", "conditions": [{"type": "Ready", "status": "True"}]}}


def test_the_view_drops_managed_fields_labels_and_foreign_annotations_of_a_vm():
    state = State()
    body = _vm(managedFields=[{"manager": "kubectl", "fieldsV1": {"f:spec": {"x" * 100: {}}}}] * 50,
               labels={"big": "y" * 60},
               annotations={names.ANNOTATION_RESTARTED_AT: "2026-01-01T00:00:01Z",
                            "operator.mikrom.io/last-handled-configuration": "{" + "z" * 5000 + "}",
                            "kubectl.kubernetes.io/last-applied-configuration": "{" + "z" * 5000 + "}"})
    kept = state.observe_vm(body)

    assert kept["metadata"] == {"name": "web", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7",
                                "generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z",
                                "finalizers": [names.FINALIZER],
                                "annotations": {names.ANNOTATION_RESTARTED_AT: "2026-01-01T00:00:01Z"}}
    assert kept["spec"] == body["spec"] and kept["status"] == body["status"]
    assert kept["apiVersion"] == names.API_VERSION and kept["kind"] == "MicroVM"
    assert state.vm("u-1") is kept and kept["status"] is not body["status"]  # a copy, not the watch's object


def test_a_vm_counts_as_reconciled_by_this_process_once_a_reconcile_took_it_up():
    state = State()
    state.observe_vm(_vm())
    assert state.reconciled() == 0  # listed by the index: known, not yet reconciled
    state.latest(_vm())
    assert state.reconciled() == 1
    state.forget_vm("u-1")
    assert state.reconciled() == 0


def test_a_nodes_vms_and_the_allocation_follow_each_change_of_placement():
    state = State()
    state.observe_vm(_vm())
    assert [v["metadata"]["uid"] for v in state.vms_on("n1")] == ["u-1"]
    assert state.allocated() == {"n1": (1, 128, 1)}
    moved = _vm(resourceVersion="8")
    moved["status"]["node"] = "n2"
    state.observe_vm(moved)
    assert state.vms_on("n1") == [] and len(state.vms_on("n2")) == 1
    assert state.allocated() == {"n2": (1, 128, 1)}
    done = _vm(resourceVersion="9")
    done["status"].update(node="n2", phase="Succeeded")
    state.observe_vm(done)
    assert state.allocated() == {}
    from mikrom.operator.state import Reservation
    state.reserve("u-2", Reservation("n1", 2, 256))
    assert state.allocated() == {"n1": (2, 256, 1)}
    state.release("u-2")
    state.forget_vm("u-1")
    assert state.allocated() == {} and state.vms_on("n2") == []
