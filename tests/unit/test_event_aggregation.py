"""Which Event a repeated report lands on: identical ones share one deterministic name, distinct
messages with one reason get their own until SIMILAR_LIMIT, then one combined Event."""

from __future__ import annotations

from mikrom import kube

VM = {"metadata": {"namespace": "ns", "name": "vm", "uid": "u-agg"}}


def test_identical_events_share_one_name_and_keep_their_message():
    a = kube.event_key(VM, "ImageNotFound", "rootfs missing", "Warning", "mikrom-worker")
    b = kube.event_key(VM, "ImageNotFound", "rootfs missing", "Warning", "mikrom-worker")
    assert a == b and a[0].startswith("vm.") and a[1] == "rootfs missing"


def test_another_reason_type_component_or_object_is_another_event():
    base = kube.event_key(VM, "R", "m", "Warning", "c")[0]
    assert kube.event_key(VM, "S", "m", "Warning", "c")[0] != base
    assert kube.event_key(VM, "R", "m", "Normal", "c")[0] != base
    assert kube.event_key(VM, "R", "m", "Warning", "d")[0] != base
    other = {"metadata": {"namespace": "ns", "name": "vm", "uid": "u-other"}}
    assert kube.event_key(other, "R", "m", "Warning", "c")[0] != base


def test_past_the_similar_limit_distinct_messages_are_combined_into_one_event():
    clock = [0.0]
    vm = {"metadata": {"namespace": "ns", "name": "vm", "uid": "u-similar"}}
    keys = [kube.event_key(vm, "Retry", f"attempt {i}", "Warning", "c", clock=lambda: clock[0]) for i in range(30)]
    distinct = {name for name, _ in keys}
    assert len(distinct) == kube.SIMILAR_LIMIT + 1
    assert keys[29][1] == "(combined from similar events): attempt 29"
    # an earlier message still counts onto its own Event
    assert kube.event_key(vm, "Retry", "attempt 3", "Warning", "c", clock=lambda: clock[0]) == keys[3]
    clock[0] += kube.SIMILAR_WINDOW + 1  # a quiet window later, messages get their own Events again
    assert kube.event_key(vm, "Retry", "attempt 40", "Warning", "c", clock=lambda: clock[0])[1] == "attempt 40"


def test_the_name_stays_a_valid_object_name_for_long_object_names():
    vm = {"metadata": {"namespace": "ns", "name": "a" * 253, "uid": "u-long"}}
    assert len(kube.event_key(vm, "R", "m", "Normal", "c")[0]) <= 253
