"""Lifecycle decisions: which intent a placed VM needs, repeats send nothing, progress time-outs
with backoff, and RestartRequired on a shape change while running."""

import pytest

from mikrom import names
from mikrom.names import Intent
from mikrom.operator import lifecycle


def vm(phase="Running", run="Always", annotation=None, restarted=None, dispatch=None, generation=1, node="n1",
       vcpus=1, active=(1, 512), **status):
    meta = {"uid": "u1", "generation": generation, "annotations": {}}
    if annotation:
        meta["annotations"][names.ANNOTATION_RESTARTED_AT] = annotation
    st = {"phase": phase, "node": node, **status}
    if restarted:
        st["restartedAt"] = restarted
    if dispatch:
        st["dispatch"] = dispatch
    if active:
        st["activeShape"] = {"vcpus": active[0], "memoryMiB": active[1]}
    return {"metadata": meta, "spec": {"runStrategy": run, "vcpus": vcpus, "memoryMiB": 512}, "status": st}


def test_running_vm_needs_nothing():
    assert lifecycle.desired(vm()) is None


def test_halting_a_running_vm_asks_for_stop_keyed_by_generation():
    want = lifecycle.desired(vm(run="Halted", generation=3))
    assert want == lifecycle.Want(Intent.STOP, "stop/u1/g3")


def test_stopped_vm_back_to_always_asks_for_start():
    assert lifecycle.desired(vm(phase="Stopped", generation=4)).intent is Intent.START


def test_halted_and_stopped_needs_nothing():
    assert lifecycle.desired(vm(phase="Stopped", run="Halted")) is None


def test_halted_at_birth_leaves_it_to_the_pending_create():
    assert lifecycle.desired(vm(phase="Scheduled", run="Halted", dispatch={"intent": "create"})) is None


def test_new_restart_annotation_asks_for_restart_once():
    want = lifecycle.desired(vm(annotation="t2", restarted="t1"))
    assert want == lifecycle.Want(Intent.RESTART, "restart/u1/t2")
    assert lifecycle.desired(vm(annotation="t2", restarted="t2")) is None


def test_the_same_inputs_give_the_same_key_so_a_repeated_event_sends_nothing_new():
    a = lifecycle.desired(vm(run="Halted", generation=7))
    b = lifecycle.desired(vm(run="Halted", generation=7))
    assert a == b


def test_unplaced_unknown_deleting_or_invalid_vms_need_no_message():
    assert lifecycle.desired(vm(node=None)) is None
    assert lifecycle.desired(vm(phase="Unknown", run="Halted")) is None
    assert lifecycle.desired(vm(phase="Failed", annotation="x", reason=names.INVALID_SPEC)) is None
    deleting = vm(run="Halted")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert lifecycle.desired(deleting) is None


@pytest.mark.parametrize("intent,phase,reached", [
    ("create", "Scheduled", False), ("create", "Provisioning", False), ("create", "Running", True),
    ("create", "Failed", True), ("start", "Stopped", False), ("start", "Running", True),
    ("stop", "Running", False), ("stop", "Stopping", False), ("stop", "Stopped", True),
])
def test_goal_of_each_intent(intent, phase, reached):
    assert lifecycle.goal_reached(vm(phase=phase), intent) is reached


def test_restart_goal_is_the_annotation_recorded_by_the_worker():
    assert not lifecycle.goal_reached(vm(annotation="t2", restarted="t1"), "restart")
    assert lifecycle.goal_reached(vm(annotation="t2", restarted="t2"), "restart")
    assert not lifecycle.goal_reached(vm(phase="Provisioning", annotation="t2", restarted="t2"), "restart")


def test_delete_goal_is_cleaned_up_at():
    assert not lifecycle.goal_reached(vm(), "delete")
    assert lifecycle.goal_reached(vm(cleanedUpAt="2026-01-01T00:00:00Z"), "delete")


def test_backoff_doubles_with_bounded_jitter_and_a_cap():
    delays = [lifecycle.backoff(n, 5.0, "u1") for n in (1, 2, 3, 4)]
    for n, d in zip((1, 2, 3, 4), delays):
        base = 5.0 * 2 ** (n - 1)
        assert base <= d < base * 1.25
    assert lifecycle.backoff(20, 5.0, "u1", cap=60) < 60 * 1.25
    assert lifecycle.backoff(2, 5.0, "u1") == lifecycle.backoff(2, 5.0, "u1")  # the same on every replica


SENT = "2026-01-01T00:00:00Z"
T0 = 1767225600.0  # SENT as epoch seconds


def stuck(attempts, phase="Scheduled"):
    return vm(phase=phase, dispatch={"intent": "create", "attempts": attempts, "sentAt": SENT, "taskId": "t"})


def test_no_progress_is_waited_for_then_redispatched_then_given_up():
    kw = dict(timeout=10, backoff_base=2, max_attempts=3)
    first_due = T0 + 10 + lifecycle.backoff(1, 2, "u1")
    assert lifecycle.progress(stuck(1), T0, T0 + 5, **kw) == lifecycle.Verdict("wait", first_due)
    assert lifecycle.progress(stuck(1), T0, first_due + 0.1, **kw).action == "redispatch"
    assert lifecycle.progress(stuck(2), T0, T0 + 12.5, **kw).action == "wait"  # a longer wait each time
    assert lifecycle.progress(stuck(3), T0, T0 + 100, **kw).action == "give-up"
    assert lifecycle.progress(stuck(3), T0, T0 + 100, give_up=False, **kw).action == "redispatch"


def test_a_phase_change_restarts_the_clock():
    kw = dict(timeout=10, backoff_base=2, max_attempts=3)
    assert lifecycle.progress(stuck(1, "Provisioning"), T0 + 50, T0 + 55, **kw).action == "wait"


def test_reached_goal_or_lost_node_is_never_stuck():
    kw = dict(timeout=1, backoff_base=1, max_attempts=1)
    assert lifecycle.progress(stuck(5, "Running"), T0, T0 + 999, **kw).action == "ok"
    assert lifecycle.progress(stuck(5, "Unknown"), T0, T0 + 999, **kw).action == "ok"
    assert lifecycle.progress(vm(), T0, T0 + 999, **kw).action == "ok"


def test_shape_change_while_running_requires_a_restart():
    required, message = lifecycle.restart_required(vm(vcpus=2, active=(1, 512)))
    assert required and "2 vCPU" in message and "1 vCPU" in message


def test_restart_required_clears_once_the_shape_is_applied_or_the_vm_stops():
    flagged = vm(vcpus=2, active=(2, 512), conditions=[{"type": names.RESTART_REQUIRED, "status": "True"}])
    assert lifecycle.restart_required(flagged)[0] is False
    stopped = vm(phase="Stopped", vcpus=2, active=None,
                 conditions=[{"type": names.RESTART_REQUIRED, "status": "True"}])
    assert lifecycle.restart_required(stopped) == (False, "the VM is not running")


def test_restart_required_is_not_mentioned_when_nothing_changed():
    assert lifecycle.restart_required(vm()) is None
    assert lifecycle.restart_required(vm(phase="Stopped", vcpus=4, active=None)) is None
