"""Events that aggregate: a report repeated a hundred times on one MicroVM is one Event counted a
hundred times (or, with a hundred different messages, a handful of Events whose counts add up), so
`kubectl describe` stays readable. Recorded through the shared helper with the worker's and the
operator's own ServiceAccounts, so their RBAC must allow it."""

from __future__ import annotations

import re

import pytest
from kubernetes import config

from mikrom import kube


@pytest.fixture
def as_identity(worker_kubeconfig, operator_kubeconfig):
    """Point `mikrom.kube` at a ServiceAccount's kubeconfig for the test; restored after."""
    saved = kube._api
    clients = []

    def use(which: str):
        path = {"worker": worker_kubeconfig, "operator": operator_kubeconfig}[which]
        c = config.new_client_from_config(config_file=str(path))
        clients.append(c)
        kube.set_api(c)

    yield use
    kube.set_api(saved)
    for c in clients:
        c.close()


def _describe(mvms, name: str) -> str:
    return mvms.cp.kubectl("describe", "mvm", name, "-n", mvms.ns).stdout


def test_a_hundred_identical_worker_events_are_one_event_counted_a_hundred_times(mikrom_cluster, mvms, as_identity):
    mvms.create("retrying")
    vm = mvms.get("retrying")
    uid = vm["metadata"]["uid"]
    as_identity("worker")
    for _ in range(100):
        kube.event(vm, "ImageNotFound", "spec.image.rootfs: images/missing.img is not in the image directory",
                   type_="Warning", component="mikrom-worker")
    events = [e for e in mvms.events(uid) if e.reason == "ImageNotFound"]
    assert len(events) == 1, [(e.metadata.name, e.count) for e in events]
    assert events[0].count == 100 and events[0].type == "Warning"
    assert events[0].first_timestamp <= events[0].last_timestamp
    out = _describe(mvms, "retrying")
    line = next(ln for ln in out.splitlines() if "ImageNotFound" in ln)
    assert re.search(r"\(x100 over [0-9a-z]+\)", line), out


def test_a_hundred_operator_events_with_changing_messages_are_a_handful_whose_counts_add_up(mikrom_cluster, mvms,
                                                                                            as_identity):
    mvms.create("flapping")
    vm = mvms.get("flapping")
    uid = vm["metadata"]["uid"]
    as_identity("operator")
    for i in range(100):
        kube.event(vm, "DispatchFailed", f"could not send create_vm_task: retrying in {i % 7}.{i}s (failure {i})",
                   type_="Warning", component="mikrom-operator")
    events = [e for e in mvms.events(uid) if e.reason == "DispatchFailed"]
    assert len(events) <= kube.SIMILAR_LIMIT + 1, len(events)
    assert sum(e.count for e in events) == 100
    combined = [e for e in events if e.message.startswith("(combined from similar events): ")]
    assert len(combined) == 1 and combined[0].count == 100 - kube.SIMILAR_LIMIT
    assert combined[0].message.endswith("(failure 99)")  # the latest message
    out = _describe(mvms, "flapping")
    assert re.search(r"\(x90 over [0-9a-z]+\).*\(combined from similar events\)", out), out
    assert out.count("DispatchFailed") == len(events)


def test_an_event_recorded_again_after_the_process_forgot_it_counts_on(mikrom_cluster, mvms, as_identity):
    """A restarted worker (no memory of what it recorded) finds the Event by its name and counts on."""
    mvms.create("restarted")
    vm = mvms.get("restarted")
    as_identity("worker")
    for _ in range(3):
        kube.event(vm, "Started", "the guest is up (node n1)", component="mikrom-worker")
    kube._known_events.clear()
    kube._similar.clear()
    for _ in range(2):
        kube.event(vm, "Started", "the guest is up (node n1)", component="mikrom-worker")
    events = [e for e in mvms.events(vm["metadata"]["uid"]) if e.reason == "Started"]
    assert [e.count for e in events] == [5]


def test_a_hundred_real_failed_downloads_of_one_vm_are_a_handful_of_events_whose_counts_add_up(fleet, make_worker,
                                                                                                 netns, tmp_path):
    """The real path end to end: the operator places the VM, the node worker tries its kernel URL,
    the loopback server answers 404, the worker reports Failed ("retrying") and its periodic sync
    (every 0.2 s here) tries again, a hundred times, each time through Provisioning and back."""
    from harness.http_files import FileServer
    from harness.waits import wait_for

    empty = tmp_path / "served"
    empty.mkdir()
    with FileServer(empty) as server:
        worker = make_worker(netns=netns, image_url_allowed_cidrs="127.0.0.1/32", sync_interval_seconds=0.2)
        fleet.node = worker.node
        fleet.create("unfetchable", network=False,
                     image={"kernel": {"url": server.url("vmlinuz"), "sha256": "a" * 64},
                            "initrd": {"url": server.url("initrd.img"), "sha256": "b" * 64}})

        def failed_downloads():
            events = [e for e in fleet.events("unfetchable") if e.reason == "ImageDownloadFailed"]
            return sum(e.count or 1 for e in events) >= 100 and events

        wait_for(failed_downloads, 240, "a hundred failed downloads reported")
        fleet.patch("unfetchable", {"spec": {"runStrategy": "Halted"}})  # stop trying
        fleet.wait_phase("unfetchable", "Stopped", timeout=60)
        attempts = len(server.hits)
    events = fleet.events("unfetchable")
    failed = [e for e in events if e.reason == "ImageDownloadFailed"]
    assert attempts >= 100 and set(server.hits) <= {"/vmlinuz", "/initrd.img"}
    assert len(events) <= 6, [(e.reason, e.count, e.message) for e in events]
    assert len(failed) == 1 and failed[0].type == "Warning" and failed[0].count >= 100
    assert failed[0].message.startswith("spec.image.kernel.url: the download failed")
    # every failure was reported: one count per attempt, give or take the attempt in flight
    assert attempts - 2 <= sum(e.count for e in failed) <= attempts, (attempts, failed[0].count)
