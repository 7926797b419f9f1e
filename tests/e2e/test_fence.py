"""No VM ever runs in two places: two real workers with QEMU VMs and the real operator. A worker
that is frozen (SIGSTOP), killed for good, or cut off from the API server alone loses its VMs to
their own supervisors when the node's lease runs out, before the operator places them on the
other node; an API server outage seen by every worker stops nothing. The overlap check (every
supervisor's VMM journal, on both nodes) runs in every case."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from harness.fence_cases import (OPERATOR_ENV, fence_record, fenced_worker, expect_fenced_by_supervisors_then_moved,
                                 heartbeat_after, still_only_on_the_spare, two_nodes, vms_on)
from harness.overlap import overlap  # noqa: F401 - the fixture
from harness.procs import holds_for, wait_for
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

OUTAGE = 18         # longer than the fence, shorter than the fence plus the margin


@pytest.fixture
def operator_env():
    return dict(OPERATOR_ENV)


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
                wait_for(lambda: heartbeat_after(fleet, w.node, since), 60, f"{w.node} to heartbeat again")
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

