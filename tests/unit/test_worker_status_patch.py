"""The status patch the worker writes: its own fields, Ready following the phase, no empty writes;
and the JSON patch of a guarded write, which tests what a decision rests on."""

from mikrom.worker.status import guarded_patch, status_patch


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


def _vm(status: dict) -> dict:
    return {"metadata": {"uid": "u-1", "generation": 4, "resourceVersion": "77"}, "status": status}


def test_a_guarded_write_tests_the_uid_generation_node_and_the_conditions_it_replaces_not_the_resource_version():
    conds = [{"type": "Scheduled", "status": "True"}]
    vm = _vm({"node": "n1", "phase": "Scheduled", "conditions": conds, "pid": 5})
    patch = status_patch(vm["status"], 4, "Provisioning", "Provisioning", "starting", {"pid": None}, None)
    ops = guarded_patch(vm, patch)
    tests = [op for op in ops if op["op"] == "test"]
    assert tests == [{"op": "test", "path": "/metadata/uid", "value": "u-1"},
                     {"op": "test", "path": "/metadata/generation", "value": 4},
                     {"op": "test", "path": "/status/node", "value": "n1"},
                     {"op": "test", "path": "/status/conditions", "value": conds}]
    assert not any("resourceVersion" in op["path"] for op in ops)
    changes = {op["path"]: (op["op"], op.get("value")) for op in ops if op["op"] != "test"}
    assert changes["/status/phase"] == ("add", "Provisioning")
    assert changes["/status/pid"] == ("remove", None)  # a field set to None that is there goes
    assert changes["/status/conditions"][0] == "add"
    assert ops[:len(tests)] == tests  # the tests come first: nothing applies unless all hold


def test_a_guarded_write_removes_only_fields_that_are_there_and_escapes_its_pointers():
    ops = guarded_patch(_vm({"node": "n1"}), {"pid": None, "a/b~c": 1})
    assert {"op": "remove", "path": "/status/pid"} not in ops  # not in the status: nothing to remove
    assert {"op": "add", "path": "/status/a~1b~0c", "value": 1} in ops


def test_an_empty_guarded_write_is_its_tests_alone():
    assert [op["op"] for op in guarded_patch(_vm({"node": "n1"}), {})] == ["test", "test", "test"]
