"""The periodic sweep over the operator's view: it reconciles, each interval, the VMs whose decision
can change with time alone, spread over the interval, and every VM once every FULL_EVERY
intervals; and the view forgets VMs a LIST no longer shows, never by their age alone."""

from __future__ import annotations

import collections

import pytest

from mikrom import names
from mikrom.operator import sweep
from mikrom.operator.state import State

READY = {"metadata": {"name": "n1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
LOST = {"metadata": {"name": "n1"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}


def _vm(i: int = 0, phase: str = "Running", node: str | None = "n1", intent: str | None = "create", rv: int = 7,
        **meta) -> dict:
    status: dict = {"phase": phase}
    if node:
        status["node"] = node
    if intent:
        status["dispatch"] = {"intent": intent, "taskId": f"t-{i}", "key": f"create/u-{i}", "attempts": 1}
    return {"apiVersion": names.API_VERSION, "kind": "MicroVM",
            "metadata": {"name": f"vm-{i}", "namespace": "team-a", "uid": f"u-{i}", "resourceVersion": str(rv),
                         **meta},
            "spec": {"vcpus": 1, "memoryMiB": 128}, "status": status}


@pytest.mark.parametrize(("vm", "node", "failed", "expected"), [
    (_vm(), READY, False, False),  # Running, its create's goal reached, on a Ready node
    (_vm(phase="Pending", node=None, intent=None), None, False, False),  # capacity events place it
    (_vm(phase="Scheduled"), READY, False, True),  # waiting on progressTimeoutSeconds
    (_vm(phase="Running", intent="restart", annotations={names.ANNOTATION_RESTARTED_AT: "2026-01-01T00:00:01Z"}),
     READY, False, True),  # a restart the node has not acted on yet
    (_vm(), LOST, False, True),  # Unknown, then rescheduled past self-fence + margin
    (_vm(), None, False, True),  # its MicroVMNode is gone
    (_vm(), READY, True, True),  # a failed send waits for its backoff
])
def test_only_vms_whose_decision_can_change_with_time_are_time_dependent(vm, node, failed, expected):
    assert sweep.time_dependent(vm, node, failed) is expected


@pytest.fixture
def view(monkeypatch):
    state = State()
    state.observe_node({**READY, "metadata": {"name": "n1", "resourceVersion": "1"}})
    done: collections.Counter = collections.Counter()
    ticks: list[int] = []
    monkeypatch.setattr(sweep, "STATE", state)
    monkeypatch.setattr(sweep, "_reconcile", lambda vm: done.update([vm["metadata"]["uid"]]))
    return state, done, ticks


def _run(s: sweep.Sweep, seconds: float, interval: float, ticks: list[int], step: float = 1.0,
         start: float = 0.0) -> None:
    t = start
    while t < start + seconds:
        ticks.append(s.tick(now=t, interval=interval))
        t += step


def test_the_sweep_reconciles_each_waiting_vm_once_per_interval_spread_over_it(view):
    state, done, ticks = view
    for i in range(1000):
        state.observe_vm(_vm(i, phase="Scheduled"))
    s = sweep.Sweep()
    _run(s, 1.0 + 10 * 10.0, interval=10.0, ticks=ticks)  # the first tick only spreads them
    assert set(done.values()) == {10}  # every VM, once per interval
    assert max(ticks) <= 2 * 1000 / 10  # a tick a second: at most twice the even share, no burst


def test_the_sweep_reconciles_a_settled_vm_only_once_every_full_round(view):
    state, done, ticks = view
    for i in range(200):
        state.observe_vm(_vm(i))
    s = sweep.Sweep()
    _run(s, 1.0 + sweep.FULL_EVERY * 2 * 10.0, interval=10.0, ticks=ticks)
    assert set(done.values()) == {2}
    assert sum(ticks) == 400  # 200 VMs in 20 intervals: a tenth of the reconciles of a per-VM timer


def test_the_sweep_leaves_a_vm_being_deleted_to_the_delete_handler(view):
    state, done, ticks = view
    state.observe_vm(_vm(1, phase="Scheduled", deletionTimestamp="2026-01-01T00:00:00Z"))
    _run(sweep.Sweep(), 30.0, interval=1.0, ticks=ticks)
    assert not done


def test_the_view_forgets_vms_a_list_no_longer_shows_unless_newer_than_the_list():
    state = State()
    for i, rv in ((1, 5), (2, 6), (3, 50)):
        state.observe_vm(_vm(i, rv=rv))
    forgotten = state.prune_vms({"u-1"}, version=10)
    assert forgotten == ["vm/u-2"]  # u-3 was created after the LIST began
    assert state.vm("u-2") is None and state.vm("u-1") is not None and state.vm("u-3") is not None
    assert state.allocated()["n1"][2] == 2  # what the phantom held is free again


def test_the_view_does_not_forget_a_vm_for_its_age_alone():
    state = State()
    state.observe_vm(_vm(1))
    assert state.prune(max_age=-1.0) == []  # nothing touches a VM any more: only a LIST can drop it
    assert state.vm("u-1") is not None


def test_the_sweep_reconciles_a_settled_vm_at_its_next_look_once_its_status_changed(view):
    state, done, ticks = view
    state.observe_vm(_vm(1))
    s = sweep.Sweep()
    _run(s, 1.0 + 10.0, interval=10.0, ticks=ticks)  # looked at once: settled, not reconciled
    assert not done
    state.observe_vm(_vm(1, phase="Stopped", rv=8))  # the node reports the guest powered off
    _run(s, 10.0, interval=10.0, ticks=ticks, start=11.0)
    assert done["u-1"] == 1  # runStrategy Always: the start is decided within one interval
