"""The worker's tasks against a real API server and a real Redis, with a real `mikrom worker`
process running as the `mikrom-worker` ServiceAccount (deploy/rbac/worker.yaml).

No VM boots here (the e2e tests do that): the VMs are `runStrategy: Halted`, unplaced, placed on
another node, or stale, which exercises routing, forwarding, idempotency and the lock. The test plays
the operator's part where one is needed (placing a VM means setting `status.node`).
"""

from __future__ import annotations

import json
import uuid

import pytest
from harness.microvms import T, MicroVMClient
from harness.procs import holds_for, wait_for
from harness.scrape import scrape
from harness.serviceaccounts import WORKER
from harness.worker_proc import broadcast_until

from mikrom import broker, names
from mikrom.worker.locks import NodeLocks
from mikrom.worker.node import host_capacity


@pytest.fixture
def worker(make_worker, netns):
    return make_worker(netns=netns, sync_interval_seconds=300)


class TaskVMs(MicroVMClient):
    """The test's MicroVMs as the worker's tasks find them: Halted unless told, placed by the test."""

    def manifest(self, name: str, strategy: str = "Halted", **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": strategy,
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}

    def make(self, name: str, node: str | None, strategy: str = "Halted", **spec) -> dict:
        """Create the MicroVM and, with `node`, place it there as the operator would."""
        vm = self.create(name, strategy=strategy, **spec)
        if node:
            vm = self.patch_status(name, {"node": node, "phase": "Scheduled"})
        return vm

    def events(self, name: str, reason: str | None = None) -> list:
        items = self.core.list_namespaced_event(self.ns, _request_timeout=T).items
        return [e for e in items if e.involved_object.name == name and (reason is None or e.reason == reason)]


@pytest.fixture
def vms(kube_api, namespace) -> TaskVMs:
    return TaskVMs(kube_api, namespace)


def ref(vm: dict, intent: str = "create") -> dict:
    m = vm["metadata"]
    return {"namespace": m["namespace"], "name": m["name"], "uid": m["uid"], "intent": intent}


def test_inspect_registered_lists_the_guides_five_task_names(worker):
    res = worker.celery("inspect", "registered", "-d", f"mikrom@{worker.node}", "--timeout", "10")
    assert res.returncode == 0, res.stderr
    for task in names.VM_TASKS:
        assert f"* {task}" in res.stdout, res.stdout
    assert "* mikrom.worker.tasks.sync_vm_status" in res.stdout


def test_the_worker_registers_its_node_and_keeps_it_heartbeating(worker, vms):
    def heartbeat() -> str | None:
        # registration runs in the background, just after the worker reports ready
        return ((vms.cluster_object(names.MICROVMNODES, worker.node) or {}).get("status") or {}).get(
            "lastHeartbeatTime")

    first = wait_for(heartbeat, 20, "a heartbeat")
    node = vms.cluster_object(names.MICROVMNODES, worker.node)
    status = node["status"]
    assert status["capacity"] == host_capacity()  # no capacity settings: what this host has
    assert "qemu" in status["vmms"] and status["defaultVmm"] in status["vmms"]
    assert status["kvm"] in (True, False) and status["workerVersion"]
    assert node["metadata"]["labels"][names.LABEL_KVM] == ("true" if status["kvm"] else "false")
    wait_for(lambda: heartbeat() != first, 10, "the next heartbeat")


def test_a_halted_vm_is_reported_stopped_with_ready_false_and_an_event(worker, vms, celery_client):
    vm = vms.make("quiet", worker.node)
    result = celery_client.send_task(names.CREATE_VM, kwargs=ref(vm), queue=names.node_queue(worker.node))
    assert result.get(timeout=30)["outcome"] == "stopped"
    status = vms.get("quiet")["status"]
    assert status["phase"] == "Stopped" and status["observedGeneration"] == 1
    ready = [c for c in status["conditions"] if c["type"] == "Ready"][0]
    assert ready["status"] == "False" and ready["reason"] == "Stopped"
    assert status["node"] == worker.node  # the operator's field is untouched
    assert len(vms.events("quiet", "Stopped")) == 1


def test_twenty_duplicate_messages_have_the_effect_of_one(worker, vms, celery_client):
    vm = vms.make("dup", worker.node)
    results = [celery_client.send_task(names.CREATE_VM, kwargs=ref(vm), queue=names.node_queue(worker.node))
               for _ in range(20)]
    outcomes = [r.get(timeout=60)["outcome"] for r in results]
    assert outcomes == ["stopped"] * 20
    assert len(vms.events("dup", "Stopped")) == 1
    assert len(vms.events("dup")) == 1


def test_a_message_on_the_default_queue_is_forwarded_to_the_vms_node(worker, vms, celery_client, redis):
    other = "elsewhere-" + uuid.uuid4().hex[:6]
    vm = vms.make("far", other)
    result = celery_client.send_task(names.START_VM, kwargs=ref(vm, "start"), queue=names.DEFAULT_QUEUE)
    assert result.get(timeout=30)["outcome"] == f"forwarded to {other}"
    r = broker.client(redis.url(db=6))
    raw = r.lrange(names.node_queue(other), 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == names.START_VM
    args, kwargs, _ = json.loads(__import__("base64").b64decode(message["body"]))
    # the forwarded body is still a reference only, never a spec
    assert args == [] and kwargs == ref(vm, "start")
    assert vms.status("far")["phase"] == "Scheduled"  # untouched here


def test_the_task_api_of_the_guide_forwards_from_the_default_queue(worker, vms, redis):
    # `from mikrom.worker.tasks import create_vm_task; create_vm_task.delay(...)` as in the guide
    import subprocess
    import sys

    other = "elsewhere-" + uuid.uuid4().hex[:6]
    vm = vms.make("typed", other)
    code = ("from mikrom.worker.tasks import create_vm_task; import sys; "
            f"r = create_vm_task.delay(**{ref(vm)!r}); print(r.get(timeout=30)['outcome'])")
    res = subprocess.run([sys.executable, "-c", code], env=worker.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"forwarded to {other}"
    assert broker.client(redis.url(db=6)).llen(names.node_queue(other)) == 1


def test_a_message_for_an_unplaced_vm_is_dropped(worker, vms, celery_client):
    vm = vms.make("pending", None)
    result = celery_client.send_task(names.CREATE_VM, kwargs=ref(vm), queue=names.DEFAULT_QUEUE)
    assert result.get(timeout=30)["outcome"].startswith("dropped")
    assert not vms.status("pending")


def test_a_stale_message_for_a_recreated_namesake_does_nothing(worker, vms, celery_client):
    old = vms.make("again", worker.node)
    vms.delete("again")
    new = vms.make("again", worker.node, strategy="Always")
    result = celery_client.send_task(names.CREATE_VM, kwargs=ref(old), queue=names.node_queue(worker.node))
    assert result.get(timeout=30)["outcome"].startswith("dropped")
    again = vms.get("again")
    assert again["status"]["phase"] == "Scheduled" and again["metadata"]["uid"] == new["metadata"]["uid"]


def test_a_vm_assigned_to_another_node_is_not_touched_by_this_one(worker, vms, celery_client):
    vm = vms.make("notmine", "other-" + uuid.uuid4().hex[:6])
    result = celery_client.send_task(names.STOP_VM, kwargs=ref(vm, "stop"), queue=names.node_queue(worker.node))
    assert "nothing to do" in result.get(timeout=30)["outcome"]
    assert vms.get("notmine")["status"]["phase"] == "Scheduled"


def test_malformed_and_positional_messages_are_rejected_without_retries(worker, celery_client):
    bad = celery_client.send_task(names.CREATE_VM, args=[1, 2, 2048, None, None], queue=names.node_queue(worker.node))
    assert bad.get(timeout=30)["outcome"] == "rejected"
    forged = celery_client.send_task(names.CREATE_VM, kwargs={"namespace": "a", "name": "b", "uid": "c",
                                                              "kernel_path": "/etc/shadow"},
                                     queue=names.node_queue(worker.node))
    assert forged.get(timeout=30)["outcome"] == "rejected"


def test_a_task_waits_for_the_vm_lock_held_by_another_process(worker, vms, celery_client):
    vm = vms.make("locked", worker.node)
    uid = vm["metadata"]["uid"]
    with NodeLocks(worker.state_dir / "locks").hold(uid, timeout=5):
        result = celery_client.send_task(names.STOP_VM, kwargs=ref(vm, "stop"), queue=names.node_queue(worker.node))
        holds_for(lambda: not result.ready() and vms.status("locked")["phase"] == "Scheduled", 3,
                  "the task to wait for the lock, leaving the VM alone")
    assert result.get(timeout=30)["outcome"] == "stopped"


def test_delete_confirms_with_cleaned_up_at(worker, vms, celery_client):
    vm = vms.make("bye", worker.node)
    vms.patch("bye", {"metadata": {"finalizers": [names.FINALIZER]}})
    vms.delete("bye")
    result = celery_client.send_task(names.DELETE_VM, kwargs=ref(vm, "delete"), queue=names.node_queue(worker.node))
    assert result.get(timeout=30)["outcome"] == "deleted"
    assert vms.status("bye")["cleanedUpAt"]
    assert len(vms.events("bye", "CleanedUp")) == 1
    vms.patch("bye", {"metadata": {"finalizers": []}})


def test_the_broadcast_sync_reports_vms_without_any_vm_task(worker, vms, celery_client):
    vms.make("synced", worker.node)
    broadcast_until(celery_client, names.SYNC_VM_STATUS, {},
                    lambda: (vms.get("synced").get("status") or {}).get("phase") == "Stopped",
                    30, "the broadcast sync to report the VM Stopped")
    # the worker's own periodic sync is 300 s away: the broadcast task did it
    assert f"Task {names.SYNC_VM_STATUS}[" in worker.log_text()


def test_cleanup_deletes_finished_vms_past_their_ttl_and_removes_orphan_directories(make_worker, netns, vms,
                                                                                    celery_client):
    worker = make_worker(netns=netns, sync_interval_seconds=300, orphan_min_age_seconds=0)
    vm = vms.make("done", worker.node, strategy="Once", ttlSecondsAfterFinished=0)
    vms.patch_status("done", {"phase": "Succeeded", "finishedAt": "2024-01-01T00:00:00Z"})
    orphan = worker.vms_dir / str(uuid.uuid4())
    orphan.mkdir(parents=True)
    (orphan / "console.log").write_text("left behind\n")
    # broadcast: the sender has no single result to wait on, so watch the effects
    broadcast_until(celery_client, names.CLEANUP_OLD_VMS, {},
                    lambda: not orphan.exists() and vms.get("done") is None, 30,
                    "the orphan directory and the expired MicroVM to go")
    assert vm["metadata"]["uid"]


def test_generate_report_writes_the_fleet_configmap_under_the_workers_rbac(worker, vms, celery_client):
    vms.make("counted", worker.node)
    out = celery_client.send_task(names.GENERATE_REPORT).get(timeout=30)
    assert out["configMap"] == "mikrom-fleet-report" and out["namespace"] == "mikrom"
    cm = vms.core.read_namespaced_config_map("mikrom-fleet-report", "mikrom", _request_timeout=T)
    report = json.loads(cm.data["report.json"])
    assert report["vmCount"] >= 1 and "summary.txt" in cm.data


def test_health_check_reports_heartbeat_and_queue_depth(worker, celery_client):
    out = celery_client.send_task(names.HEALTH_CHECK, queue=names.node_queue(worker.node)).get(timeout=30)
    assert out["node"] == worker.node and out["problems"] == []
    assert names.node_queue(worker.node) in out["queueDepth"]


def test_the_workers_service_account_cannot_change_specs_or_touch_secrets(control_plane, worker_kubeconfig):
    def can(*args: str) -> bool:
        return WORKER.can(control_plane, *args)

    assert can("patch", "microvms.mikrom.io", "--subresource=status", "-n", "default")
    assert can("delete", "microvms.mikrom.io", "-n", "default")  # ttlSecondsAfterFinished
    assert can("create", "microvmnodes.mikrom.io")
    assert not can("patch", "microvms.mikrom.io", "-n", "default")
    assert not can("get", "secrets", "-n", "mikrom")
    assert not can("patch", "ippools.mikrom.io")


def test_the_worker_serves_prometheus_metrics_of_its_tasks_heartbeat_and_fleet(worker, vms, celery_client):
    vms.make("measured", worker.node)
    celery_client.send_task(names.HEALTH_CHECK, queue=names.node_queue(worker.node)).get(timeout=30)
    celery_client.send_task(names.GENERATE_REPORT, queue=names.node_queue(worker.node)).get(timeout=30)
    samples = wait_for(lambda: (s := scrape(worker.metrics_url)).get(
        f'mikrom_worker_tasks_total{{state="SUCCESS",task="{names.GENERATE_REPORT}"}}') and s, 10,
        "the report task to be counted")
    assert samples[f'mikrom_worker_tasks_total{{state="SUCCESS",task="{names.HEALTH_CHECK}"}}'] >= 1
    assert 0 <= samples[f'mikrom_worker_heartbeat_age_seconds{{node="{worker.node}"}}'] < 10
    assert samples[f'mikrom_worker_fenced{{node="{worker.node}"}}'] == 0
    assert samples[f'mikrom_worker_vmm_processes{{node="{worker.node}"}}'] == 0
    assert sum(v for k, v in samples.items() if k.startswith("mikrom_fleet_vms{")) >= 1
    assert "mikrom_vm_boot_seconds_count" in samples


def test_with_json_logs_every_worker_log_record_is_one_json_object(make_worker, netns, celery_client):
    worker = make_worker(netns=netns, log_format="json")
    celery_client.send_task(names.HEALTH_CHECK, queue=names.node_queue(worker.node)).get(timeout=30)
    worker.wait_log("health of", 20)
    records = []
    for line in worker.log_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    by_message = {r["message"]: r for r in records}
    registered = next(r for m, r in by_message.items() if m.startswith(f"registered MicroVMNode {worker.node}"))
    assert registered["level"] == "INFO" and registered["logger"] and registered["time"]
    assert any(m.startswith(f"health of {worker.node}") for m in by_message)  # a task's own log line
    # nothing logged as plain text: the only other lines are Celery's start-up banner on stdout
    plain = [line for line in worker.log_text().splitlines() if line.strip() and not line.startswith("{")]
    assert not any(" INFO/" in line or "[INFO" in line or "] INFO" in line for line in plain), plain[:10]
