"""The operator judges a node's heartbeat by its own clock: the age is the time since it first saw
the heartbeat's current value, whatever the worker's clock wrote (pure)."""

from __future__ import annotations

import pytest

from mikrom import names
from mikrom.operator import health
from mikrom.operator.decide import rfc3339
from mikrom.operator.heartbeats import Beats, counted_from, observe

NOW = 1_800_000_000.0
LOST_AFTER = 40.0


def node(name="n1", beat=None):
    return {"metadata": {"name": name}, "status": {"lastHeartbeatTime": beat} if beat else {}}


@pytest.mark.parametrize("previous,value,expected", [
    (None, "2026-01-01T00:00:00Z", ("2026-01-01T00:00:00Z", NOW)),  # first sight: seen now
    (("2026-01-01T00:00:00Z", NOW - 30), "2026-01-01T00:00:00Z", ("2026-01-01T00:00:00Z", NOW - 30)),  # unchanged
    (("2026-01-01T00:00:00Z", NOW - 30), "2026-01-01T00:00:01Z", ("2026-01-01T00:00:01Z", NOW)),  # a new beat
    (("2026-01-01T00:00:01Z", NOW - 30), "2026-01-01T00:00:00Z", ("2026-01-01T00:00:00Z", NOW)),  # any change
    (("2026-01-01T00:00:00Z", NOW - 30), None, None),  # no heartbeat at all
])
def test_a_heartbeat_is_seen_when_its_value_changes(previous, value, expected):
    assert observe(previous, value, NOW) == expected


@pytest.mark.parametrize("skew", [-300.0, 0.0, 300.0])
def test_the_age_is_the_operators_not_the_workers(skew):
    beat = rfc3339(NOW + skew)
    assert health.health(node(beat=beat), NOW, LOST_AFTER, NOW - 5).ready
    lost = health.health(node(beat=beat), NOW, LOST_AFTER, NOW - 41)
    assert not lost.ready and lost.reason == names.NODE_LOST and beat in lost.message


def test_after_a_restart_every_node_counts_as_seen_now_and_a_frozen_heartbeat_ages():
    beats = Beats()  # a fresh process: a heartbeat written an hour ago (or frozen) is not lost at once
    old = node(beat=rfc3339(NOW - 3600))
    assert beats.observe(old, NOW, LOST_AFTER) == NOW
    assert health.health(old, NOW, LOST_AFTER, beats.observe(old, NOW, LOST_AFTER)).ready
    assert beats.observe(old, NOW + 41, LOST_AFTER) == NOW, "the same value again is no heartbeat"
    assert not health.health(old, NOW + 41, LOST_AFTER, beats.observe(old, NOW + 41, LOST_AFTER)).ready
    fresh = node(beat=rfc3339(NOW - 3599))
    assert beats.observe(fresh, NOW + 42, LOST_AFTER) == NOW + 42


def test_after_a_restart_a_node_already_marked_lost_stays_lost_until_its_heartbeat_changes():
    marked = {"type": names.READY, "status": "False", "reason": names.NODE_LOST,
              "lastTransitionTime": rfc3339(NOW - 100)}
    lost = {**node(beat=rfc3339(NOW - 3600)), "status": {"lastHeartbeatTime": rfc3339(NOW - 3600),
                                                          "conditions": [marked]}}
    beats = Beats()
    at = beats.observe(lost, NOW, LOST_AFTER)
    assert at == NOW - 100 - LOST_AFTER, "lost as long as the previous process counted"
    assert not health.health(lost, NOW, LOST_AFTER, at).ready
    beaten = {**lost, "status": {**lost["status"], "lastHeartbeatTime": rfc3339(NOW - 3599)}}
    assert health.health(beaten, NOW + 1, LOST_AFTER, beats.observe(beaten, NOW + 1, LOST_AFTER)).ready
    other = {**lost, "status": {**lost["status"], "conditions": [{**marked, "reason": "NoHeartbeat"}]}}
    assert Beats().observe(other, NOW, LOST_AFTER) == NOW


def test_nodes_no_longer_there_are_forgotten_and_nodes_without_a_heartbeat_have_no_time():
    beats = Beats()
    assert beats.observe_all({"a": node("a", "x"), "b": node("b")}, NOW, LOST_AFTER) == {"a": NOW}
    assert beats.observe_all({}, NOW + 1, LOST_AFTER) == {}
    assert beats.observe_all({"a": node("a", "x")}, NOW + 2, LOST_AFTER) == {"a": NOW + 2}, "seen again as new"


def test_the_brake_holds_only_above_the_share_or_the_count():
    assert health.brake(1, 2, 0.5, 0) is None
    assert "2 of 3" in health.brake(2, 3, 0.5, 0)
    assert health.brake(1, 1, 0.5, 0) is not None
    assert health.brake(2, 10, 0.5, 1) is not None and health.brake(1, 10, 0.5, 1) is None
    assert health.brake(0, 0, 0.5, 0) is None


# The operator's own blindness (it cannot read the API server): no heartbeat ages while it is
# blind, and ages count from when it could see again. Rows: (seen_at, blind, sight_from,
# lost_before) -> the time the age counts from, at NOW.
@pytest.mark.parametrize("seen_at,blind,sight_from,lost_before,expected", [
    (NOW - 30, False, None, False, NOW - 30),                   # never blind: when the value was seen
    (NOW - 30, True, None, False, NOW),                         # blind: no age at all
    (NOW - 300, True, None, True, NOW - LOST_AFTER - 1),         # blind, lost before: lost, not nearer
    (NOW - 300, False, NOW - 5, False, NOW - 5),                 # seen again 5 s ago: counts from then
    (NOW - 2, False, NOW - 5, False, NOW - 2),                   # a heartbeat since the return: its own
    (NOW - 300, False, NOW - 5, True, NOW - LOST_AFTER - 1),     # lost before: still lost after the return
    (NOW - 300, False, NOW - 200, True, NOW - 200),              # ... and ages from the return later on
])
def test_heartbeat_ages_count_from_when_the_operator_could_see_again(seen_at, blind, sight_from, lost_before,
                                                                      expected):
    assert counted_from(seen_at, NOW, LOST_AFTER, blind, sight_from, lost_before) == expected


def test_an_api_outage_the_operator_saw_neither_loses_nodes_nor_reschedules_on_its_return():
    fence, margin = 60.0, 30.0
    beats = Beats()
    alive, dead = node("alive", "a1"), node("dead", "d1")
    beats.observe_all({"alive": node("alive", "a0"), "dead": dead}, NOW - 200, LOST_AFTER)  # dead: never again
    beats.observe(alive, NOW - 150, LOST_AFTER)  # its last beat the operator saw before it went blind
    assert beats.blind(NOW - 150, LOST_AFTER) and not beats.blind(NOW - 100, LOST_AFTER)
    assert beats.is_blind
    during = beats.observe_all({"alive": alive, "dead": dead}, NOW - 10, LOST_AFTER)
    assert health.health(alive, NOW - 10, LOST_AFTER, during["alive"]).ready, "blind: not lost"
    assert not health.health(dead, NOW - 10, LOST_AFTER, during["dead"]).ready, "lost before stays lost"
    assert beats.sighted(NOW) == 150.0 and beats.sighted(NOW) is None
    back = beats.observe_all({"alive": alive, "dead": dead}, NOW, LOST_AFTER)
    assert health.health(alive, NOW, LOST_AFTER, back["alive"]).ready, "the stale value is not lost on the return"
    vm = {"metadata": {}, "spec": {"runStrategy": "Always"}, "status": {"phase": "Unknown"}}
    for n, obj in (("alive", alive), ("dead", dead)):
        assert health.reschedule_due(vm, obj, NOW, fence, margin, back[n]) is None, n
    later = NOW + fence + margin + 1
    after = beats.observe_all({"alive": alive, "dead": dead}, later, LOST_AFTER)
    for n, obj in (("alive", alive), ("dead", dead)):  # no heartbeat since the return: both move now
        assert health.reschedule_due(vm, obj, later, fence, margin, after[n]) is not None, n
    beaten = node("alive", "a2")
    assert beats.observe(beaten, later, LOST_AFTER) == later


def test_an_operator_that_was_itself_stopped_counts_the_gap_as_blindness():
    beats = Beats()
    beats.frozen_after = 45.0
    alive, dead = node("alive", "a1"), node("dead", "d1")
    beats.observe_all({"alive": node("alive", "a0"), "dead": dead}, NOW - 110, LOST_AFTER)
    beats.observe_all({"alive": node("alive", "a0"), "dead": dead}, NOW - 75, LOST_AFTER)
    beats.observe(alive, NOW - 60, LOST_AFTER)  # then the operator is frozen for a minute
    back = beats.observe_all({"alive": alive, "dead": dead}, NOW, LOST_AFTER)
    assert back["alive"] == NOW, "ages count from the thaw"
    assert not health.health(dead, NOW, LOST_AFTER, back["dead"]).ready, "lost before the freeze: still lost"
    assert not beats.is_blind
    steady = beats.observe_all({"alive": alive, "dead": dead}, NOW + 44, LOST_AFTER)
    assert steady["alive"] == NOW, "a gap shorter than frozen_after is no blindness"
