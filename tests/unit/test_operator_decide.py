"""The operator's decision as a table: one row per rule of docs/protocol.md that the operator owns.

`decide` is pure, so each row is an object, a cluster view, a clock and the settings in, and the
status patch, messages, events and finalizer/requeue verdict out.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from mikrom import conditions, names
from mikrom.names import Intent, Phase
from mikrom.operator import lifecycle
from mikrom.operator.decide import (DISK_RESET, DISK_RESET_REASON, RESCHEDULING_HELD, ClusterView, Sent, decide,
                                   rfc3339)
from mikrom.operator.placement import NodeView
from mikrom.settings import Settings

NOW = 1_800_000_000.0
SETTINGS = Settings(node_lost_after_seconds=40, self_fence_after_seconds=60, reschedule_margin_seconds=30,
                    progress_timeout_seconds=120, dispatch_backoff_seconds=5, max_dispatch_attempts=4,
                    delete_wait_seconds=60)
IMAGE = {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}


def node(name="n1", beat_age=1.0, cidr=None, labels=None):
    spec = {"cidr": cidr, "pool": "default"} if cidr else {}
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec,
            "status": {"lastHeartbeatTime": rfc3339(NOW - beat_age), "capacity": {"vcpus": 4, "memoryMiB": 4096}}}


def vm(status=None, spec=None, meta=None):
    return {"metadata": {"namespace": "ns", "name": "vm", "uid": "u1", "generation": 1, "resourceVersion": "7",
                         "finalizers": [names.FINALIZER], **(meta or {})},
            "spec": {"vcpus": 1, "memoryMiB": 128, "image": IMAGE, **(spec or {})},
            "status": status or {}}


def dispatched(intent="create", attempts=1, sent_age=1.0, task="t1", key=None):
    return {"intent": intent, "attempts": attempts, "sentAt": rfc3339(NOW - sent_age, precise=True),
            "taskId": task, "key": key or f"{intent}/u1"}


def view(nodes=None, **kw):
    nodes = {"n1": node()} if nodes is None else nodes
    views = tuple(NodeView(name=n, ready=True, capacity_vcpus=4, capacity_memory_mib=4096, pool=None,
                           can_carve=True) for n in nodes)
    kw.setdefault("node_views", views)
    # an operator that observed each node's heartbeat value change when the worker wrote it
    kw.setdefault("beats", {n: conditions.parse_time(o["status"]["lastHeartbeatTime"]).timestamp()
                            for n, o in nodes.items() if (o.get("status") or {}).get("lastHeartbeatTime")})
    return ClusterView(nodes=nodes, pools={"default": {"spec": {"cidr": "10.200.0.0/16"}}}, **kw)


def placed(phase="Running", **st):
    return {"phase": phase, "node": "n1", "dispatch": dispatched(), **st}


# ---------------------------------------------------------------------------- no node

def test_an_invalid_spec_fails_with_invalid_spec_naming_the_field():
    d = decide(vm(spec={"image": {"kernel": {"path": "../etc/shadow"}, "initrd": {"path": "i"}}}), view(), NOW,
               SETTINGS)
    assert d.status_patch["phase"] == Phase.FAILED.value and d.status_patch["reason"] == names.INVALID_SPEC
    assert "spec.image.kernel.path" in d.status_patch["message"]
    assert d.messages == () and d.placement is None
    assert d.events[0].reason == names.INVALID_SPEC and d.events[0].warning


def test_a_vm_no_node_can_take_stays_pending_unschedulable_saying_what_is_short():
    d = decide(vm(spec={"vcpus": 8}), view(), NOW, SETTINGS)
    assert d.status_patch["phase"] == Phase.PENDING.value and d.status_patch["reason"] == names.UNSCHEDULABLE
    assert "too few free vCPUs" in d.status_patch["message"]
    cond = d.status_patch["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == (names.SCHEDULED, "False", names.UNSCHEDULABLE)
    assert d.messages == () and d.release


def test_an_unschedulable_vm_already_saying_so_writes_nothing():
    first = decide(vm(spec={"vcpus": 8}), view(), NOW, SETTINGS)
    again = decide(vm(status=dict(first.status_patch), spec={"vcpus": 8}), view(), NOW + 5, SETTINGS)
    assert again.status_patch is None and again.events == ()


def _labelled(labels):
    return (NodeView(name="n1", ready=True, labels=labels, capacity_vcpus=4, capacity_memory_mib=4096),)


@pytest.mark.parametrize("spec, missing", [
    ({"nodeSelector": {"disk": "ssd"}}, "no MicroVMNode matches spec.nodeSelector {disk=ssd}"),
    ({"nodeName": "later"}, "no MicroVMNode named later (spec.nodeName) is registered"),
    ({"nodeName": "n1", "nodeSelector": {"disk": "ssd"}},
     "no MicroVMNode named n1 (spec.nodeName) with the labels {disk=ssd} (spec.nodeSelector)"),
])
def test_a_node_selector_or_node_name_no_node_offers_yet_is_pending_unschedulable_not_invalid(spec, missing):
    d = decide(vm(spec=spec), view(node_views=_labelled({"disk": "hdd"})), NOW, SETTINGS)
    assert d.status_patch["phase"] == Phase.PENDING.value and d.status_patch["reason"] == names.UNSCHEDULABLE
    assert d.status_patch["message"].startswith(missing), d.status_patch["message"]
    cond = d.status_patch["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == (names.SCHEDULED, "False", names.UNSCHEDULABLE)
    assert d.events[0].reason == names.UNSCHEDULABLE and d.events[0].warning and d.messages == ()


def test_the_unschedulable_vm_is_placed_once_a_matching_node_appears():
    spec = {"nodeSelector": {"disk": "ssd"}}
    first = decide(vm(spec=spec), view(node_views=_labelled({"disk": "hdd"})), NOW, SETTINGS)
    d = decide(vm(status=dict(first.status_patch), spec=spec), view(node_views=_labelled({"disk": "ssd"})),
               NOW + 1, SETTINGS)
    assert d.status_patch["node"] == "n1" and d.status_patch["phase"] == Phase.SCHEDULED.value
    assert [m.intent for m in d.messages] == [Intent.CREATE]


def test_a_node_cordoned_through_its_kubernetes_node_is_not_chosen_and_the_message_says_so():
    views = (NodeView(name="n1", ready=True, capacity_vcpus=4, capacity_memory_mib=4096,
                      cordoned_by="Node n1 is cordoned (spec.unschedulable)"),)
    d = decide(vm(), view(node_views=views), NOW, SETTINGS)
    assert d.status_patch["reason"] == names.UNSCHEDULABLE
    assert "n1: cordoned: Node n1 is cordoned (spec.unschedulable)" in d.status_patch["message"]


def test_placement_node_and_create_dispatch_are_one_write_then_one_message():
    d = decide(vm(), view(), NOW, SETTINGS)
    p = d.status_patch
    assert (p["phase"], p["node"], p["reason"]) == (Phase.SCHEDULED.value, "n1", names.PLACED)
    assert p["dispatch"]["intent"] == "create" and p["dispatch"]["attempts"] == 1
    assert p["dispatch"]["key"] == lifecycle.key_for(vm(), Intent.CREATE)
    (msg,) = d.messages
    assert (msg.intent, msg.task_id, msg.why) == (Intent.CREATE, p["dispatch"]["taskId"], "new")
    assert d.placement.node == "n1" and d.placement.carve_pool is None
    assert [c["type"] for c in p["conditions"]] == [names.SCHEDULED]


def test_a_networked_vm_on_a_node_without_a_block_asks_for_one_carved():
    d = decide(vm(spec={"network": {"pool": "default"}}), view(), NOW, SETTINGS)
    assert d.placement.carve_pool == "default"


def test_a_vm_holding_a_reservation_is_placed_on_that_node():
    d = decide(vm(), view(nodes={"n1": node(), "n2": node("n2")}, node_views=(), reserved="n2"), NOW, SETTINGS)
    assert d.status_patch["node"] == "n2"


def test_a_placement_decided_again_after_its_create_went_keeps_the_node_and_record_and_sends_nothing():
    # the create went before its write; the write met a 409 (the object changed): the decision
    # again writes the node and the dispatch record of the message already sent, and sends nothing
    first = decide(vm(), view(nodes={"n1": node(), "n2": node("n2")}), NOW, SETTINGS)
    sent = Sent(first.status_patch["node"], first.status_patch["dispatch"])
    changed = vm(meta={"resourceVersion": "8", "labels": {"team": "a"}})
    again = decide(changed, view(nodes={"n1": node(), "n2": node("n2")}, node_views=(), reserved=sent.node,
                                 sent=sent), NOW + 0.02, SETTINGS)
    assert again.messages == ()
    assert again.status_patch["node"] == sent.node and again.status_patch["dispatch"] == first.status_patch["dispatch"]
    assert again.status_patch["phase"] == Phase.SCHEDULED.value and again.placement.node == sent.node
    # even where another node would be chosen now (the reservation went with a failed write)
    elsewhere = decide(changed, view(nodes={"n2": node("n2"), "n1": node()}, sent=Sent("n1", sent.record)),
                       NOW + 0.02, SETTINGS)
    assert elsewhere.status_patch["node"] == "n1" and elsewhere.messages == ()


def test_a_placement_decided_again_after_its_create_went_still_fails_a_spec_made_invalid_meanwhile():
    sent = Sent("n1", dispatched(task="t-sent"))
    d = decide(vm(spec={"vcpus": 0}), view(sent=sent), NOW, SETTINGS)
    assert d.status_patch["phase"] == Phase.FAILED.value and "node" not in d.status_patch and d.messages == ()


def test_a_new_vm_without_the_finalizer_is_placed_and_dispatched_in_its_one_status_write():
    # the finalizer is kopf's own patch after the send: nothing of the decision waits for it
    bare = decide(vm(meta={"finalizers": []}), view(), NOW, SETTINGS)
    assert bare == decide(vm(), view(), NOW, SETTINGS)
    assert bare.status_patch["node"] == "n1" and bare.status_patch["dispatch"]["intent"] == "create"
    assert [m.intent for m in bare.messages] == [Intent.CREATE]


def test_decide_is_pure_same_inputs_same_decision_and_the_object_untouched():
    obj = vm(status=placed(phase="Scheduled", dispatch=dispatched(sent_age=500)))
    before = copy.deepcopy(obj)
    assert decide(obj, view(delivered="t1"), NOW, SETTINGS) == decide(obj, view(delivered="t1"), NOW, SETTINGS)
    assert obj == before


# ---------------------------------------------------------------------------- node lost

def test_a_lost_node_makes_its_vm_unknown_with_node_reachable_false():
    d = decide(vm(status=placed()), view(nodes={"n1": node(beat_age=50)}, delivered="t1"), NOW, SETTINGS)
    assert d.status_patch["phase"] == Phase.UNKNOWN.value and d.status_patch["reason"] == names.NODE_LOST
    cond = d.status_patch["conditions"][0]
    assert (cond["type"], cond["status"]) == (names.NODE_REACHABLE, "False")
    assert d.events[0].reason == names.NODE_LOST and d.messages == ()


def test_a_vm_already_unknown_on_a_lost_node_writes_nothing_more():
    first = decide(vm(status=placed()), view(nodes={"n1": node(beat_age=50)}), NOW, SETTINGS)
    st = {**placed(), **first.status_patch}
    # the same lost heartbeat, looked at 5 s later
    assert decide(vm(status=st), view(nodes={"n1": node(beat_age=50)}), NOW + 5, SETTINGS).status_patch is None


def test_past_self_fence_plus_margin_the_vm_is_taken_off_its_node_to_be_placed_again():
    st = placed(phase="Unknown", ipAddress="10.0.0.5", pid=42)
    d = decide(vm(status=st), view(nodes={"n1": node(beat_age=91), "n2": node("n2")}), NOW, SETTINGS)
    p = d.status_patch
    assert (p["phase"], p["node"], p["reason"]) == (Phase.PENDING.value, None, names.RESCHEDULING)
    assert p["ipAddress"] is None and p["pid"] is None and p["dispatch"] is None
    assert {c["type"]: c["status"] for c in p["conditions"]} == {names.SCHEDULED: "False", names.READY: "False",
                                                                 DISK_RESET: "True"}
    assert d.requeue_after == 0.0 and d.events[0].reason == names.RESCHEDULING and d.metric == "reschedule"


def test_the_rescheduled_vm_is_placed_on_another_node_at_the_next_decision():
    evicted = decide(vm(status=placed(phase="Unknown")), view(nodes={"n1": node(beat_age=91), "n2": node("n2")}),
                     NOW, SETTINGS)
    st = {k: v for k, v in {**placed(phase="Unknown"), **evicted.status_patch}.items() if v is not None}
    nodes = {"n1": node(beat_age=91), "n2": node("n2")}
    d = decide(vm(status=st), view(nodes=nodes, node_views=(NodeView("n2", ready=True, capacity_vcpus=4,
                                                                             capacity_memory_mib=4096),)), NOW,
               SETTINGS)
    assert d.status_patch["node"] == "n2" and d.messages[0].intent is Intent.CREATE


# ---------------------------------------------------------------------------- heartbeats by the operator's clock

@pytest.mark.parametrize("skew", [-300.0, 300.0])
def test_a_node_whose_clock_is_off_but_whose_heartbeat_keeps_changing_is_ready(skew):
    # the worker's timestamp is 5 minutes off; the operator saw it change 1 s ago
    nodes = {"n1": node(beat_age=-skew)}
    d = decide(vm(status=placed()), view(nodes=nodes, beats={"n1": NOW - 1}, delivered="t1"), NOW, SETTINGS)
    assert "phase" not in (d.status_patch or {}) and d.events == ()


def test_a_heartbeat_from_the_future_that_stops_changing_is_no_heartbeat():
    nodes = {"n1": node(beat_age=-300)}  # it reads 5 minutes ahead, but it has not changed for 50 s
    d = decide(vm(status=placed()), view(nodes=nodes, beats={"n1": NOW - 50}, delivered="t1"), NOW, SETTINGS)
    assert (d.status_patch["phase"], d.status_patch["reason"]) == (Phase.UNKNOWN.value, names.NODE_LOST)


def test_rescheduling_counts_from_when_the_operator_saw_the_last_heartbeat_not_from_its_timestamp():
    nodes = {"n1": node(beat_age=3600), "n2": node("n2")}  # the timestamp is an hour old, seen 50 s ago
    d = decide(vm(status=placed(phase="Unknown")), view(nodes=nodes, beats={"n1": NOW - 50, "n2": NOW}), NOW,
               SETTINGS)
    assert "node" not in (d.status_patch or {}), "50 s is short of selfFenceAfterSeconds plus the margin"
    d = decide(vm(status=placed(phase="Unknown")), view(nodes=nodes, beats={"n1": NOW - 91, "n2": NOW}), NOW,
               SETTINGS)
    assert d.status_patch["node"] is None and d.status_patch["reason"] == names.RESCHEDULING


def test_a_node_whose_heartbeat_the_operator_has_not_observed_is_not_ready():
    d = decide(vm(status=placed()), view(nodes={"n1": node()}, beats={}, delivered="t1"), NOW, SETTINGS)
    assert d.status_patch["phase"] == Phase.UNKNOWN.value


# ---------------------------------------------------------------------------- the brake on mass eviction

def lost_cluster(lost: int, total: int) -> dict:
    return {f"n{i}": node(f"n{i}", beat_age=91 if i <= lost else 1.0) for i in range(1, total + 1)}


@pytest.mark.parametrize("lost,total,moves", [
    (1, 3, True), (2, 3, False), (3, 3, False),
    (1, 2, True),  # half of the nodes is not more than rescheduleMaxLostFraction 0.5: two nodes fail over
    (1, 1, False),  # the only node: all of them (and nowhere to go)
    (2, 4, True), (3, 4, False),
])
def test_rescheduling_is_held_while_more_than_the_share_of_nodes_is_lost(lost, total, moves):
    d = decide(vm(status=placed(phase="Unknown")), view(nodes=lost_cluster(lost, total)), NOW, SETTINGS)
    assert (d.status_patch is not None and d.status_patch.get("reason") == names.RESCHEDULING) is moves
    if not moves:
        held = next(c for c in d.status_patch["conditions"] if c["type"] == RESCHEDULING_HELD)
        assert held["status"] == "True" and f"{lost} of {total} MicroVMNodes" in held["message"]
        [event] = [e for e in d.events if e.reason == RESCHEDULING_HELD]
        assert event.warning and "rescheduleMaxLostFraction (0.5)" in event.message and d.messages == ()


def test_an_absolute_limit_of_lost_nodes_holds_rescheduling_too():
    settings = replace(SETTINGS, reschedule_max_lost_nodes=1)
    d = decide(vm(status=placed(phase="Unknown")), view(nodes=lost_cluster(2, 10)), NOW, settings)
    assert "node" not in d.status_patch and "rescheduleMaxLostNodes (1)" in d.events[0].message


def test_a_held_vm_says_so_once():
    first = decide(vm(status=placed()), view(nodes=lost_cluster(2, 3)), NOW, SETTINGS)
    st = {**placed(), **first.status_patch}
    assert [e.reason for e in first.events] == [names.NODE_LOST, RESCHEDULING_HELD]
    again = decide(vm(status=st), view(nodes=lost_cluster(2, 3)), NOW + 5, SETTINGS)
    assert again.status_patch is None and again.events == ()


def test_a_held_vm_moves_once_the_other_nodes_return_and_stays_when_its_own_does():
    held = decide(vm(status=placed(phase="Unknown")), view(nodes=lost_cluster(2, 3)), NOW, SETTINGS)
    st = {**placed(phase="Unknown"), **held.status_patch}
    moved = decide(vm(status=st), view(nodes=lost_cluster(1, 3)), NOW, SETTINGS)
    assert moved.status_patch["reason"] == names.RESCHEDULING
    assert {c["type"]: c["status"] for c in moved.status_patch["conditions"]}[RESCHEDULING_HELD] == "False"
    back = decide(vm(status=st), view(nodes=lost_cluster(0, 3), delivered="t1"), NOW, SETTINGS)
    assert {c["type"]: c["status"] for c in back.status_patch["conditions"]}[RESCHEDULING_HELD] == "False"


# ---------------------------------------------------------------------------- the disk of a rescheduled VM

def test_a_rescheduled_vm_is_marked_disk_reset_with_an_event_saying_so():
    d = decide(vm(status=placed(phase="Unknown")), view(nodes=lost_cluster(1, 2)), NOW, SETTINGS)
    reset = next(c for c in d.status_patch["conditions"] if c["type"] == DISK_RESET)
    assert (reset["status"], reset["reason"]) == ("True", DISK_RESET_REASON)
    [event] = [e for e in d.events if e.reason == DISK_RESET]
    assert event.warning and "fresh copy of the VM's image" in event.message and "n1" in event.message
    # and it stays through the placement on the new node
    st = {k: v for k, v in {**placed(phase="Unknown"), **d.status_patch}.items() if v is not None}
    placed_again = decide(vm(status=st), view(nodes=lost_cluster(1, 2), node_views=(
        NodeView("n2", ready=True, capacity_vcpus=4, capacity_memory_mib=4096),)), NOW, SETTINGS)
    assert placed_again.status_patch["node"] == "n2"
    assert {c["type"]: c["status"] for c in placed_again.status_patch["conditions"]}[DISK_RESET] == "True"


@pytest.mark.parametrize("spec", [{"nodeName": "n1"}, {"runStrategy": "Once"}, {"runStrategy": "Halted"}])
def test_pinned_once_and_halted_vms_stay_unknown_until_their_node_returns(spec):
    st = placed(phase="Unknown")
    d = decide(vm(status=st, spec=spec), view(nodes={"n1": node(beat_age=500)}), NOW, SETTINGS)
    assert "node" not in (d.status_patch or {}) and "phase" not in (d.status_patch or {})
    assert d.requeue_after is None and d.messages == ()


def test_rescheduling_off_keeps_the_vm_unknown():
    off = Settings(**{**SETTINGS.__dict__, "reschedule_lost_vms": False})
    d = decide(vm(status=placed(phase="Unknown")), view(nodes={"n1": node(beat_age=500)}), NOW, off)
    assert "node" not in (d.status_patch or {}) and "phase" not in (d.status_patch or {}) and d.requeue_after is None


def test_a_returning_node_makes_the_vm_reachable_again():
    lost = decide(vm(status=placed()), view(nodes={"n1": node(beat_age=50)}), NOW, SETTINGS)
    st = {**placed(), **lost.status_patch}
    d = decide(vm(status=st), view(delivered="t1"), NOW, SETTINGS)
    cond = d.status_patch["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == (names.NODE_REACHABLE, "True", names.NODE_RECOVERED)
    assert d.events[0].reason == names.NODE_RECOVERED


# ---------------------------------------------------------------------------- dispatch on a Ready node

def test_a_shape_change_while_running_sets_restart_required():
    st = placed(activeShape={"vcpus": 1, "memoryMiB": 128})
    d = decide(vm(status=st, spec={"vcpus": 2}), view(delivered="t1"), NOW, SETTINGS)
    cond = d.status_patch["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == (names.RESTART_REQUIRED, "True", names.SHAPE_CHANGED)
    assert d.events[0].reason == names.RESTART_REQUIRED and d.messages == ()


@pytest.mark.parametrize("phase,spec,meta,intent", [
    ("Running", {"runStrategy": "Halted"}, {}, Intent.STOP),
    ("Stopped", {}, {}, Intent.START),
    ("Running", {}, {"annotations": {names.ANNOTATION_RESTARTED_AT: "2030-01-01T00:00:00Z"}}, Intent.RESTART),
])
def test_a_new_intent_is_recorded_and_sent_in_the_same_decision(phase, spec, meta, intent):
    d = decide(vm(status=placed(phase=phase), spec=spec, meta=meta), view(delivered="t1"), NOW, SETTINGS)
    assert d.status_patch["dispatch"]["intent"] == intent.value and d.status_patch["dispatch"]["attempts"] == 1
    (msg,) = d.messages
    assert msg.intent is intent and msg.task_id == d.status_patch["dispatch"]["taskId"] and msg.why == "new"


def test_an_intent_already_dispatched_sends_nothing_again():
    obj = vm(status=placed(phase="Stopping", dispatch=dispatched("stop", key="stop/u1/g1")),
             spec={"runStrategy": "Halted"})
    d = decide(obj, view(delivered="t1", progress_at=NOW - 1), NOW, SETTINGS)
    assert d.status_patch is None and d.messages == ()


def test_a_failed_send_waits_for_its_backoff_then_resends_the_same_task():
    obj = vm(status=placed(phase="Scheduled"))
    waiting = decide(obj, view(failed_task="t1", retry_in=3.0), NOW, SETTINGS)
    assert waiting.requeue_after == 3.0 and waiting.messages == () and waiting.status_patch is None
    due = decide(obj, view(failed_task="t1", retry_in=0.0), NOW, SETTINGS)
    assert due.status_patch is None and [(m.task_id, m.why) for m in due.messages] == [("t1", "send-retry")]


def test_after_an_operator_restart_an_unfinished_dispatch_is_sent_again_with_a_new_task_id():
    d = decide(vm(status=placed(phase="Scheduled")), view(delivered=None), NOW, SETTINGS)
    rec = d.status_patch["dispatch"]
    assert rec["taskId"] != "t1" and rec["attempts"] == 1 and rec["intent"] == "create"
    assert d.messages[0].why == "operator-restart"


def test_after_an_operator_restart_a_finished_dispatch_is_not_sent_again():
    d = decide(vm(status=placed(phase="Running")), view(delivered=None), NOW, SETTINGS)
    assert d.messages == () and d.status_patch is None


def test_no_progress_past_the_timeout_redispatches_with_one_more_attempt():
    obj = vm(status=placed(phase="Scheduled", dispatch=dispatched(sent_age=200)))
    d = decide(obj, view(delivered="t1", progress_at=NOW - 200), NOW, SETTINGS)
    assert d.status_patch["dispatch"]["attempts"] == 2 and d.messages[0].why == "no-progress"
    assert d.messages[0].reason == "Redispatching" and d.messages[0].warning


def test_no_progress_within_the_timeout_waits():
    obj = vm(status=placed(phase="Scheduled", dispatch=dispatched(sent_age=10)))
    assert decide(obj, view(delivered="t1", progress_at=NOW - 10), NOW, SETTINGS).messages == ()


def test_after_max_attempts_without_progress_the_vm_fails_with_no_progress():
    obj = vm(status=placed(phase="Scheduled", dispatch=dispatched(attempts=4, sent_age=2000)))
    d = decide(obj, view(delivered="t1", progress_at=NOW - 2000), NOW, SETTINGS)
    assert (d.status_patch["phase"], d.status_patch["reason"]) == (Phase.FAILED.value, names.NO_PROGRESS)
    assert d.messages == () and d.events[0].reason == names.NO_PROGRESS


# ---------------------------------------------------------------------------- deletion

def deleting(status, age=1.0, annotations=None):
    return vm(status=status, meta={"deletionTimestamp": rfc3339(NOW - age), "annotations": annotations or {}})


def test_deleting_a_vm_without_a_node_lets_it_go_at_once():
    d = decide(deleting({"phase": "Pending"}), view(), NOW, SETTINGS)
    assert d.finalizer_remove and d.release and d.messages == ()


def test_deleting_a_placed_vm_sets_deleting_sends_delete_and_holds_the_finalizer():
    d = decide(deleting(placed()), view(delivered="t1"), NOW, SETTINGS)
    assert d.status_patch["phase"] == Phase.DELETING.value and d.status_patch["dispatch"]["intent"] == "delete"
    assert [m.intent for m in d.messages] == [Intent.DELETE]
    assert not d.finalizer_remove and d.requeue_after == 0.5


def test_a_delete_already_sent_waits_for_the_node_with_growing_retries():
    st = placed(phase="Deleting", dispatch=dispatched("delete"))
    d = decide(deleting(st), view(delivered="t1", progress_at=NOW - 1, retry=3), NOW, SETTINGS)
    assert d.messages == () and not d.finalizer_remove and d.requeue_after == 4.0
    assert "waiting for MicroVMNode n1" in d.waiting


def test_the_node_confirming_cleanup_releases_the_finalizer():
    st = placed(phase="Deleting", dispatch=dispatched("delete"), cleanedUpAt=rfc3339(NOW))
    d = decide(deleting(st), view(delivered="t1"), NOW, SETTINGS)
    assert d.finalizer_remove and d.events[0].reason == "Deleted"


@pytest.mark.parametrize("beat_age,annotations", [(500, None), (1, {names.ANNOTATION_FORCE_DELETE: "true"})])
def test_a_lost_node_or_force_delete_waits_delete_wait_seconds_then_releases(beat_age, annotations):
    st = placed(phase="Deleting", dispatch=dispatched("delete"))
    nodes = {"n1": node(beat_age=beat_age)}
    early = decide(deleting(st, age=10, annotations=annotations), view(nodes, delivered="t1"), NOW, SETTINGS)
    assert not early.finalizer_remove and early.requeue_after == 2.0 and "removing the finalizer in 50s" in early.waiting
    late = decide(deleting(st, age=61, annotations=annotations), view(nodes, delivered="t1"), NOW, SETTINGS)
    assert late.finalizer_remove and late.events[-1].reason == names.FORCE_DELETED and late.events[-1].warning


def test_a_delete_without_progress_is_sent_again_but_never_given_up():
    st = placed(phase="Deleting", dispatch=dispatched("delete", attempts=9, sent_age=100000))
    d = decide(deleting(st, age=100000), view(delivered="t1", progress_at=NOW - 100000), NOW, SETTINGS)
    assert d.status_patch["dispatch"]["attempts"] == 10 and d.messages[0].intent is Intent.DELETE
    assert not d.finalizer_remove
