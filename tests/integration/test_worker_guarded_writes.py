"""A task's reconcile acts on the object its message check read (one GET per message); the first
status write of the action it decides is guarded by what the decision rests on in that object
(uid, generation, node, conditions: a JSON patch's tests), so an object that changed in between is
decided again instead of acted on, and a change of metadata alone (kopf's finalizer) refuses nothing.

The reconciler runs in this process with the worker's real parts (locks, runtime, status writer) on
a state directory of the test's own, as the `mikrom-worker` ServiceAccount against the real API
server; no VMM is started (the test changes the object so that none may be).
"""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from harness.recording_api import worker_api  # noqa: F401 - the fixture

from mikrom import kube, names
from mikrom.settings import Settings
from mikrom.worker.context import WorkerContext
from mikrom.worker.locks import NodeLocks
from mikrom.worker.reconcile import Reconciler
from mikrom.worker.runtime import Runtime
from mikrom.worker.status import ObjectChanged, StatusWriter

G, V, P = names.GROUP, names.VERSION, names.MICROVMS


@pytest.fixture
def ctx(tmp_path):
    node = f"guard-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env({}).replace(node_name=node, state_dir=str(tmp_path / "state"),
                                             image_dir=str(tmp_path / "images"), host_cgroups=False)
    locks = NodeLocks(tmp_path / "state" / "locks")
    ctx = WorkerContext(settings=settings, node=node, locks=locks, runtime=Runtime(settings, locks),
                        writer=StatusWriter(node))
    ctx.reconciler = Reconciler(ctx)
    return ctx


def _placed(admin, namespace: str, name: str, node: str) -> dict:
    body = {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": namespace},
            "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Always", "vmm": "qemu",
                     "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}
    admin.create_namespaced_custom_object(G, V, namespace, P, body, _request_timeout=kube.TIMEOUT)
    return admin.patch_namespaced_custom_object_status(G, V, namespace, P, name,
                                                       {"status": {"node": node, "phase": "Scheduled"}},
                                                       _request_timeout=kube.TIMEOUT)


def test_a_start_decided_from_an_object_that_changed_meanwhile_is_decided_again_and_nothing_starts(
        kube_api, namespace, worker_api, ctx):
    admin = client.CustomObjectsApi(kube_api)
    read = _placed(admin, namespace, "changed", ctx.node)  # what the task's message check read
    # ...and before the reconcile acts on it, the user halts the VM
    halted = admin.patch_namespaced_custom_object(G, V, namespace, P, "changed", {"spec": {"runStrategy": "Halted"}},
                                                  _request_timeout=kube.TIMEOUT)
    worker_api.requests.clear()

    outcome = ctx.reconciler.reconcile(namespace, "changed", read["metadata"]["uid"], known=read)

    assert outcome == "stopped"
    st = admin.get_namespaced_custom_object(G, V, namespace, P, "changed", _request_timeout=kube.TIMEOUT)["status"]
    assert st["phase"] == "Stopped" and st["observedGeneration"] == halted["metadata"]["generation"]
    assert not ctx.runtime.local(read["metadata"]["uid"]).observe().configured, "no VMM was started"
    path = f"/apis/{G}/{V}/namespaces/{namespace}/{P}/changed"
    # the guarded Provisioning write (refused, 422), one read of the fresh object, the Stopped write
    assert [r[:2] for r in worker_api.requests if r[1] in (path, path + "/status")] == [
        ("PATCH", path + "/status"), ("GET", path), ("PATCH", path + "/status")]


def test_a_guarded_write_of_an_unchanged_object_is_one_request_and_of_a_changed_one_writes_nothing(
        kube_api, namespace, worker_api, ctx):
    admin = client.CustomObjectsApi(kube_api)
    read = _placed(admin, namespace, "guarded", ctx.node)
    written = ctx.writer.report(read, phase="Provisioning", reason="Provisioning", message="starting", guard=True)
    assert written["status"]["phase"] == "Provisioning"
    # the same write again changes nothing, but still checks the object (an empty guarded patch)
    assert ctx.writer.report(written, phase="Provisioning", reason="Provisioning", message="starting",
                             guard=True)["metadata"]["resourceVersion"] == written["metadata"]["resourceVersion"]

    admin.patch_namespaced_custom_object(G, V, namespace, P, "guarded", {"spec": {"memoryMiB": 256}},
                                         _request_timeout=kube.TIMEOUT)
    with pytest.raises(ObjectChanged) as changed:
        ctx.writer.report(written, phase="Running", reason="Running", message="up", guard=True)
    assert changed.value.fresh["spec"]["memoryMiB"] == 256
    st = admin.get_namespaced_custom_object(G, V, namespace, P, "guarded", _request_timeout=kube.TIMEOUT)["status"]
    assert st["phase"] == "Provisioning"


def test_a_guarded_write_is_not_refused_for_a_change_of_metadata_alone_such_as_kopfs_finalizer(
        kube_api, namespace, worker_api, ctx):
    admin = client.CustomObjectsApi(kube_api)
    read = _placed(admin, namespace, "finalized", ctx.node)
    # kopf adds its finalizer just after the operator's placement write, while the node prepares
    admin.patch_namespaced_custom_object(G, V, namespace, P, "finalized",
                                         {"metadata": {"finalizers": [names.FINALIZER], "labels": {"x": "y"}}},
                                         _request_timeout=kube.TIMEOUT)
    worker_api.requests.clear()
    written = ctx.writer.report(read, phase="Provisioning", reason="Provisioning", message="starting", guard=True)
    assert written["status"]["phase"] == "Provisioning"
    assert written["metadata"]["finalizers"] == [names.FINALIZER]
    path = f"/apis/{G}/{V}/namespaces/{namespace}/{P}/finalized/status"
    assert [r[:2] for r in worker_api.requests if r[1] == path] == [("PATCH", path)]  # one request, no re-read


def test_a_guarded_write_is_refused_once_the_objects_deletion_began_or_it_moved_to_another_node(
        kube_api, namespace, worker_api, ctx):
    admin = client.CustomObjectsApi(kube_api)
    read = _placed(admin, namespace, "moved", ctx.node)
    admin.patch_namespaced_custom_object_status(G, V, namespace, P, "moved", {"status": {"node": "elsewhere"}},
                                                _request_timeout=kube.TIMEOUT)
    assert ctx.writer.report(read, phase="Provisioning", reason="Provisioning", message="starting",
                             guard=True) is None  # no longer this node's to report
    read = _placed(admin, namespace, "deleting", ctx.node)
    admin.patch_namespaced_custom_object(G, V, namespace, P, "deleting", {"metadata": {"finalizers": [names.FINALIZER]}},
                                         _request_timeout=kube.TIMEOUT)
    admin.delete_namespaced_custom_object(G, V, namespace, P, "deleting", _request_timeout=kube.TIMEOUT)
    with pytest.raises(ObjectChanged) as changed:
        ctx.writer.report(read, phase="Provisioning", reason="Provisioning", message="starting", guard=True)
    assert changed.value.fresh["metadata"]["deletionTimestamp"]
    for name in ("moved", "deleting"):
        st = admin.get_namespaced_custom_object(G, V, namespace, P, name, _request_timeout=kube.TIMEOUT)["status"]
        assert st.get("phase") == "Scheduled", st
    admin.patch_namespaced_custom_object(G, V, namespace, P, "deleting", {"metadata": {"finalizers": None}},
                                         _request_timeout=kube.TIMEOUT)
