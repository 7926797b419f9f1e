"""Lifecycle: runStrategy into and out of Halted sends stop and start, a new mikrom.io/restartedAt
sends restart, a shape change while running sets RestartRequired; repeated events send nothing new.
Time-outs: a VM the node makes no progress on is sent again with backoff, then Failed/NoProgress."""

from __future__ import annotations

import datetime

from harness.procs import holds_for, wait_for
from mikrom import names


def _tasks(worker, uid: str) -> list[str]:
    return [m.task for m in worker.messages(uid=uid)]


def test_halting_starting_restarting_and_resizing_a_running_vm(operators, worker, mvms):
    node = f"kvm-{mvms.label}"
    worker.add_node(node, vcpus=8, labels={"test": mvms.label})
    op = operators()
    mvms.create("vm", nodeName=node, vcpus=1)
    mvms.wait_phase("vm", "Running")
    uid = mvms.get("vm")["metadata"]["uid"]

    mvms.patch("vm", {"spec": {"runStrategy": "Halted"}})
    mvms.wait_phase("vm", "Stopped")
    assert _tasks(worker, uid) == [names.CREATE_VM, names.STOP_VM]

    mvms.patch("vm", {"spec": {"runStrategy": "Always"}})
    mvms.wait_phase("vm", "Running")
    assert _tasks(worker, uid) == [names.CREATE_VM, names.STOP_VM, names.START_VM]

    mvms.patch("vm", {"metadata": {"annotations": {names.ANNOTATION_RESTARTED_AT: "2026-01-01T00:00:00Z"}}})
    wait_for(lambda: mvms.status("vm").get("restartedAt") == "2026-01-01T00:00:00Z", 15, "the restart")
    assert _tasks(worker, uid)[3:] == [names.RESTART_VM]

    # the same annotation again (an unrelated edit) sends nothing; a new value restarts again
    mvms.patch("vm", {"metadata": {"labels": {"unrelated": "edit"}}})
    holds_for(lambda: _tasks(worker, uid)[3:] == [names.RESTART_VM], 2, "no second restart for the same value")
    mvms.patch("vm", {"metadata": {"annotations": {names.ANNOTATION_RESTARTED_AT: "2026-01-02T00:00:00Z"}}})
    wait_for(lambda: mvms.status("vm").get("restartedAt") == "2026-01-02T00:00:00Z", 15, "the second restart")
    assert _tasks(worker, uid)[3:] == [names.RESTART_VM, names.RESTART_VM]

    # a shape change while running: RestartRequired, no message to the node
    mvms.patch("vm", {"spec": {"vcpus": 2, "memoryMiB": 512}})
    cond = wait_for(lambda: mvms.condition("vm", names.RESTART_REQUIRED).get("status") == "True" and
                    mvms.condition("vm", names.RESTART_REQUIRED), 10, "RestartRequired=True")
    assert cond["reason"] == names.SHAPE_CHANGED and "2 vCPU" in cond["message"] and "1 vCPU" in cond["message"]
    assert mvms.status("vm")["phase"] == "Running"
    assert len(_tasks(worker, uid)) == 5
    # the next restart applies it
    mvms.patch("vm", {"metadata": {"annotations": {names.ANNOTATION_RESTARTED_AT: "2026-01-03T00:00:00Z"}}})
    wait_for(lambda: mvms.condition("vm", names.RESTART_REQUIRED).get("status") == "False", 15,
             "RestartRequired=False after the restart")
    assert mvms.status("vm")["activeShape"] == {"vcpus": 2, "memoryMiB": 512}

    dispatched = [e.message for e in mvms.wait_events(uid, names.DISPATCHED, count=5)]
    assert dispatched[0].startswith("runStrategy is Halted; sent stop_vm_task")
    assert dispatched[1].startswith("runStrategy is Always; sent start_vm_task")
    assert dispatched[4].startswith(f"{names.ANNOTATION_RESTARTED_AT} is 2026-01-03T00:00:00Z; sent restart_vm_task")
    mvms.wait_events(uid, names.RESTART_REQUIRED)
    assert [e.reason for e in mvms.events(uid)].count(names.DISPATCHED) == 5
    sent = [(d["intent"], d["why"]) for d in op.dispatches() if d["vm_uid"] == uid]
    assert sent == [("create", "new"), ("stop", "new"), ("start", "new"), ("restart", "new"), ("restart", "new"),
                    ("restart", "new")]


def test_stuck_vm_is_redispatched_with_backoff_then_failed_with_no_progress(operators, worker, mvms):
    node = f"hung-{mvms.label}"
    worker.add_node(node, answering=False, labels={"test": mvms.label})
    op = operators(env={"MIKROM_PROGRESS_TIMEOUT_SECONDS": "1", "MIKROM_DISPATCH_BACKOFF_SECONDS": "2",
                        "MIKROM_MAX_DISPATCH_ATTEMPTS": "3", "MIKROM_RECONCILE_INTERVAL_SECONDS": "0.5"})
    mvms.create("stuck", nodeName=node)
    st = mvms.wait_phase("stuck", "Failed", timeout=40)
    uid = mvms.get("stuck")["metadata"]["uid"]
    assert st["reason"] == names.NO_PROGRESS and "3 dispatches" in st["message"]
    assert st["node"] == node and st["dispatch"]["attempts"] == 3

    msgs = worker.messages(uid=uid)
    assert [m.task for m in msgs] == [names.CREATE_VM] * 3
    assert len({m.headers["id"] for m in msgs}) == 3
    sent = [d for d in op.dispatches() if d["vm_uid"] == uid]
    assert [(d["why"], d["attempt"]) for d in sent] == [("new", 1), ("no-progress", 2), ("no-progress", 3)]
    assert [d["task_id"] for d in sent] == [m.headers["id"] for m in msgs]
    at = [datetime.datetime.fromisoformat(d["sent_at"].replace("Z", "+00:00")).timestamp() for d in sent]
    gaps = [b - a for a, b in zip(at, at[1:])]
    # the progress timeout of 1 s plus a backoff of 2 s, then of 4 s (each with up to 25% jitter)
    assert 3.0 <= gaps[0] < 10 and 5.0 <= gaps[1] < 15, gaps

    assert len(mvms.wait_events(uid, "Redispatching", count=2)) == 2
    failed = mvms.wait_events(uid, names.NO_PROGRESS)
    assert failed[0].type == "Warning"
    holds_for(lambda: len(worker.messages(uid=uid)) == 3, 3, "nothing more sent once given up")
