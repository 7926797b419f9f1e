"""The worker's status sync asks the API server for its own node's MicroVMs only (a field selector
on `status.node`, a selectable field of the CRD), yet still lets go of what it holds locally of VMs
that are now placed on another node or deleted.

The sync runs in this process with the worker's real parts (locks, runtime, reconciler, status
writer) on a state directory of the test's own, as the `mikrom-worker` ServiceAccount against the
real API server; the HTTP requests it sends are recorded on their way out.
"""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from harness.recording_api import worker_api  # noqa: F401 - the fixture

from mikrom import kube, names
from mikrom.settings import Settings
from mikrom.worker import maintenance
from mikrom.worker.context import WorkerContext
from mikrom.worker.locks import NodeLocks
from mikrom.worker.reconcile import Reconciler
from mikrom.worker.runtime import Runtime
from mikrom.worker.status import StatusWriter


@pytest.fixture
def sync_ctx(tmp_path, netns):
    node = f"sync-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({}).replace(node_name=node, state_dir=str(tmp_path / "state"), netns=netns)
    locks = NodeLocks(tmp_path / "state" / "locks")
    ctx = WorkerContext(settings=settings, node=node, locks=locks, runtime=Runtime(settings, locks),
                        writer=StatusWriter(node))
    ctx.reconciler = Reconciler(ctx)
    return ctx


def _manifest(namespace: str, name: str) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": namespace},
            "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                     "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}


def test_the_sync_lists_only_its_nodes_vms_and_still_lets_go_of_held_vms_placed_elsewhere_or_gone(
        kube_api, namespace, worker_api, sync_ctx):
    admin = client.CustomObjectsApi(kube_api)
    G, V, P = names.GROUP, names.VERSION, names.MICROVMS

    def make(name: str, node: str | None) -> dict:
        vm = admin.create_namespaced_custom_object(G, V, namespace, P, _manifest(namespace, name),
                                                   _request_timeout=kube.TIMEOUT)
        if node:
            vm = admin.patch_namespaced_custom_object_status(G, V, namespace, P, name,
                                                             {"status": {"node": node, "phase": "Scheduled"}},
                                                             _request_timeout=kube.TIMEOUT)
        return vm

    def hold(vm: dict):
        """What this node would keep of a VM it started: its state directory and meta.json."""
        meta = vm["metadata"]
        local = sync_ctx.runtime.local(meta["uid"])
        local.update_meta(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], vmm="qemu")
        return local

    mine = make("mine", sync_ctx.node)
    moved = hold(make("moved", "another-node"))  # placed elsewhere while this node was lost
    make("theirs", "another-node")  # another node's, never held here
    deleted_vm = make("deleted", sync_ctx.node)
    deleted = hold(deleted_vm)
    admin.delete_namespaced_custom_object(G, V, namespace, P, "deleted", _request_timeout=kube.TIMEOUT)

    summary = maintenance.sync_node(sync_ctx, lock_timeout=5.0)

    lists = [(path, query) for method, path, query in worker_api.requests
             if method == "GET" and path.endswith(f"/{P}")]
    assert lists, worker_api.requests
    for path, query in lists:
        assert query.get("fieldSelector") == f"status.node={sync_ctx.node}", (path, query)
    # the VMs it holds that the selected list lacks are read one by one; another node's never
    assert not [r for r in worker_api.requests if r[1].endswith(f"/{P}/theirs")]
    assert summary["vms"] == 3, summary
    assert not moved.exists() and not deleted.exists()
    status = admin.get_namespaced_custom_object_status(G, V, namespace, P, "mine",
                                                       _request_timeout=kube.TIMEOUT)["status"]
    assert status["phase"] == "Stopped" and mine["metadata"]["uid"]
