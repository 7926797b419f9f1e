"""No VM ever runs in two places: two real workers with QEMU VMs and the real operator. A worker
that is frozen (SIGSTOP), killed for good, or cut off from the API server alone loses its VMs to
their own supervisors when the node's lease runs out, before the operator places them on the
other node; an API server outage seen by every worker stops nothing. The overlap check (every
supervisor's VMM journal, on both nodes) runs in every case."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
import uuid

import pytest
from harness.overlap import overlap  # noqa: F401 - the fixture
from harness.procs import holds_for, wait_for
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

FENCE = 10          # selfFenceAfterSeconds, for the workers and the operator
MARGIN = 12         # rescheduleMarginSeconds: a lost node's VMs move FENCE + MARGIN after its last heartbeat
HEARTBEAT = 1
KILL_AFTER = 2
PEER_WINDOW = 4     # < FENCE - 2 * HEARTBEAT
OUTAGE = 18         # longer than the fence, shorter than the fence plus the margin


@pytest.fixture
def operator_env():
    return {"MIKROM_NODE_LOST_AFTER_SECONDS": "6", "MIKROM_SELF_FENCE_AFTER_SECONDS": str(FENCE),
            "MIKROM_RESCHEDULE_MARGIN_SECONDS": str(MARGIN)}


def fenced_worker(overlap, netns, guest_image_dir, kubeconfig=None):
    w = overlap.make_worker(netns=netns, image_dir=guest_image_dir, start=False, heartbeat_seconds=HEARTBEAT,
                            self_fence_after_seconds=FENCE, fence_peer_window_seconds=PEER_WINDOW,
                            fence_kill_after_seconds=KILL_AFTER, sync_interval_seconds=3)
    if kubeconfig:
        w.env["KUBECONFIG"] = str(kubeconfig)
    return w.start()


def vms_on(fleet, node, sel, count=2) -> dict[str, dict]:
    """`count` Always VMs (not pinned, no network) placed on `node` (the only one labelled `sel`)."""
    names_ = [f"vm{i}-{uuid.uuid4().hex[:4]}" for i in range(count)]
    for name in names_:
        fleet.create(name, network=False, nodeSelector=sel)
    out = {}
    for name in names_:
        st = fleet.wait_phase(name, "Running", timeout=120, avoid=("Failed",))
        assert st["node"] == node
        out[name] = {"uid": fleet.get(name)["metadata"]["uid"], "pid": st["pid"]}
    return out


def fence_record(worker, uid) -> dict | None:
    try:
        return json.loads((worker.vms_dir / uid / "fence.json").read_text())
    except (OSError, ValueError):
        return None


def two_nodes(fleet, overlap, netns, guest_image_dir, kubeconfig=None):
    """The node that will be lost (with two VMs), then a spare node with the same label."""
    sel = {"e2e-fence": uuid.uuid4().hex[:10]}
    lost = fenced_worker(overlap, netns, guest_image_dir, kubeconfig)
    fleet.patch_cluster_object(names.MICROVMNODES, lost.node, {"metadata": {"labels": sel}})
    vms = vms_on(fleet, lost.node, sel)
    spare = fenced_worker(overlap, netns, guest_image_dir)
    fleet.patch_cluster_object(names.MICROVMNODES, spare.node, {"metadata": {"labels": sel}})
    return lost, spare, vms


def expect_fenced_by_supervisors_then_moved(fleet, lost, spare, vms, t0):
    """Each VM's VMM on `lost` stops (its supervisor records the fence) no earlier than the lease
    allows and before the operator moves it; then it runs on `spare`."""
    for vm in vms.values():
        wait_for(lambda: vmm_pids(lost.state_dir, vm["uid"]) == [], FENCE + KILL_AFTER + 15,
                 "the lost node's supervisor to stop its VMM")
    stopped = time.monotonic() - t0
    # the last renewal was at most one heartbeat round before t0
    assert stopped >= FENCE - HEARTBEAT - 1, f"fenced after {stopped:.1f}s, before selfFenceAfterSeconds"
    for vm in vms.values():
        record = fence_record(lost, vm["uid"])
        assert record and record["reason"] == "LeaseExpired", f"no supervisor fence record: {record}"
    for name, vm in vms.items():
        st = wait_for(lambda: (s := fleet.status(name)).get("node") == spare.node and s.get("phase") == "Running"
                      and s, 120, f"{name} to run on the spare node")
        vm["spare_pid"] = st["pid"]
        assert vmm_pids(spare.state_dir, vm["uid"]) == [st["pid"]]
    moved = time.monotonic() - t0
    assert moved >= FENCE + MARGIN - HEARTBEAT - 1, f"moved after {moved:.1f}s, before the fence plus the margin"


def still_only_on_the_spare(fleet, lost, spare, vms):
    def check() -> bool:
        for name, vm in vms.items():
            st = fleet.status(name)
            if (st.get("node"), st.get("phase"), st.get("pid")) != (spare.node, "Running", vm["spare_pid"]):
                return False
            if vmm_pids(spare.state_dir, vm["uid"]) != [vm["spare_pid"]] or vmm_pids(lost.state_dir, vm["uid"]):
                return False
        return True
    return check


def test_a_frozen_worker_s_vms_are_stopped_by_their_supervisors_and_run_once_on_the_other_node(
        fleet, overlap, netns, guest_image_dir):
    lost, spare, vms = two_nodes(fleet, overlap, netns, guest_image_dir)
    os.killpg(lost.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        expect_fenced_by_supervisors_then_moved(fleet, lost, spare, vms, t0)
        overlap.assert_no_overlap()
    finally:
        os.killpg(lost.proc.pid, signal.SIGCONT)
    # the thawed worker lets go of what is now elsewhere, and starts nothing of it again
    for vm in vms.values():
        wait_for(lambda: not (lost.vms_dir / vm["uid"]).exists(), 60, "the thawed node to remove its copy")
    holds_for(still_only_on_the_spare(fleet, lost, spare, vms), 5, "the VMs to stay on the spare node only")
    assert any(r.fenced for vm in vms.values() for r in overlap.runs_of(vm["uid"]))


def test_a_killed_worker_that_stays_down_loses_its_vms_to_their_supervisors_before_they_move(
        fleet, overlap, netns, guest_image_dir):
    lost, spare, vms = two_nodes(fleet, overlap, netns, guest_image_dir)
    lost.kill()
    expect_fenced_by_supervisors_then_moved(fleet, lost, spare, vms, time.monotonic())
    holds_for(still_only_on_the_spare(fleet, lost, spare, vms), 3, "the VMs to stay on the spare node only")


def test_a_worker_cut_off_from_the_api_server_alone_fences_because_its_peer_still_reaches_it(
        fleet, overlap, netns, guest_image_dir, forwarded_kubeconfig):
    kubeconfig, fwd = forwarded_kubeconfig("lost")
    lost, spare, vms = two_nodes(fleet, overlap, netns, guest_image_dir, kubeconfig)
    fwd.cut()
    expect_fenced_by_supervisors_then_moved(fleet, lost, spare, vms, time.monotonic())
    assert "PeersReachApiServer" in lost.log_text()
    holds_for(still_only_on_the_spare(fleet, lost, spare, vms), 3, "the VMs to stay on the spare node only")


def test_an_api_server_outage_seen_by_every_worker_stops_no_vm_and_status_catches_up(
        fleet, overlap, netns, guest_image_dir, forwarded_kubeconfig):
    cfg_a, fwd_a = forwarded_kubeconfig("a")
    cfg_b, fwd_b = forwarded_kubeconfig("b")
    sel = {"e2e-fence": uuid.uuid4().hex[:10]}
    a = fenced_worker(overlap, netns, guest_image_dir, cfg_a)
    fleet.patch_cluster_object(names.MICROVMNODES, a.node, {"metadata": {"labels": sel}})
    on_a = vms_on(fleet, a.node, sel, count=1)
    b = fenced_worker(overlap, netns, guest_image_dir, cfg_b)
    fleet.patch_cluster_object(names.MICROVMNODES, a.node, {"spec": {"schedulable": False}})
    fleet.patch_cluster_object(names.MICROVMNODES, b.node, {"metadata": {"labels": sel}})
    on_b = vms_on(fleet, b.node, sel, count=1)
    every = [(a, vm) for vm in on_a.values()] + [(b, vm) for vm in on_b.values()]

    # the outage: neither worker nor the operator reaches the API server (the operator is frozen:
    # it shares the API server with the test, which must keep reaching it)
    operator_pid = fleet.operator.proc.pid
    os.kill(operator_pid, signal.SIGSTOP)
    try:
        for fwd in (fwd_a, fwd_b):
            fwd.cut()
        holds_for(lambda: all(vmm_pids(w.state_dir, vm["uid"]) == [vm["pid"]] for w, vm in every), OUTAGE,
                  "every VM to keep running through the outage", interval=0.5)
        for w in (a, b):
            assert "ControlPlaneOutage" in w.log_text()
            assert not any(fence_record(w, vm["uid"]) for _, vm in every)
        # the API server is back for the workers, on the port their kubeconfigs name
        fwd_a.restore()
        fwd_b.restore()
        try:
            since = time.time()
            for w in (a, b):
                wait_for(lambda: _heartbeat_after(fleet, w.node, since), 60, f"{w.node} to heartbeat again")
        finally:
            os.kill(operator_pid, signal.SIGCONT)
            operator_pid = None
        for name_vms in (on_a, on_b):
            for name, vm in name_vms.items():
                st = wait_for(lambda: (s := fleet.status(name)).get("phase") == "Running" and s, 60,
                              f"{name} to report Running")
                assert st["pid"] == vm["pid"]
        assert all(vmm_pids(w.state_dir, vm["uid"]) == [vm["pid"]] for w, vm in every)
    finally:
        if operator_pid:
            os.kill(operator_pid, signal.SIGCONT)


def _heartbeat_after(fleet, node: str, since: float) -> bool:
    stamp = ((fleet.cluster_object(names.MICROVMNODES, node) or {}).get("status") or {}).get("lastHeartbeatTime")
    if not stamp:
        return False
    t = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return t >= int(since) + 1  # the stamp has whole seconds
