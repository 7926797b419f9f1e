"""A create that arrives before the operator recorded its placement (the operator sends first, then
writes `status.node`; docs/protocol.md, Dispatch), for a VM to be started, with every real part
but the operator (the test plays its part: placing a VM means setting `status.node`): the node
prepares the VM while it waits, starts nothing and writes nothing before the placement names it,
and removes all it prepared when the VM goes elsewhere, is deleted, or is placed nowhere in time.

The VMs are QEMU microvm guests under TCG without a network (no address block is carved without the
operator); the worker runs in a network namespace the test creates.
"""

from __future__ import annotations

import uuid

import pytest
from harness.procs import holds_for, wait_for
from harness.vms import VMs, e2e_skip_reason, vmm_pids
from harness.worker_proc import send_create


pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

WAIT = 6.0


@pytest.fixture
def worker(make_worker, netns, guest_image_dir):
    return make_worker(netns=netns, image_dir=guest_image_dir, sync_interval_seconds=300,
                       placement_wait_seconds=WAIT)


@pytest.fixture
def vms(kube_api, namespace) -> VMs:
    return VMs(kube_api, namespace)


def created_prepared_and_waiting(worker, vms, celery_client, name: str):
    """MicroVM `name` created without a node and its create sent to the node, which then makes the
    VM's state directory and holds there, with no VMM and no status: its uid and the task."""
    vm = vms.create(name, network=False)
    uid = vm["metadata"]["uid"]
    result = send_create(celery_client, worker, vm)
    wait_for(lambda: (worker.vms_dir / uid).is_dir(), 20, f"the node to prepare {name} before its placement")
    holds_for(lambda: not result.ready() and not vmm_pids(worker.state_dir, uid) and not vms.status(name), 1,
              f"{name} to wait for its placement with nothing started and nothing written")
    return uid, result


def holds_nothing(worker, uid: str) -> bool:
    return not (worker.vms_dir / uid).exists() and not vmm_pids(worker.state_dir, uid)


def test_a_new_vm_is_prepared_while_its_placement_is_recorded_and_started_once_it_names_the_node(
        worker, vms, celery_client):
    uid, result = created_prepared_and_waiting(worker, vms, celery_client, "early")
    vms.patch_status("early", {"node": worker.node, "phase": "Scheduled"})
    assert result.get(timeout=120)["outcome"] == "running"
    status = vms.status("early")
    assert status["phase"] == "Running" and status["node"] == worker.node
    assert status["pid"] in vmm_pids(worker.state_dir, uid)
    assert "(prepared while its placement is recorded)" in worker.log_text()


def test_a_vm_prepared_and_then_placed_on_another_node_is_dropped_leaving_nothing(worker, vms, celery_client):
    uid, result = created_prepared_and_waiting(worker, vms, celery_client, "elsewhere")
    other = "other-" + uuid.uuid4().hex[:6]
    vms.patch_status("elsewhere", {"node": other, "phase": "Scheduled"})
    assert result.get(timeout=30)["outcome"] == f"dropped: placed on another node ({other})"
    assert holds_nothing(worker, uid)
    assert vms.status("elsewhere") == {"node": other, "phase": "Scheduled"}  # untouched by this node


def test_a_vm_prepared_and_then_deleted_while_waiting_is_dropped_leaving_nothing(worker, vms, celery_client):
    uid, result = created_prepared_and_waiting(worker, vms, celery_client, "going")
    vms.delete("going")
    assert result.get(timeout=30)["outcome"] == "dropped: the MicroVM went while waiting for its placement"
    assert holds_nothing(worker, uid)


def test_a_vm_prepared_but_placed_nowhere_within_the_wait_is_dropped_leaving_nothing(worker, vms, celery_client):
    uid, result = created_prepared_and_waiting(worker, vms, celery_client, "unplaced")
    outcome = result.get(timeout=30)["outcome"]
    assert outcome == f"dropped: no node recorded for it within placementWaitSeconds ({WAIT:g}s)"
    assert holds_nothing(worker, uid)
    assert not vms.status("unplaced")


def test_a_vm_whose_spec_changed_before_its_placement_is_decided_again_from_the_placed_object(
        worker, vms, celery_client):
    uid, result = created_prepared_and_waiting(worker, vms, celery_client, "changed")
    vms.patch("changed", {"spec": {"runStrategy": "Halted"}})
    vms.patch_status("changed", {"node": worker.node, "phase": "Scheduled"})
    assert result.get(timeout=30)["outcome"] == "stopped"
    assert vms.status("changed")["phase"] == "Stopped"
    assert not vmm_pids(worker.state_dir, uid)
