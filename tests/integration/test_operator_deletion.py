"""Deletion: the finalizer stays until the node confirms the VM is gone; only a lost node or the
force-delete annotation lets it go without confirmation, after the bounded wait and with a Warning."""

from __future__ import annotations

import time

from harness.procs import holds_for, wait_for
from harness.operator_proc import TEST_ENV
from mikrom import names

DELETE_WAIT = float(TEST_ENV["MIKROM_DELETE_WAIT_SECONDS"])


def _gone(mvms, name: str, timeout: float) -> float:
    started = time.monotonic()
    wait_for(lambda: mvms.get(name) is None, timeout, f"{name} to be gone")
    return time.monotonic() - started


def test_finalizer_comes_off_only_after_the_worker_confirms(operators, worker, mvms):
    node = f"kvm-{mvms.label}"
    worker.add_node(node, delete_delay=3.0, labels={"test": mvms.label})
    operators()
    mvms.create("vm", nodeName=node)
    uid = mvms.wait_phase("vm", "Running") and mvms.get("vm")["metadata"]["uid"]
    assert names.FINALIZER in mvms.get("vm")["metadata"]["finalizers"]

    deleted = time.monotonic()
    mvms.delete("vm")
    wait_for(lambda: worker.messages(uid=uid, task=names.DELETE_VM), 10, "the delete task")
    vm = mvms.get("vm")  # the worker took the task but has not confirmed yet: still there, Deleting
    assert vm is not None and vm["status"]["phase"] == "Deleting" and not vm["status"].get("cleanedUpAt")
    assert [m.task for m in worker.messages(uid=uid)] == [names.CREATE_VM, names.DELETE_VM]
    _gone(mvms, "vm", 10)
    # it went only when the worker wrote cleanedUpAt, 3 s after taking the delete task
    assert time.monotonic() - deleted >= 2.8
    mvms.wait_events(uid, "Deleted")  # Events are recorded in the background, after what they report
    reasons = [e.reason for e in mvms.events(uid)]
    assert reasons == [names.SCHEDULED, "Deleting", "Deleted"], reasons
    assert "sent delete_vm_task" in mvms.events(uid)[1].message
    assert names.FORCE_DELETED not in reasons


def test_without_an_answer_the_finalizer_stays_until_force_delete_is_set(operators, worker, mvms):
    node = f"hung-{mvms.label}"
    worker.add_node(node, answering=False, labels={"test": mvms.label})  # heartbeats, never acts
    operators()
    mvms.create("waits", nodeName=node)
    mvms.create("forced", nodeName=node)
    # placed, and held by the finalizer: kopf adds it right after the create is sent (docs/protocol.md,
    # Dispatch); a delete before that is not held, and the node's status sync removes what it started
    def held(name: str) -> bool:
        vm = mvms.get(name)
        return bool((vm.get("status") or {}).get("node")) and names.FINALIZER in (vm["metadata"].get("finalizers") or [])

    wait_for(lambda: held("waits") and held("forced"), 15, "placement and the finalizer")
    mvms.patch("forced", {"metadata": {"annotations": {names.ANNOTATION_FORCE_DELETE: "true"}}})

    mvms.delete("forced")
    deleted = time.monotonic()
    mvms.delete("waits")
    took = _gone(mvms, "forced", DELETE_WAIT + 10)
    assert took >= DELETE_WAIT - 1.0, took  # the bounded wait was waited
    uid = [m.kwargs["uid"] for m in worker.messages(task=names.DELETE_VM) if m.kwargs["name"] == "forced"]
    assert len(uid) == 1  # the delete task was sent even so
    forced = mvms.wait_events(uid[0], names.FORCE_DELETED)
    assert forced[0].type == "Warning" and names.ANNOTATION_FORCE_DELETE in forced[0].message

    # no answer, node alive, no annotation: it waits, past the bounded wait and a margin
    holds_for(lambda: mvms.status("waits").get("phase") == "Deleting",
              max(0.0, DELETE_WAIT + 3 - (time.monotonic() - deleted)), "waits to stay Deleting")
    mvms.patch("waits", {"metadata": {"annotations": {names.ANNOTATION_FORCE_DELETE: "true"}}})
    _gone(mvms, "waits", 10)


def test_vm_on_a_lost_node_is_released_after_the_bounded_wait_with_a_warning(operators, worker, mvms):
    node = f"lost-{mvms.label}"
    n = worker.add_node(node, labels={"test": mvms.label})
    operators()
    mvms.create("vm", nodeName=node)
    mvms.wait_phase("vm", "Running")
    uid = mvms.get("vm")["metadata"]["uid"]
    n.answering = False
    worker.stop_heartbeat(node)
    mvms.wait_phase("vm", "Unknown", timeout=20)

    mvms.delete("vm")
    holds_for(lambda: mvms.get("vm") is not None, 1, "vm to stay until the bounded wait is over")
    _gone(mvms, "vm", DELETE_WAIT + 10)
    forced = mvms.wait_events(uid, names.FORCE_DELETED)
    assert forced[0].type == "Warning" and "lost" in forced[0].message


def test_unplaced_vm_is_deleted_at_once(operators, worker, mvms):
    operators()
    mvms.create("nowhere", nodeSelector={"test": mvms.label, "absent": "yes"})
    wait_for(lambda: mvms.status("nowhere").get("phase"), 15, "a phase")
    mvms.delete("nowhere")
    assert _gone(mvms, "nowhere", 10) < 5
