"""The status patch the worker writes: its own fields, Ready following the phase, no empty writes."""

from mikrom.worker.status import status_patch


def test_running_sets_ready_true_and_the_observed_generation():
    patch = status_patch({"phase": "Provisioning", "node": "n1"}, 3, "Running", "Running", "up", {"pid": 7}, None)
    assert patch["phase"] == "Running" and patch["pid"] == 7 and patch["observedGeneration"] == 3
    ready = [c for c in patch["conditions"] if c["type"] == "Ready"][0]
    assert ready["status"] == "True" and ready["observedGeneration"] == 3
    assert "node" not in patch  # never the operator's fields


def test_any_other_phase_sets_ready_false_with_its_reason():
    patch = status_patch({}, 1, "Failed", "ChecksumMismatch", "bad digest", {}, None)
    ready = patch["conditions"][0]
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "ChecksumMismatch", "bad digest")


def test_nothing_changed_means_no_patch():
    current = status_patch({}, 2, "Stopped", "Stopped", "stopped", {"pid": None}, None)
    current = {**current}
    assert status_patch(current, 2, "Stopped", "Stopped", "stopped", {"pid": None}, None) == {}


def test_a_field_set_to_none_is_removed_by_the_merge_patch():
    patch = status_patch({"phase": "Running", "pid": 9}, None, None, None, None, {"pid": None}, None)
    assert patch == {"pid": None}


def test_other_writers_conditions_are_kept():
    scheduled = {"type": "Scheduled", "status": "True", "reason": "Placed", "message": "", "lastTransitionTime": "t"}
    patch = status_patch({"conditions": [scheduled]}, 1, "Running", "Running", "up", {}, None)
    assert scheduled in patch["conditions"]
    assert {c["type"] for c in patch["conditions"]} == {"Scheduled", "Ready"}


def test_the_transition_time_moves_only_when_ready_flips():
    first = status_patch({}, 1, "Running", "Running", "up", {}, None)
    again = status_patch({"conditions": first["conditions"]}, 1, "Running", "Running", "up at last", {}, None)
    assert again["conditions"][0]["lastTransitionTime"] == first["conditions"][0]["lastTransitionTime"]
