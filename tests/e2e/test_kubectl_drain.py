"""`kubectl mikrom drain NODE` as docs/operations.md describes it, with the real operator, a real node
worker and a real QEMU guest: the node is cordoned, its VM stopped (its run strategy recorded), the
command returns once no VMM runs there; `uncordon` and `start` bring the VM back on the same node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

PLUGIN = Path(sys.executable).parent / "kubectl-mikrom"


def test_drain_stops_the_nodes_running_vm_and_returns_once_no_vmm_runs_then_uncordon_and_start_bring_it_back(
        fleet, make_worker, netns, guest_image_dir, control_plane):
    worker = make_worker(netns=netns, image_dir=guest_image_dir)
    fleet.node = worker.node
    fleet.create("tenant", network=False, runStrategy="RerunOnFailure")
    first = fleet.wait_phase("tenant", "Running", timeout=120, avoid=("Failed",))
    uid = fleet.get("tenant")["metadata"]["uid"]
    assert vmm_pids(worker.state_dir, uid) == [first["pid"]]

    def plugin(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(PLUGIN), "--kubeconfig", str(control_plane.kubeconfig), "-n", fleet.ns, *args],
                              capture_output=True, text=True, timeout=timeout)

    res = plugin("drain", worker.node, "--timeout=150s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"microvmnode.mikrom.io/{worker.node} drained" in res.stdout
    assert "was runStrategy RerunOnFailure" in res.stdout and f"kubectl mikrom start -n {fleet.ns} tenant" in res.stdout
    # when drain returns, the node runs nothing and takes nothing new
    assert fleet.status("tenant")["phase"] == "Stopped"
    assert vmm_pids(worker.state_dir, uid) == []
    assert fleet.cluster_object(names.MICROVMNODES, worker.node)["spec"]["schedulable"] is False

    assert plugin("uncordon", worker.node).returncode == 0
    assert plugin("start", "tenant").returncode == 0
    again = fleet.wait_phase("tenant", "Running", timeout=120, avoid=("Failed",))
    assert again["node"] == worker.node and again["pid"] != first["pid"]
    assert fleet.get("tenant")["spec"]["runStrategy"] == "RerunOnFailure"
