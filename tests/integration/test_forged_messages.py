"""Forged and stale queue messages against a real API server, a real Redis and a real `mikrom
worker` (as the mikrom-worker ServiceAccount): a message makes the worker do only what the
MicroVM object says. One whose namespace, name and uid do not all match an object is dropped with a
log line, and what the node holds for that uid (its state directory, its disk) stays.

No VM boots here (tests/e2e/test_queue_trust.py does that with a running VMM): the node's state for
a VM is the state directory the worker keeps (`meta.json` naming the VM's namespace and name, as
the worker writes it at the first start, and the VM's own disk `rootfs.img`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest
from harness.microvms import MicroVMClient
from harness.procs import wait_for
from harness.worker_proc import broadcast_until

from mikrom import names


class Halted(MicroVMClient):
    """The test's MicroVMs: Halted (nothing boots), placed on a node by the test, as the operator would."""

    def manifest(self, name: str, **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}

    def placed(self, name: str, node: str, finalizer: bool = False) -> dict:
        self.create(name)
        if finalizer:
            self.patch(name, {"metadata": {"finalizers": [names.FINALIZER]}})
        return self.patch_status(name, {"node": node, "phase": "Scheduled"})


@pytest.fixture
def vms(kube_api, namespace):
    client = Halted(kube_api, namespace)
    yield client
    client.remove_all()


@pytest.fixture
def worker(make_worker, netns):
    return make_worker(netns=netns, sync_interval_seconds=300)


def hold(worker, vm: dict) -> Path:
    """Give the node state for `vm` as the worker keeps it: meta.json and the VM's own disk."""
    meta = vm["metadata"]
    d = worker.vms_dir / meta["uid"]
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"namespace": meta["namespace"], "name": meta["name"],
                                             "uid": meta["uid"], "vmm": "qemu", "createdAt": time.time()}))
    (d / "rootfs.img").write_bytes(os.urandom(64 << 10))
    return d


def digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def send(celery_client, worker, task: str, namespace: str, name: str, uid: str, intent: str) -> dict:
    return celery_client.send_task(task, kwargs={"namespace": namespace, "name": name, "uid": uid, "intent": intent},
                                   queue=names.node_queue(worker.node)).get(timeout=30)


@pytest.mark.parametrize("task, intent", [(names.DELETE_VM, "delete"), (names.CREATE_VM, "create")])
def test_a_message_with_a_real_uid_and_a_wrong_name_leaves_the_vms_state_and_disk_alone(
        worker, vms, celery_client, task, intent):
    vm = vms.placed("web", worker.node)
    state = hold(worker, vm)
    before = digest(state)

    out = send(celery_client, worker, task, vms.ns, "no-such-vm", vm["metadata"]["uid"], intent)

    assert out["outcome"] == "dropped: the message does not match a MicroVM", out
    assert digest(state) == before
    worker.wait_log(f"for {vms.ns}/no-such-vm (uid '{vm['metadata']['uid']}') dropped: no MicroVM {vms.ns}/no-such-vm",
                    10)
    assert not (vms.status("web").get("cleanedUpAt")), "nothing was reported for the real VM either"


def test_a_message_with_the_right_name_and_another_vms_uid_leaves_both_alone(worker, vms, celery_client):
    web = vms.placed("web", worker.node)
    db = vms.placed("db", worker.node)
    states = {n: hold(worker, vm) for n, vm in (("web", web), ("db", db))}
    before = {n: digest(d) for n, d in states.items()}

    # web's name with db's uid: the object named web is not that uid
    out = send(celery_client, worker, names.DELETE_VM, vms.ns, "web", db["metadata"]["uid"], "delete")

    assert out["outcome"].startswith("dropped"), out
    assert {n: digest(d) for n, d in states.items()} == before
    worker.wait_log(f"for {vms.ns}/web (uid '{db['metadata']['uid']}') dropped: MicroVM {vms.ns}/web is another "
                    "object", 10)


def test_a_uid_that_is_a_path_is_dropped_before_it_reaches_the_file_system(worker, vms, celery_client):
    vms.placed("web", worker.node)
    out = send(celery_client, worker, names.DELETE_VM, vms.ns, "web", "../../locks", "delete")
    assert out["outcome"].startswith("dropped"), out


def test_a_uid_held_under_another_name_is_not_acted_on_under_the_messages_name(worker, vms, celery_client):
    vm = vms.placed("web", worker.node)
    state = hold(worker, vm)
    # the node's record says this uid is someone else's VM (e.g. written by an older worker)
    meta = json.loads((state / "meta.json").read_text())
    (state / "meta.json").write_text(json.dumps({**meta, "name": "other"}))
    before = digest(state)

    out = send(celery_client, worker, names.STOP_VM, vms.ns, "web", vm["metadata"]["uid"], "stop")

    assert out["outcome"].startswith("dropped"), out
    assert digest(state) == before
    worker.wait_log(f"this node holds uid {vm['metadata']['uid']} for {vms.ns}/other, not {vms.ns}/web", 10)


def test_deleting_a_vm_whose_finalizer_holds_it_still_removes_its_state_and_disk(worker, vms, celery_client):
    vm = vms.placed("bye", worker.node, finalizer=True)
    state = hold(worker, vm)
    vms.delete("bye")  # the finalizer keeps the object, with its deletionTimestamp

    out = send(celery_client, worker, names.DELETE_VM, vms.ns, "bye", vm["metadata"]["uid"], "delete")

    assert out["outcome"] == "deleted", out
    assert not state.exists()
    assert vms.status("bye")["cleanedUpAt"]


def test_a_delete_for_a_vm_whose_object_is_gone_is_dropped_and_the_orphan_is_left_to_cleanup(
        make_worker, netns, vms, celery_client):
    worker = make_worker(netns=netns, sync_interval_seconds=300, orphan_min_age_seconds=0)
    vm = vms.placed("ghost", worker.node)
    state = hold(worker, vm)
    vms.delete("ghost")  # no finalizer: gone at once, as after a force-delete of a lost node
    wait_for(lambda: vms.get("ghost") is None, 10, "the object to go")

    out = send(celery_client, worker, names.DELETE_VM, vms.ns, "ghost", vm["metadata"]["uid"], "delete")
    assert out["outcome"].startswith("dropped"), out
    assert state.exists(), "a message alone never removes what the node holds"

    # the level-triggered sweep, which reads the API server's list and not the message, removes it
    broadcast_until(celery_client, names.CLEANUP_OLD_VMS, {}, lambda: not state.exists(), 30,
                    "cleanup_old_vms to remove the orphan")


def test_the_status_sync_removes_a_vm_whose_object_is_gone_by_the_name_the_node_recorded(
        make_worker, netns, vms, celery_client):
    worker = make_worker(netns=netns, sync_interval_seconds=300)  # orphans younger than 300 s stay
    vm = vms.placed("ghost", worker.node)
    state = hold(worker, vm)
    vms.delete("ghost")  # no finalizer: gone at once, as after a force-delete of a lost node
    wait_for(lambda: vms.get("ghost") is None, 10, "the object to go")

    # the next status sync (every 30 s by default) removes it, well before the daily cleanup
    broadcast_until(celery_client, names.SYNC_VM_STATUS, {}, lambda: not state.exists(), 30,
                    "sync_vm_status to remove the VM whose object is gone")


def test_beat_tasks_ignore_arguments_in_the_message_and_act_on_the_settings(worker, vms, celery_client):
    orphan = worker.vms_dir / str(uuid.uuid4())  # an orphan younger than MIKROM_ORPHAN_MIN_AGE_SECONDS (300)
    orphan.mkdir(parents=True)
    (orphan / "rootfs.img").write_bytes(b"fresh")

    broadcast_until(celery_client, names.CLEANUP_OLD_VMS, {"orphan_min_age_seconds": 0},
                    lambda: f"{names.CLEANUP_OLD_VMS} takes no arguments: ignored 0 positional and 1 keyword "
                            "argument(s) ['orphan_min_age_seconds']" in worker.log_text(),
                    30, "the worker to ignore cleanup_old_vms's argument")
    wait_for(lambda: any(f"Task {names.CLEANUP_OLD_VMS}[" in line and " succeeded " in line
                         for line in worker.log_text().splitlines()), 10, "the sweep to finish")
    assert orphan.exists() and (orphan / "rootfs.img").read_bytes() == b"fresh"

    out = celery_client.send_task(names.GENERATE_REPORT, kwargs={"namespace": vms.ns},
                                  queue=names.node_queue(worker.node)).get(timeout=30)
    assert out["namespace"] == "mikrom" and out["configMap"] == "mikrom-fleet-report"
    worker.wait_log(f"{names.GENERATE_REPORT} takes no arguments: ignored 0 positional and 1 keyword argument(s) "
                    "['namespace']", 10)

    out = celery_client.send_task(names.HEALTH_CHECK, args=["x"], queue=names.node_queue(worker.node)).get(timeout=30)
    assert out["node"] == worker.node
