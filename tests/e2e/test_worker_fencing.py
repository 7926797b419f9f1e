"""Node loss seen from both sides: the worker loses the API server (a proxy between them is cut),
fences itself by stopping its VMs, the operator marks them Unknown; when the connection returns the
worker heartbeats again, restarts what is still assigned to it and reports the truth. A VM not
pinned to the node is placed on another once the node has been lost past its self-fence time, and
the returning node lets go of what it held."""

from __future__ import annotations

import time
import uuid

import pytest
from harness.procs import holds_for, wait_for
from harness.netns import ping
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")


FENCE_AFTER = 5  # the workers' selfFenceAfterSeconds, and the operator's idea of it


@pytest.fixture
def operator_env():
    return {"MIKROM_NODE_LOST_AFTER_SECONDS": "6", "MIKROM_SELF_FENCE_AFTER_SECONDS": str(FENCE_AFTER),
            "MIKROM_RESCHEDULE_MARGIN_SECONDS": "3"}


@pytest.fixture
def proxied_kubeconfig(forwarded_kubeconfig):
    return forwarded_kubeconfig("proxied")


def test_a_worker_cut_off_from_the_api_server_fences_its_vms_and_restores_them_when_it_returns(
        proxied_kubeconfig, fleet, make_worker, netns, guest_image_dir):
    # the proxy comes first so it is torn down last: the worker confirms the final deletions
    kubeconfig, proxy = proxied_kubeconfig
    worker = make_worker(netns=netns, image_dir=guest_image_dir, start=False, heartbeat_seconds=1,
                         self_fence_after_seconds=FENCE_AFTER, sync_interval_seconds=3)
    worker.env["KUBECONFIG"] = str(kubeconfig)
    worker.start()
    fleet.node = worker.node
    fleet.create("island")
    st = fleet.wait_phase("island", "Running", timeout=90, avoid=("Failed",))
    uid = fleet.get("island")["metadata"]["uid"]
    first_pid, ip = st["pid"], st["ipAddress"]

    proxy.cut()
    t0 = time.monotonic()
    worker.wait_log("self-fencing", 30)
    wait_for(lambda: vmm_pids(worker.state_dir, uid) == [], 20, "the fenced worker to stop its VM")
    # the last good heartbeat was at most heartbeat_seconds (1) before the cut
    assert time.monotonic() - t0 >= 5 - 1 - 0.2, "fenced before selfFenceAfterSeconds"
    st = fleet.wait_phase("island", "Unknown", timeout=30)  # the operator's view of the lost node
    assert any(c["type"] == "NodeReachable" and c["status"] == "False" for c in st["conditions"])

    proxy.restore()
    st = wait_for(lambda: (s := fleet.status("island")).get("phase") == "Running" and s.get("pid") != first_pid
                  and s, 90, "island to run again in a new process")
    assert st["ipAddress"] == ip
    assert vmm_pids(worker.state_dir, uid) == [st["pid"]]
    assert ping(netns, ip).returncode == 0


def test_a_vm_of_a_node_lost_past_its_fence_time_moves_to_another_node_and_the_old_node_lets_go(
        proxied_kubeconfig, fleet, make_worker, netns, guest_image_dir):
    kubeconfig, proxy = proxied_kubeconfig
    sel = {"e2e-move": uuid.uuid4().hex[:10]}
    lost = make_worker(netns=netns, image_dir=guest_image_dir, start=False, heartbeat_seconds=1,
                       self_fence_after_seconds=FENCE_AFTER, sync_interval_seconds=3)
    lost.env["KUBECONFIG"] = str(kubeconfig)
    lost.start()
    fleet.patch_cluster_object(names.MICROVMNODES, lost.node, {"metadata": {"labels": sel}})
    fleet.create("nomad", network=False, nodeSelector=sel)  # not pinned: it may move
    st = fleet.wait_phase("nomad", "Running", timeout=90, avoid=("Failed",))
    uid = fleet.get("nomad")["metadata"]["uid"]
    assert st["node"] == lost.node
    spare = make_worker(netns=netns, image_dir=guest_image_dir, sync_interval_seconds=3)
    fleet.patch_cluster_object(names.MICROVMNODES, spare.node, {"metadata": {"labels": sel}})

    proxy.cut()
    t0 = time.monotonic()
    lost.wait_log("self-fencing", 30)
    wait_for(lambda: vmm_pids(lost.state_dir, uid) == [], 20, "the fenced node to stop its VM")
    st = wait_for(lambda: (s := fleet.status("nomad")).get("node") == spare.node and s.get("phase") == "Running"
                  and s, 90, "nomad to run on the spare node")
    assert time.monotonic() - t0 >= FENCE_AFTER + 3 - 1 - 1, "moved before the fence time plus the margin"
    assert vmm_pids(spare.state_dir, uid) == [st["pid"]]
    event = fleet.wait_event("nomad", "Rescheduling", type_="Warning")
    assert lost.node in event.message

    # the lost node returns: it lets go of its copy and never reports over the spare node's status
    proxy.restore()
    wait_for(lambda: not (lost.vms_dir / uid).exists(), 60, "the returning node to remove its copy")
    assert vmm_pids(lost.state_dir, uid) == []
    def still_on_the_spare() -> bool:
        now = fleet.status("nomad")
        return ((now.get("node"), now.get("phase"), now.get("pid")) == (spare.node, "Running", st["pid"])
                and vmm_pids(spare.state_dir, uid) == [st["pid"]])

    # through more sync rounds of the returning node (every 3 s)
    holds_for(still_on_the_spare, 4, "nomad to stay on the spare node, in the same process")
