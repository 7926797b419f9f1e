"""A new VM's create goes before its placement write (docs/protocol.md, Dispatch): the carrying
out in `vms`, with the API server's write and the broker's send replaced by recorders (the real
ones are in tests/integration/test_operator_dispatch.py). A 409 Conflict on the write decides
again and writes the placement of the message already sent, sending nothing more."""

from __future__ import annotations

import time

import pytest

from mikrom import names
from mikrom.operator import dispatch, vms
from mikrom.operator.decide import rfc3339
from mikrom.operator.dispatch import DispatchRetry
from mikrom.operator.state import STATE
from mikrom.operator.status import Conflict

IMAGE = {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}


@pytest.fixture
def cluster():
    node = {"metadata": {"name": "n1", "labels": {}}, "spec": {},
            "status": {"lastHeartbeatTime": rfc3339(time.time()), "capacity": {"vcpus": 4, "memoryMiB": 4096},
                       "vmms": ["qemu"], "conditions": [{"type": "Ready", "status": "True"}]}}
    STATE.observe_node(node)
    yield
    STATE.forget_node("n1")
    STATE.forget_vm("u-sf")


def new_vm(rv: str = "7", **meta) -> dict:
    return {"metadata": {"namespace": "ns", "name": "vm", "uid": "u-sf", "generation": 1, "resourceVersion": rv,
                         **meta},
            "spec": {"vcpus": 1, "memoryMiB": 128, "image": IMAGE}, "status": {}}


class Recorder:
    """What the handler did, in order: ("send", taskId, node) and ("write", patch) steps."""

    def __init__(self, monkeypatch, conflicts: int = 0, send_fails: bool = False, gone: bool = False):
        self.steps: list[tuple] = []
        self.conflicts, self.gone = conflicts, gone
        self.fresh = new_vm("8", labels={"changed": "yes"})

        def deliver(body, msg):
            self.steps.append(("send", msg.task_id, body["status"]["node"]))
            STATE.mark_delivered(body["metadata"]["uid"], msg.task_id)
            if send_fails:
                STATE.mark_failed(body["metadata"]["uid"], msg.task_id, lambda n: 5.0)
                raise DispatchRetry("broker down", 5.0)

        def write(current, patch):
            self.steps.append(("write", patch, current["metadata"]["resourceVersion"]))
            if self.conflicts:
                self.conflicts -= 1
                raise Conflict("changed")
            if self.gone:
                return None
            return {**current, "status": {**(current.get("status") or {}), **patch}}

        monkeypatch.setattr(dispatch, "deliver", deliver)
        monkeypatch.setattr(vms, "write_vm", write)
        monkeypatch.setattr(vms, "reread_vm", lambda current: None if self.gone else self.fresh)

    def sends(self) -> list[tuple]:
        return [s for s in self.steps if s[0] == "send"]

    def writes(self) -> list[dict]:
        return [s[1] for s in self.steps if s[0] == "write"]


def test_a_new_vms_create_is_sent_before_its_placement_write(cluster, monkeypatch):
    rec = Recorder(monkeypatch)
    vms.reconcile(new_vm(), cause="event")
    assert [s[0] for s in rec.steps] == ["send", "write"]
    (_, task_id, node), (patch,) = rec.sends()[0], rec.writes()
    assert patch["node"] == node == "n1" and patch["dispatch"]["taskId"] == task_id
    assert STATE.sent("u-sf") is None  # the write landed: nothing left to remember


def test_a_conflict_after_the_send_writes_the_same_placement_and_sends_nothing_again(cluster, monkeypatch):
    rec = Recorder(monkeypatch, conflicts=2)
    vms.reconcile(new_vm(), cause="event")
    assert [s[0] for s in rec.steps] == ["send", "write", "write", "write"]
    (_, task_id, _), first = rec.sends()[0], rec.writes()[0]
    for again in rec.writes()[1:]:
        assert again["node"] == first["node"] and again["dispatch"] == first["dispatch"]
        assert again["dispatch"]["taskId"] == task_id
    assert [s[2] for s in rec.steps if s[0] == "write"] == ["7", "8", "8"]  # decided again on the fresh object
    # and the VM, now placed, is not dispatched again by the next reconcile either
    assert STATE.delivered("u-sf") == task_id


def test_a_vm_deleted_between_the_send_and_the_write_is_forgotten(cluster, monkeypatch):
    rec = Recorder(monkeypatch, conflicts=1, gone=True)
    decision = vms.reconcile(new_vm(), cause="event")
    assert decision.messages == () and len(rec.sends()) == 1
    assert STATE.sent("u-sf") is None and STATE.reservation("u-sf") is None


def test_a_failed_send_is_still_recorded_then_raised_for_its_retry(cluster, monkeypatch):
    rec = Recorder(monkeypatch, send_fails=True)
    with pytest.raises(DispatchRetry):
        vms.reconcile(new_vm(), cause="event")
    (patch,) = rec.writes()
    assert patch["node"] == "n1" and patch["dispatch"]["taskId"] == rec.sends()[0][1]
    assert STATE.failure("u-sf").task_id == patch["dispatch"]["taskId"]  # resent, same taskId, after its backoff


def test_a_write_that_fails_otherwise_keeps_the_sent_placement_for_the_next_decision(cluster, monkeypatch):
    rec = Recorder(monkeypatch)

    def broken(current, patch):
        rec.steps.append(("write", patch, current["metadata"]["resourceVersion"]))
        raise RuntimeError("API server timed out")

    monkeypatch.setattr(vms, "write_vm", broken)
    with pytest.raises(RuntimeError):
        vms.reconcile(new_vm(), cause="event")
    sent = STATE.sent("u-sf")
    assert sent is not None and sent.node == "n1" and STATE.reservation("u-sf").node == "n1"
    monkeypatch.setattr(vms, "write_vm", lambda current, patch: rec.steps.append(("write", patch, "-")) or
                        {**current, "status": patch})
    vms.reconcile(new_vm(), cause="create")
    assert len(rec.sends()) == 1 and rec.writes()[-1]["dispatch"] == rec.writes()[0]["dispatch"]
    assert names.SCHEDULED in [c["type"] for c in rec.writes()[-1]["conditions"]]
