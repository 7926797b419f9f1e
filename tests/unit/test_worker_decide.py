"""The worker's pure decision: what to do with one VM, from the MicroVM and the node's observation."""

import pytest

from mikrom.worker.reconcile import Action, decide, restart_delay
from mikrom.worker.state import Observation

NOW = 1_000_000.0


def vm(strategy="Always", phase=None, generation=1, annotation=None, **status):
    meta = {"name": "web-1", "namespace": "team-a", "uid": "u1", "generation": generation}
    if annotation:
        meta["annotations"] = {"mikrom.io/restartedAt": annotation}
    st = {"node": "n1", **status}
    if phase:
        st["phase"] = phase
    return {"metadata": meta, "spec": {"runStrategy": strategy, "vcpus": 1, "memoryMiB": 128}, "status": st}


def running(ready=True, supervised=True, **meta):
    return Observation(uid="u1", exists=True, configured=True, pid=4242, ready=ready, started_at=NOW - 60,
                       supervised=supervised, meta=meta)


def exited(clean=False, at=NOW - 1, **meta):
    return Observation(uid="u1", exists=True, configured=True, exited=True, exit_clean=clean, exit_at=at,
                       started_at=NOW - 100, meta=meta)


NOTHING_HERE = Observation(uid="u1")


def test_a_new_vm_with_no_process_is_started():
    assert decide(vm(phase="Scheduled"), NOTHING_HERE, NOW).action is Action.START


def test_a_running_ready_vm_is_only_reported():
    assert decide(vm(phase="Unknown"), running(), NOW).action is Action.REPORT_RUNNING


def test_a_running_vm_that_has_not_printed_its_marker_is_waited_for():
    assert decide(vm(phase="Provisioning"), running(ready=False), NOW).action is Action.WAIT_READY


@pytest.mark.parametrize("ready", [True, False])
@pytest.mark.parametrize("strategy", ["Always", "RerunOnFailure", "Once"])
def test_a_vmm_that_lost_its_supervisor_is_restarted_under_a_new_one_whatever_the_run_strategy(strategy, ready):
    d = decide(vm(strategy, phase="Running"), running(ready=ready, supervised=False), NOW)
    assert d.action is Action.RESTART
    assert "supervisor" in d.why


def test_a_halted_vm_whose_vmm_lost_its_supervisor_is_stopped():
    assert decide(vm("Halted"), running(supervised=False), NOW).action is Action.STOP


@pytest.mark.parametrize("obs,expected", [(running(), Action.STOP), (NOTHING_HERE, Action.REPORT_STOPPED),
                                          (exited(), Action.REPORT_STOPPED)])
def test_halted_stops_a_running_vm_and_reports_a_stopped_one(obs, expected):
    assert decide(vm("Halted"), obs, NOW).action is expected


def test_a_vm_stopped_on_purpose_starts_again_when_no_longer_halted():
    assert decide(vm("Always", phase="Stopped"), exited(desiredStop=True), NOW).action is Action.START


def test_a_new_restart_annotation_restarts_a_running_vm():
    d = decide(vm(annotation="2024-01-01T00:00:00Z", restartedAt="2023-01-01T00:00:00Z"), running(), NOW)
    assert d.action is Action.RESTART


def test_a_restart_annotation_already_acted_on_does_nothing_more():
    d = decide(vm(annotation="t1", restartedAt="t1"), running(), NOW)
    assert d.action is Action.REPORT_RUNNING


def test_a_restart_annotation_recorded_locally_but_not_yet_in_status_is_not_repeated():
    assert decide(vm(annotation="t1"), running(restartedAt="t1"), NOW).action is Action.REPORT_RUNNING


@pytest.mark.parametrize("strategy,clean,expected", [
    ("Once", True, Action.FINISH),
    ("Once", False, Action.FINISH),
    ("RerunOnFailure", True, Action.FINISH),
    ("RerunOnFailure", False, Action.START),
    ("Always", True, Action.START),
    ("Always", False, Action.START),
])
def test_run_strategy_decides_what_follows_an_exit(strategy, clean, expected):
    assert decide(vm(strategy), exited(clean=clean, at=NOW - 3600, crashes=1), NOW).action is expected


def test_a_crash_loop_backs_off_before_restarting():
    d = decide(vm("Always"), exited(at=NOW - 1, crashes=3), NOW)
    assert d.action is Action.BACKOFF
    assert d.delay == pytest.approx(restart_delay(3) - 1)


def test_the_backoff_ends_and_the_vm_restarts():
    assert decide(vm("Always"), exited(at=NOW - restart_delay(3) - 0.1, crashes=3), NOW).action is Action.START


def test_a_restart_request_skips_the_backoff():
    assert decide(vm("Always", annotation="t2"), exited(at=NOW - 1, crashes=5), NOW).action is Action.START


def test_restart_delay_doubles_and_is_capped():
    assert restart_delay(0) == 0
    assert [restart_delay(n) for n in (1, 2, 3)] == [5, 10, 20]
    assert restart_delay(50) == 300


def test_a_permanent_failure_is_not_retried_for_the_same_generation():
    failed = vm(phase="Failed", reason="ChecksumMismatch", observedGeneration=1)
    assert decide(failed, NOTHING_HERE, NOW).action is Action.NOTHING


def test_a_permanent_failure_is_retried_once_the_spec_changes():
    failed = vm(phase="Failed", reason="ChecksumMismatch", observedGeneration=1, generation=2)
    assert decide(failed, NOTHING_HERE, NOW).action is Action.START


def test_a_transient_failure_is_retried():
    failed = vm(phase="Failed", reason="ImageDownloadFailed", observedGeneration=1)
    assert decide(failed, NOTHING_HERE, NOW).action is Action.START


def test_a_once_vm_that_finished_is_not_started_again_after_its_files_are_gone():
    done = vm("Once", phase="Succeeded", finishedAt="2024-01-01T00:00:00Z")
    assert decide(done, NOTHING_HERE, NOW).action is Action.NOTHING
