"""The operator judges heartbeats by its own clock: by when it saw each node's heartbeat change,
never by the time the worker's clock wrote. Nodes whose clocks are 5 minutes behind or ahead stay
Ready while they heartbeat; one whose (future) heartbeat stops changing goes NotReady on time; an
operator restart neither declares a node lost at once nor revives one already lost; an operator
frozen for longer than the fence and margin counts the freeze as its own blindness, not as the
nodes' silence."""

from __future__ import annotations

import os
import signal
import time

from harness.operator_proc import TEST_ENV
from harness.waits import holds_for, wait_for
from mikrom import names

LOST_AFTER = float(TEST_ENV["MIKROM_NODE_LOST_AFTER_SECONDS"])
SKEW = 300.0


def ready(mvms, node: str) -> dict:
    return next((c for c in (mvms.node(node).get("status") or {}).get("conditions") or [] if c["type"] == names.READY),
                {})


def test_nodes_with_clocks_five_minutes_off_stay_ready_and_a_frozen_future_heartbeat_is_lost_on_time(
        operators, worker, mvms):
    sel = {"test": mvms.label}
    behind, ahead = f"behind-{mvms.label}", f"ahead-{mvms.label}"
    worker.add_node(behind, labels=sel, clock_offset=-SKEW)
    worker.add_node(ahead, labels=sel, clock_offset=SKEW)
    operators()
    mvms.create("on-behind", nodeSelector=sel, nodeName=behind)
    mvms.create("on-ahead", nodeSelector=sel, nodeName=ahead)
    mvms.wait_phase("on-behind", "Running")
    mvms.wait_phase("on-ahead", "Running")

    def all_well():
        return all(ready(mvms, n).get("status") == "True" for n in (behind, ahead)) and \
            all(mvms.status(v).get("phase") == "Running" for v in ("on-behind", "on-ahead"))

    # well past nodeLostAfterSeconds: a node 5 minutes behind is not taken for lost
    holds_for(all_well, LOST_AFTER + 4, "both skewed nodes Ready and their VMs Running")

    worker.stop_heartbeat(ahead)  # its last heartbeat reads 5 minutes in the future
    stopped = time.monotonic()
    st = mvms.wait_phase("on-ahead", "Unknown", timeout=LOST_AFTER + 10)
    took = time.monotonic() - stopped
    # the last beat was up to 1 s before the stop, and the operator saw it up to a check later
    assert LOST_AFTER - 2.5 <= took <= LOST_AFTER + 10, took
    assert st["reason"] == names.NODE_LOST
    lost = wait_for(lambda: (c := ready(mvms, ahead)).get("status") == "False" and c, 5, "the node to be NotReady")
    assert lost["reason"] == names.NODE_LOST and "nodeLostAfterSeconds" in lost["message"]
    assert ready(mvms, behind)["status"] == "True" and mvms.status("on-behind")["phase"] == "Running"


def test_an_operator_restart_neither_declares_a_node_lost_at_once_nor_revives_a_lost_one(operators, worker, mvms):
    sel = {"test": mvms.label}
    steady, frozen = f"steady-{mvms.label}", f"frozen-{mvms.label}"
    worker.add_node(steady, labels=sel, clock_offset=-SKEW)
    worker.add_node(frozen, labels=sel)
    first = operators("first")
    mvms.create("on-steady", nodeSelector=sel, nodeName=steady)
    mvms.create("on-frozen", nodeSelector=sel, nodeName=frozen)
    mvms.wait_phase("on-steady", "Running")
    mvms.wait_phase("on-frozen", "Running")
    worker.stop_heartbeat(frozen)
    mvms.wait_phase("on-frozen", "Unknown", timeout=LOST_AFTER + 10)
    wait_for(lambda: ready(mvms, frozen).get("status") == "False", 5, "the frozen node to be NotReady")

    first.stop()
    operators("second")

    def as_before():
        return ready(mvms, steady).get("status") == "True" and ready(mvms, frozen).get("status") == "False" and \
            mvms.status("on-steady").get("phase") == "Running" and mvms.status("on-frozen").get("phase") == "Unknown"

    holds_for(as_before, LOST_AFTER + 4, "the steady node Ready and the frozen one lost across the restart")
    worker.resume_heartbeat(frozen)
    mvms.wait_phase("on-frozen", "Running", timeout=15)
    wait_for(lambda: ready(mvms, frozen).get("status") == "True", 10, "the frozen node to be Ready again")


def test_an_operator_frozen_past_the_fence_and_margin_takes_no_node_for_lost_when_it_thaws(operators, worker, mvms):
    fence, margin = 6.0, 2.0  # the thawed operator would move the VM at once if it counted the freeze as age
    sel = {"test": mvms.label}
    node = f"beating-{mvms.label}"
    worker.add_node(node, labels=sel)
    op = operators(env={"MIKROM_SELF_FENCE_AFTER_SECONDS": str(fence), "MIKROM_RESCHEDULE_MARGIN_SECONDS": str(margin)})
    mvms.create("movable", nodeSelector=sel)  # not pinned: a lost node's VM would be rescheduled
    mvms.wait_phase("movable", "Running")

    def in_place():
        st = mvms.status("movable")
        return ready(mvms, node).get("status") == "True" and st.get("phase") == "Running" and st.get("node") == node

    wait_for(in_place, 15, "the node Ready and the VM Running")
    os.kill(op.proc.pid, signal.SIGSTOP)
    try:
        # frozen past the fence, the margin and the gap that counts as the operator's own blindness
        holds_for(in_place, 3 * 1.0 + 10 + 2, "the VM in place while the operator is frozen")
    finally:
        os.kill(op.proc.pid, signal.SIGCONT)
    holds_for(in_place, LOST_AFTER + 3, "the node Ready and the VM in place after the thaw")
    assert any("the operator was stopped" in line for line in op.lines())
