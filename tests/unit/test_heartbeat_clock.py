"""The operator judges a node's heartbeat by its own clock: the age is the time since it first saw
the heartbeat's current value, whatever the worker's clock wrote (pure)."""

from __future__ import annotations

import pytest

from mikrom import names
from mikrom.operator import health
from mikrom.operator.decide import rfc3339
from mikrom.operator.heartbeats import Beats, observe

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
