"""The brake on mass eviction: while more than half of the MicroVMNodes are lost at once, no VM
is placed elsewhere; each VM due to move says why (condition ReschedulingHeld and one Warning
event). With only one of three nodes lost, its VMs move, marked DiskReset."""

from __future__ import annotations

from harness.operator_proc import TEST_ENV
from harness.waits import holds_for, wait_for
from mikrom import conditions, names

LOST_AFTER = float(TEST_ENV["MIKROM_NODE_LOST_AFTER_SECONDS"])
FENCE, MARGIN = 8.0, 2.0


def events(mvms, uid: str, reason: str) -> list:
    return [e for e in mvms.events(uid) if e.reason == reason]


def test_two_of_three_nodes_lost_hold_rescheduling_and_one_of_three_moves_it(operators, worker, mvms):
    sel = {"test": mvms.label}
    a, b, spare = f"a-{mvms.label}", f"b-{mvms.label}", f"spare-{mvms.label}"
    worker.add_node(a, vcpus=4, labels=sel)
    worker.add_node(b, vcpus=4, labels=sel)
    operators(env={"MIKROM_SELF_FENCE_AFTER_SECONDS": str(FENCE), "MIKROM_RESCHEDULE_MARGIN_SECONDS": str(MARGIN)})
    # four vCPUs each: one VM fills a node, so each of the two nodes gets one
    mvms.create("va", nodeSelector=sel, vcpus=4)
    mvms.create("vb", nodeSelector=sel, vcpus=4)
    homes = {mvms.wait_phase(v, "Running")["node"]: v for v in ("va", "vb")}
    assert set(homes) == {a, b}, homes
    on_a, on_b = homes[a], homes[b]
    worker.add_node(spare, vcpus=8, labels=sel)
    listed = mvms.api.list_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMNODES,
                                                 _request_timeout=(5, 30))["items"]
    nodes = {n["metadata"]["name"] for n in listed}
    assert nodes == {a, b, spare}, f"other MicroVMNodes would change the share: {nodes}"

    worker.stop_heartbeat(a)
    worker.stop_heartbeat(b)
    uids = {v: mvms.uid(v) for v in (on_a, on_b)}
    for v, uid in uids.items():
        [held] = mvms.wait_events(uid, "ReschedulingHeld", timeout=LOST_AFTER + FENCE + MARGIN + 15)
        assert held.type == "Warning" and "2 of 3 MicroVMNodes are lost at once" in held.message, held.message
        assert "rescheduleMaxLostFraction (0.5)" in held.message
        cond = mvms.condition(v, "ReschedulingHeld")
        assert cond["status"] == "True" and "2 of 3" in cond["message"]

    def still_held():
        return all(mvms.status(v).get("node") == home and mvms.status(v).get("phase") == "Unknown"
                   for home, v in homes.items()) and \
            all(len(evs := events(mvms, uid, "ReschedulingHeld")) == 1 and (evs[0].count or 1) == 1
                for uid in uids.values())

    holds_for(still_held, 5, "both VMs held on their lost nodes, said once")
    assert worker.messages(node=spare, task=names.CREATE_VM) == [], "nothing was placed on the spare node"

    # b returns: only one of three is lost, so the VM on a moves to the spare node
    worker.resume_heartbeat(b)
    st = wait_for(lambda: (s := mvms.status(on_a)).get("node") == spare and s.get("phase") == "Running" and s,
                  30, f"{on_a} to run on the spare node")
    uid = uids[on_a]
    assert len(worker.messages(node=spare, uid=uid, task=names.CREATE_VM)) == 1
    mvms.wait_events(uid, names.RESCHEDULING)
    [reset] = mvms.wait_events(uid, "DiskReset")
    assert reset.type == "Warning" and a in reset.message and "fresh copy" in reset.message
    disk = conditions.get(st.get("conditions"), "DiskReset")
    assert (disk["status"], disk["reason"]) == ("True", "Rescheduled")
    assert mvms.condition(on_a, "ReschedulingHeld")["status"] == "False"
    back = mvms.wait_phase(on_b, "Running", timeout=15)
    assert back["node"] == b and conditions.get(back.get("conditions"), "DiskReset") is None
    wait_for(lambda: mvms.condition(on_b, "ReschedulingHeld").get("status") == "False", 10,
             f"{on_b}'s ReschedulingHeld to clear")
