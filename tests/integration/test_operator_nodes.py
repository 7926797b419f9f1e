"""Node loss: a node whose heartbeat stops is NotReady and its VMs Unknown within
nodeLostAfterSeconds + 10 s; when the heartbeat returns, the node is Ready and the VMs reachable
and Running again. Past the node's self-fence time plus a margin, VMs that should run and are not
pinned to it are placed on another node."""

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


def test_vms_that_should_run_leave_a_node_lost_past_its_self_fence_time(operators, worker, mvms):
    sel = {"test": mvms.label}
    lost, spare = f"gone-{mvms.label}", f"spare-{mvms.label}"
    fence, margin = 8.0, 2.0
    worker.add_node(lost, vcpus=4, labels=sel)
    operators(env={"MIKROM_SELF_FENCE_AFTER_SECONDS": str(fence), "MIKROM_RESCHEDULE_MARGIN_SECONDS": str(margin)})
    mvms.create("mover", nodeSelector=sel)  # runStrategy Always by default
    mvms.create("pinned", nodeSelector=sel, nodeName=lost)
    mvms.create("once", nodeSelector=sel, runStrategy="Once")
    for name in ("mover", "pinned", "once"):
        assert mvms.wait_phase(name, "Running")["node"] == lost
    uid = mvms.get("mover")["metadata"]["uid"]
    worker.add_node(spare, vcpus=4, labels=sel)

    worker.stop_heartbeat(lost)
    stopped = time.monotonic()
    mvms.wait_phase("mover", "Unknown", timeout=LOST_AFTER + 10)
    st = wait_for(lambda: (s := mvms.status("mover")).get("node") == spare and s.get("phase") == "Running" and s,
                  fence + margin + 15, "mover to run on the spare node")
    took = time.monotonic() - stopped
    # not before the fence time plus the margin (the last beat was up to 1 s before the stop, and
    # its timestamp has whole seconds)
    assert took >= fence + margin - 2.5, took
    [event] = mvms.wait_events(uid, names.RESCHEDULING)
    assert event.type == "Warning" and lost in event.message and "selfFenceAfterSeconds" in event.message
    assert len(worker.messages(node=spare, uid=uid, task=names.CREATE_VM)) == 1
    assert mvms.condition("mover", names.NODE_REACHABLE) == {}, "reachability was about the old node"
    assert mvms.condition("mover", names.SCHEDULED)["status"] == "True"
    for name in ("pinned", "once"):  # pinned to the node, or not to be run again: they wait for it
        st = mvms.status(name)
        assert (st["node"], st["phase"]) == (lost, "Unknown"), (name, st)

    worker.resume_heartbeat(lost)
    mvms.wait_phase("pinned", "Running", timeout=15)
    mvms.wait_phase("once", "Running", timeout=15)
    assert mvms.status("mover")["node"] == spare
