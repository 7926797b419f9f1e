"""A nodeSelector or nodeName no MicroVMNode offers yet is not a spec error: like a Pod's, the VM
waits Pending with Scheduled=False/Unschedulable naming what is missing, and is placed as soon as
a matching node registers (its watch event wakes the placement sweep)."""

from __future__ import annotations

from harness.procs import wait_for
from mikrom import names


def _unschedulable(mvms, name: str) -> dict | None:
    st = mvms.status(name)
    return st if st.get("phase") == "Pending" and st.get("reason") == names.UNSCHEDULABLE else None


def test_a_node_selector_no_node_matches_waits_pending_until_a_matching_node_registers(operators, worker, mvms):
    # no periodic retry within the test's time: only the new node's watch event can place the VM
    operators(env={"MIKROM_RECONCILE_INTERVAL_SECONDS": "120"})
    selector = {"disk": f"ssd-{mvms.label}"}
    worker.add_node(f"hdd-{mvms.label}", vcpus=4, labels={"disk": f"hdd-{mvms.label}"})
    mvms.create("wants-ssd", vcpus=1, memoryMiB=256, nodeSelector=selector)
    st = wait_for(lambda: _unschedulable(mvms, "wants-ssd"), 15, "wants-ssd to be Pending/Unschedulable")
    assert f"no MicroVMNode matches spec.nodeSelector {{disk=ssd-{mvms.label}}}" in st["message"], st["message"]
    cond = mvms.condition("wants-ssd", names.SCHEDULED)
    assert (cond["status"], cond["reason"]) == ("False", names.UNSCHEDULABLE)
    warning = mvms.wait_events(mvms.get("wants-ssd")["metadata"]["uid"], names.UNSCHEDULABLE)[0]
    assert warning.type == "Warning" and "spec.nodeSelector" in warning.message

    worker.add_node(f"ssd-{mvms.label}", vcpus=4, labels=selector)
    mvms.wait_phase("wants-ssd", "Running", timeout=30)
    assert mvms.status("wants-ssd")["node"] == f"ssd-{mvms.label}"
    assert mvms.condition("wants-ssd", names.SCHEDULED)["status"] == "True"


def test_a_node_name_with_no_microvmnode_yet_waits_pending_and_is_placed_when_it_registers(operators, worker,
                                                                                        mvms):
    operators(env={"MIKROM_RECONCILE_INTERVAL_SECONDS": "120"})
    name = f"late-{mvms.label}"
    mvms.create("pinned", nodeName=name)
    st = wait_for(lambda: _unschedulable(mvms, "pinned"), 15, "pinned to be Pending/Unschedulable")
    assert f"no MicroVMNode named {name} (spec.nodeName) is registered" in st["message"], st["message"]
    worker.add_node(name, vcpus=2)  # the worker registers the node after all
    mvms.wait_phase("pinned", "Running", timeout=30)
    assert mvms.status("pinned")["node"] == name
    assert mvms.condition("pinned", names.SCHEDULED)["status"] == "True"
