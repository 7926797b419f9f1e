"""Node loss: a node whose heartbeat stops is NotReady and its VMs Unknown within
nodeLostAfterSeconds + 10 s; when the heartbeat returns, the node is Ready and the VMs reachable
and Running again."""

from __future__ import annotations

import time

from harness.procs import wait_for
from harness.operator_proc import TEST_ENV
from mikrom import names

LOST_AFTER = float(TEST_ENV["MIKROM_NODE_LOST_AFTER_SECONDS"])


def test_vms_of_a_node_whose_heartbeat_stops_become_unknown_and_come_back(operators, worker, mvms):
    sel = {"test": mvms.label}
    lost, other = f"lost-{mvms.label}", f"other-{mvms.label}"
    worker.add_node(lost, vcpus=4, labels=sel)
    worker.add_node(other, vcpus=4, labels=sel)
    operators()
    mvms.create("on-lost", nodeSelector=sel, nodeName=lost)
    mvms.create("on-other", nodeSelector=sel, nodeName=other)
    mvms.wait_phase("on-lost", "Running")
    mvms.wait_phase("on-other", "Running")

    worker.stop_heartbeat(lost)
    stopped = time.monotonic()
    st = mvms.wait_phase("on-lost", "Unknown", timeout=LOST_AFTER + 10)
    took = time.monotonic() - stopped
    # not before the heartbeat is stale: the last beat was up to 1 s before the stop, and its
    # timestamp has whole seconds
    assert LOST_AFTER - 2.5 <= took <= LOST_AFTER + 10, took
    reach = mvms.condition("on-lost", names.NODE_REACHABLE)
    assert reach["status"] == "False" and reach["reason"] == names.NODE_LOST
    assert st["reason"] == names.NODE_LOST and lost in st["message"]
    ready = wait_for(lambda: next((c for c in mvms.node(lost)["status"]["conditions"] if c["type"] == "Ready"
                                   and c["status"] == "False"), None), 5, "the node to be NotReady")
    assert ready["reason"] == names.NODE_LOST
    assert mvms.status("on-other")["phase"] == "Running"  # the other node's VM is untouched
    uid = mvms.get("on-lost")["metadata"]["uid"]
    assert mvms.wait_events(uid, names.NODE_LOST)[0].type == "Warning"

    # a lost node takes no new VMs
    mvms.create("new", nodeSelector=sel, nodeName=lost)
    wait_for(lambda: mvms.status("new").get("reason") == names.UNSCHEDULABLE, 10, "new to be Unschedulable")
    assert "not Ready" in mvms.status("new")["message"]

    worker.resume_heartbeat(lost)
    mvms.wait_phase("on-lost", "Running", timeout=15)
    wait_for(lambda: mvms.condition("on-lost", names.NODE_REACHABLE).get("status") == "True", 15,
             "NodeReachable=True")
    wait_for(lambda: next(c for c in mvms.node(lost)["status"]["conditions"] if c["type"] == "Ready")["status"]
             == "True", 10, "the node to be Ready")
    mvms.wait_events(uid, names.NODE_RECOVERED)
    mvms.wait_phase("new", "Running", timeout=15)  # and it takes VMs again
