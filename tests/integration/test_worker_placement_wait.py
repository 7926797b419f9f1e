"""A create on a node's queue that arrives before the operator recorded the placement (the
operator sends first, then writes `status.node`; docs/protocol.md, Dispatch), against a real API
server, a real Redis and a real `mikrom worker`: the task waits, watching the object, and acts
only once `status.node` names its node; another node, no node within `placementWaitSeconds`, or
the object deleted meanwhile, and the message is dropped with nothing done.

The VMs are `runStrategy: Halted`, so acting on one means reporting it Stopped (no VM boots). The
test plays the operator's part: placing a VM means setting `status.node`.
"""

from __future__ import annotations

import uuid

import pytest
from harness.microvms import MicroVMClient
from harness.procs import holds_for
from harness.worker_proc import send_create

from mikrom import names

WAIT = 4.0


@pytest.fixture
def worker(make_worker, netns):
    return make_worker(netns=netns, sync_interval_seconds=300, placement_wait_seconds=WAIT)


class HaltedVMs(MicroVMClient):
    def manifest(self, name: str, **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}


@pytest.fixture
def vms(kube_api, namespace) -> HaltedVMs:
    return HaltedVMs(kube_api, namespace)


def waiting(result, vms, name: str) -> bool:
    """The task has not finished and the VM is as the test left it: no phase of the node's."""
    return not result.ready() and vms.status(name).get("phase") in (None, "Scheduled")


def test_a_create_whose_placement_is_recorded_a_second_later_is_acted_on(worker, vms, celery_client):
    vm = vms.create("late")
    result = send_create(celery_client, worker, vm)
    holds_for(lambda: waiting(result, vms, "late"), 1, "the task to wait for the placement, doing nothing")
    vms.patch_status("late", {"node": worker.node, "phase": "Scheduled"})
    assert result.get(timeout=30)["outcome"] == "stopped"
    status = vms.status("late")
    assert status["phase"] == "Stopped" and status["node"] == worker.node


def test_a_create_whose_vm_is_then_placed_on_another_node_is_dropped(worker, vms, celery_client):
    vm = vms.create("elsewhere")
    result = send_create(celery_client, worker, vm)
    holds_for(lambda: waiting(result, vms, "elsewhere"), 1, "the task to wait for the placement")
    other = "other-" + uuid.uuid4().hex[:6]
    vms.patch_status("elsewhere", {"node": other, "phase": "Scheduled"})
    assert result.get(timeout=30)["outcome"] == f"dropped: placed on another node ({other})"
    assert vms.status("elsewhere") == {"node": other, "phase": "Scheduled"}  # untouched by this node


def test_a_create_whose_vm_names_no_node_within_the_wait_is_dropped(worker, vms, celery_client):
    vm = vms.create("unplaced")
    result = send_create(celery_client, worker, vm)
    holds_for(lambda: waiting(result, vms, "unplaced"), WAIT - 1.5, "the task to wait for the placement")
    outcome = result.get(timeout=30)["outcome"]
    assert outcome == f"dropped: no node recorded for it within placementWaitSeconds ({WAIT:g}s)"
    assert not vms.status("unplaced")


def test_a_create_whose_vm_is_deleted_while_waiting_is_dropped(worker, vms, celery_client):
    vm = vms.create("going")
    result = send_create(celery_client, worker, vm)
    holds_for(lambda: waiting(result, vms, "going"), 1, "the task to wait for the placement")
    vms.delete("going")
    assert result.get(timeout=30)["outcome"] == "dropped: the MicroVM went while waiting for its placement"
    assert f"(uid {vm['metadata']['uid']!r}) dropped: the MicroVM went while waiting" in worker.log_text()
