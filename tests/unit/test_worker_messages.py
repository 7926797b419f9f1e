"""A VM task's message is a claim: namespace, name and uid must all match the object the API
server holds (and what the node recorded for the uid), or it is dropped."""

from __future__ import annotations

import pytest

from mikrom.worker.messages import mismatch

UID = "0b5c6f3e-8d7e-4a43-9a57-1f0e2d3c4b5a"


def vm(namespace="team-a", name="web", uid=UID, **meta) -> dict:
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid, **meta}}


def nothing_held() -> dict:
    return {}


def never_read() -> dict:
    raise AssertionError("the node's records were read for a uid that is no object's")


def test_a_message_matching_the_object_is_acted_on():
    assert mismatch("team-a", "web", UID, vm(), nothing_held) is None
    assert mismatch("team-a", "web", UID, vm(deletionTimestamp="2024-01-01T00:00:00Z"),
                    lambda: {"namespace": "team-a", "name": "web"}) is None


def test_a_message_naming_no_object_is_dropped_without_reading_the_nodes_records():
    assert mismatch("team-a", "ghost", UID, None, never_read) == "no MicroVM team-a/ghost"


def test_a_message_whose_uid_is_not_the_named_objects_is_dropped_without_reading_the_nodes_records():
    why = mismatch("team-a", "web", "../../etc", vm(), never_read)
    assert why and "uid differs" in why and UID not in why  # the real uid is not echoed


def test_a_uid_this_node_holds_under_another_name_is_not_acted_on_under_the_messages_name():
    why = mismatch("team-a", "web", UID, vm(), lambda: {"namespace": "team-b", "name": "db"})
    assert why == f"this node holds uid {UID} for team-b/db, not team-a/web"


@pytest.mark.parametrize("read", [vm(namespace="team-b"), vm(name="other")])
def test_an_object_that_is_not_the_one_asked_for_is_never_taken_for_it(read):
    assert mismatch("team-a", "web", UID, read, nothing_held)
