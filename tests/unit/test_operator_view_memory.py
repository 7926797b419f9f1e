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


def test_the_per_node_totals_kept_as_vms_change_match_a_count_over_every_vm():
    # what a placement reads (allocated, addresses_on) is kept up to date change by change instead
    # of walking every VM; after any sequence of changes it is what walking them would give
    import random

    from mikrom.operator import placement
    from mikrom.operator.state import Reservation

    rng = random.Random(7)
    state = State()
    rv = 10
    for _ in range(3000):
        uid = f"u-{rng.randrange(40)}"
        rv += 1
        roll = rng.random()
        if roll < 0.1:
            state.forget_vm(uid, deleted=False)
        elif roll < 0.2:
            state.reserve(uid, Reservation(rng.choice(["n1", "n2", "n3"]), 1, 64))
        elif roll < 0.25:
            state.release(uid)
        else:
            body = _vm(uid=uid, resourceVersion=str(rv - rng.randrange(3)))  # now and then an older version
            body["spec"].update(vcpus=rng.randrange(1, 4), memoryMiB=rng.choice([128, 256]))
            if rng.random() < 0.5:
                body["spec"]["network"] = {}
            body["status"].update(node=rng.choice(["n1", "n2", "n3", None]),
                                  phase=rng.choice(["Scheduled", "Running", "Succeeded", "Failed"]))
            if rng.random() < 0.3:
                body["status"]["activeShape"] = {"vcpus": 4, "memoryMiB": 512}
            state.observe_vm(body)

        vms = [state.vm(f"u-{i}") for i in range(40)]
        vms = [vm for vm in vms if vm is not None]
        unplaced = {u: state.reservation(u) for u in (f"u-{i}" for i in range(40))
                    if state.reservation(u) and not ((state.vm(u) or {}).get("status") or {}).get("node")}
        want: dict = {}
        for vm in vms:
            if placement.holds(vm):
                cpu, mem = placement.shape(vm)
                c, m, n = want.get(vm["status"]["node"], (0, 0, 0))
                want[vm["status"]["node"]] = (c + cpu, m + mem, n + 1)
        for r in unplaced.values():
            c, m, n = want.get(r.node, (0, 0, 0))
            want[r.node] = (c + r.vcpus, m + r.memory_mib, n + 1)
        assert state.allocated() == want
        for node in ("n1", "n2", "n3"):
            addressed = sum(1 for vm in vms if (vm.get("status") or {}).get("node") == node
                            and (vm.get("spec") or {}).get("network") and vm["status"].get("phase") != "Succeeded")
            assert state.addresses_on(node) == addressed + sum(1 for r in unplaced.values() if r.node == node)
