"""The operator parses API bodies without `metadata.managedFields`, and the one place it reaches
into kopf for that (the watch streams' `json.loads`) is still where kopf parses its watch lines."""

from __future__ import annotations

import inspect
import json

from kopf._cogs.clients import api as kopf_api

from mikrom.operator import slimbodies


def _obj(name: str) -> dict:
    return {"metadata": {"name": name, "uid": f"u-{name}", "managedFields": [{"manager": "kubectl"}] * 3},
            "spec": {"vcpus": 1}}


def test_kopf_parses_each_watch_line_with_its_api_modules_json_loads():
    # If kopf moves its watch-line parsing, `slimbodies.install` no longer applies: this fails first.
    source = inspect.getsource(kopf_api.stream)
    assert "json.loads(" in source and "iter_jsonlines(" in source
    assert kopf_api.json in (json, slimbodies.SLIM_JSON)


def test_installed_kopf_parses_watch_events_without_managed_fields():
    slimbodies.install()
    event = kopf_api.json.loads(json.dumps({"type": "MODIFIED", "object": _obj("a")}))
    assert event == {"type": "MODIFIED", "object": {"metadata": {"name": "a", "uid": "u-a"}, "spec": {"vcpus": 1}}}
    assert kopf_api.json.JSONDecodeError is json.JSONDecodeError  # the rest of json as it was


def test_strip_drops_managed_fields_of_an_object_an_event_and_a_lists_items_only():
    listing = slimbodies.strip({"kind": "MicroVMList", "metadata": {"resourceVersion": "9"},
                                "items": [_obj("a"), _obj("b"), "junk"]})
    assert [i["metadata"] for i in listing["items"][:2]] == [{"name": "a", "uid": "u-a"}, {"name": "b", "uid": "u-b"}]
    assert listing["items"][2] == "junk" and listing["metadata"] == {"resourceVersion": "9"}
    assert slimbodies.strip(_obj("c")) == {"metadata": {"name": "c", "uid": "u-c"}, "spec": {"vcpus": 1}}
    assert slimbodies.strip([1, 2]) == [1, 2] and slimbodies.strip(None) is None
    assert slimbodies.strip({"metadata": None, "object": "x"}) == {"metadata": None, "object": "x"}
