"""When the operator may place a lost node's VM elsewhere (pure)."""

from __future__ import annotations

import pytest

from mikrom import conditions, names
from mikrom.operator import health as nodes

NOW = 1_800_000_000.0
FENCE, MARGIN = 60.0, 30.0


def stamp(seconds_ago: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(NOW - seconds_ago, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def node(beat_ago: float | None) -> dict:
    return {"metadata": {"name": "n1"}, "status": {"lastHeartbeatTime": stamp(beat_ago)} if beat_ago is not None else {}}


def vm(run="Always", phase="Unknown", node_name=None, deleting=False, unreachable_ago=None) -> dict:
    status = {"phase": phase, "node": "n1"}
    if unreachable_ago is not None:
        status["conditions"] = [{"type": names.NODE_REACHABLE, "status": "False", "reason": names.NODE_LOST,
                                 "lastTransitionTime": stamp(unreachable_ago)}]
    spec = {"runStrategy": run} if run else {}
    if node_name:
        spec["nodeName"] = node_name
    meta = {"name": "v", "namespace": "ns", "uid": "u"}
    if deleting:
        meta["deletionTimestamp"] = stamp(1)
    return {"metadata": meta, "spec": spec, "status": status}


def seen(n):
    """When an operator that saw the heartbeat as it was written first observed it."""
    beat = ((n or {}).get("status") or {}).get("lastHeartbeatTime")
    return conditions.parse_time(beat).timestamp() if beat else None


def due(v, n):
    return nodes.reschedule_due(v, n, NOW, FENCE, MARGIN, seen(n))


@pytest.mark.parametrize("run", ["Always", "RerunOnFailure", None])
def test_a_vm_that_should_run_moves_only_after_the_fence_time_plus_the_margin(run):
    assert due(vm(run), node(FENCE + MARGIN - 1)) is None
    assert due(vm(run), node(FENCE + MARGIN + 5)) == pytest.approx(FENCE + MARGIN + 5)


@pytest.mark.parametrize("run", ["Once", "Halted"])
def test_a_vm_that_need_not_run_stays_with_its_node(run):
    assert due(vm(run), node(3600)) is None


def test_a_pinned_finished_or_deleted_vm_stays():
    assert due(vm(node_name="n1"), node(3600)) is None
    assert due(vm(phase="Succeeded"), node(3600)) is None
    assert due(vm(deleting=True), node(3600)) is None


def test_without_a_node_object_the_time_since_the_vm_became_unreachable_counts():
    assert due(vm(unreachable_ago=10), None) is None
    assert due(vm(unreachable_ago=FENCE + MARGIN + 1), None) == pytest.approx(FENCE + MARGIN + 1)
    assert due(vm(), None) is None, "nothing says how long: wait"
    assert nodes.lost_for(node(None), vm(unreachable_ago=5)["status"], NOW, None) == pytest.approx(5)


def test_times_parse_as_the_api_server_writes_them():
    assert conditions.parse_time(stamp(0)).timestamp() == NOW
