"""What one create asks of the API server, counted at a front of it (harness.apicount) between a
real `mikrom worker` and kube-apiserver, with the real operator and a real QEMU boot under TCG.

A create is one read of the MicroVM (the message's check, which the reconciler acts on) and one
status write for each phase it enters: Provisioning, then Running.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from harness.apicount import CountingProxy
from harness.procs import holds_for
from harness.vms import e2e_skip_reason

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")


@pytest.fixture
def counting_proxy(worker_kubeconfig):
    # requested before the fleet and the worker, so it outlives both (the worker confirms the
    # VMs' deletion through it at the end)
    with CountingProxy(worker_kubeconfig) as proxy:
        yield proxy


def _status_written(body) -> dict:
    """The status fields a PATCH sets: a merge patch's `status`, or a JSON patch's add operations
    (the worker's guarded first write of an action)."""
    if isinstance(body, list):
        return {op["path"].removeprefix("/status/"): op["value"] for op in body
                if op.get("op") == "add" and op.get("path", "").startswith("/status/")}
    return body.get("status", {})


def _parse(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_a_create_reads_its_microvm_once_and_writes_provisioning_once_and_running_once(
        counting_proxy, fleet, make_worker, netns, guest_image_dir, tmp_path):
    # no periodic sync during the test: what is counted is the create's own work
    worker = make_worker(netns=netns, image_dir=guest_image_dir, sync_interval_seconds=3600, start=False)
    worker.env["KUBECONFIG"] = str(counting_proxy.kubeconfig(worker.env["KUBECONFIG"], tmp_path / "counted"))
    worker.start()
    fleet.node = worker.node

    fleet.create("counted")
    st = fleet.wait_phase("counted", "Running", timeout=120, avoid=("Failed",))
    fleet.wait_event("counted", "Started")
    vm_path = f"/apis/mikrom.io/v1alpha1/namespaces/{fleet.ns}/microvms/counted"

    def requests() -> tuple[list, list]:
        gets = counting_proxy.seen("GET", vm_path)
        writes = [_status_written(json.loads(r.body)) for r in counting_proxy.seen("PATCH", vm_path + "/status")]
        return gets, writes

    gets, writes = requests()
    started = _parse(st["startedAt"])  # when the supervisor exec'd the VMM (run.json)
    assert len([g for g in gets if g.at < started]) == 1, \
        f"GETs of the MicroVM before the VMM started: {[(g.at - started) for g in gets]}"
    assert [w.get("phase") for w in writes] == ["Provisioning", "Running"], writes
    assert writes[-1].get("pid") == st["pid"] and writes[-1].get("ipAddress") == st["ipAddress"]
    # and nothing more for it once it runs
    holds_for(lambda: requests() == (gets, writes), 3, "no further read or write of the running VM")
