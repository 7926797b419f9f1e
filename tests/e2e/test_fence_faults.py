"""More faults for the fence, each with real workers, QEMU VMs, the real operator and the overlap
check (no VM in two places): a worker that crash-loops loses its VMs as a dead one does; a node
whose clock is five minutes off (libfaketime) keeps its VMs; Redis restarted empty while VMs are
being created leaves each of them running once; more than the allowed share of nodes lost at
once moves nothing and says why."""

from __future__ import annotations

import time

import pytest
from harness.fence_cases import (FENCE, LOST_AFTER, MARGIN, OPERATOR_ENV, expect_fenced_by_supervisors_then_moved,
                                 fence_record, fenced_worker, label, new_selector, running_once,
                                 still_only_on_the_spare, two_nodes, vms_on)
from harness.overlap import overlap  # noqa: F401 - the fixture
from harness.procs import holds_for, wait_for
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import conditions, names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")


@pytest.fixture
def operator_env():
    # a create lost with Redis is sent again after this long without progress
    return {**OPERATOR_ENV, "MIKROM_PROGRESS_TIMEOUT_SECONDS": "15", "MIKROM_RESCHEDULE_MAX_LOST_FRACTION": "0.5"}


def node_ready(fleet, node: str) -> bool:
    st = (fleet.cluster_object(names.MICROVMNODES, node) or {}).get("status") or {}
    return conditions.is_true(st.get("conditions"), names.READY)


def test_a_crash_looping_worker_loses_its_vms_to_their_supervisors_before_they_move(
        fleet, overlap, netns, guest_image_dir):
    lost, spare, vms = two_nodes(fleet, overlap, netns, guest_image_dir)
    lost.kill()
    t0 = time.monotonic()
    # each start gets as far as its first heartbeat round, then the worker dies: it must not keep
    # renewing the lease (nor look alive to the operator) on the strength of that one round
    with lost.crash_looping() as starts:
        expect_fenced_by_supervisors_then_moved(fleet, lost, spare, vms, t0)
        holds_for(still_only_on_the_spare(fleet, lost, spare, vms), 3, "the VMs to stay on the spare node only")
    assert len(starts) >= 3, f"the worker started only {len(starts)} times"


def test_nodes_whose_clocks_are_five_minutes_behind_or_ahead_keep_their_vms_and_stay_ready(
        fleet, overlap, netns, guest_image_dir):
    sel = new_selector()
    behind = fenced_worker(overlap, netns, guest_image_dir, start=False).fake_clock("-5m").start()
    label(fleet, behind, sel)
    on_behind = vms_on(fleet, behind.node, sel, count=1)
    fleet.patch_cluster_object(names.MICROVMNODES, behind.node, {"spec": {"schedulable": False}})
    ahead = fenced_worker(overlap, netns, guest_image_dir, start=False).fake_clock("+5m").start()
    label(fleet, ahead, sel)
    on_ahead = vms_on(fleet, ahead.node, sel, count=1)
    placed = {name: (w, vm["uid"], vm["pid"]) for w, vms in ((behind, on_behind), (ahead, on_ahead))
              for name, vm in vms.items()}

    def all_well() -> bool:
        return running_once(fleet, placed) and all(node_ready(fleet, w.node) for w in (behind, ahead)) and all(
            (s := fleet.status(name)).get("phase") == "Running" and s.get("pid") == pid
            for name, (_, _, pid) in placed.items())

    # past the node-lost time, the fence and the margin: a node judged by its own (5 minutes
    # behind) timestamp would have been lost at once and its VM moved
    holds_for(all_well, FENCE + MARGIN + 6, "both skewed nodes Ready and their VMs running once", interval=0.5)
    for w, skew in ((behind, -300), (ahead, 300)):
        assert not any(fence_record(w, uid) for _, uid, _ in placed.values())
        assert w.proc.alive()
        stamp = fleet.cluster_object(names.MICROVMNODES, w.node)["status"]["lastHeartbeatTime"]
        offset = conditions.parse_time(stamp).timestamp() - time.time()
        assert abs(offset - skew) < 30, f"{w.node} heartbeats {offset:.0f}s off, not {skew}s: is libfaketime in effect?"


def test_redis_restarted_empty_while_six_vms_are_created_leaves_each_running_once(
        fleet, overlap, netns, guest_image_dir, redis):
    sel = new_selector()
    # room for three 1-vCPU VMs each, whatever this host's CPU count
    workers = [fenced_worker(overlap, netns, guest_image_dir, capacity_vcpus=4) for _ in range(2)]
    for w in workers:
        label(fleet, w, sel)
    names_ = [f"r{i}" for i in range(6)]
    for name in names_:
        fleet.create(name, network=False, nodeSelector=sel)
    wait_for(lambda: sum(1 for n in names_ if fleet.status(n).get("node")) >= 3, 30, "some VMs to be placed")
    redis.restart()  # every queued task, result and peer-board entry is gone
    by_node = {w.node: w for w in workers}

    def all_running_once() -> bool:
        for name in names_:
            st = fleet.status(name)
            w = by_node.get(st.get("node"))
            if st.get("phase") != "Running" or w is None:
                return False
            uid = fleet.get(name)["metadata"]["uid"]
            if vmm_pids(w.state_dir, uid) != [st["pid"]] or any(vmm_pids(o.state_dir, uid) for o in workers
                                                                 if o is not w):
                return False
        return True

    wait_for(all_running_once, 240, "all six VMs Running, each as exactly one VMM", interval=1)
    holds_for(all_running_once, 5, "each VM to stay one VMM")
    assert all(w.proc.alive() for w in workers)


def test_more_than_half_the_nodes_lost_at_once_move_nothing_and_an_event_says_why(
        fleet, overlap, netns, guest_image_dir):
    sel = new_selector()
    lost = fenced_worker(overlap, netns, guest_image_dir)
    label(fleet, lost, sel)
    vms = vms_on(fleet, lost.node, sel, count=1)
    (name, vm), = vms.items()
    also_lost = fenced_worker(overlap, netns, guest_image_dir)
    spare = fenced_worker(overlap, netns, guest_image_dir)
    for w in (also_lost, spare):
        label(fleet, w, sel)
    lost.kill()
    also_lost.kill()  # 2 of 3 nodes: more than rescheduleMaxLostFraction 0.5
    t0 = time.monotonic()
    wait_for(lambda: vmm_pids(lost.state_dir, vm["uid"]) == [], FENCE + 20, "the supervisor to fence its VMM")
    assert (fence_record(lost, vm["uid"]) or {}).get("reason") == "LeaseExpired"
    held = fleet.wait_event(name, "ReschedulingHeld", timeout=FENCE + MARGIN + 20, type_="Warning")
    assert "2 of 3" in held.message and "rescheduleMaxLostFraction" in held.message, held.message
    assert time.monotonic() - t0 >= FENCE + MARGIN - 2

    def held_in_place() -> bool:
        st = fleet.status(name)
        return (st.get("node") == lost.node and st.get("phase") == "Unknown"
                and conditions.is_true(st.get("conditions"), "ReschedulingHeld")
                and not any(vmm_pids(w.state_dir, vm["uid"]) for w in (lost, also_lost, spare)))

    holds_for(held_in_place, 5, "the VM to stay Unknown on its lost node, running nowhere")
    # one node back: 1 of 3 lost is not more than half, so the VM moves (to either live node)
    also_lost.start()
    st = wait_for(lambda: (s := fleet.status(name)).get("phase") == "Running" and s.get("node") != lost.node and s,
                  120, f"{name} to run on a live node once the brake lets go")
    live = {w.node: w for w in (also_lost, spare)}[st["node"]]
    assert vmm_pids(live.state_dir, vm["uid"]) == [st["pid"]]
    assert not conditions.is_true(st.get("conditions"), "ReschedulingHeld")
    assert LOST_AFTER < FENCE  # the settings the timings above rely on
