"""What the fencing e2e tests (tests/e2e/test_fence*.py) share: the fence settings the workers and
the operator run with, workers made with them, VMs placed on one node, the checks that a lost
node's VMs were stopped by their own supervisors before they moved and then ran only once, and a
dedicated control plane for the tests that stop the API server (`dedicated_control_plane`: a
module that imports its fixtures gets a kube-apiserver of its own, so stopping it cannot break
the session's other tests).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pytest

from mikrom import names

from . import controlplane, operator_proc
from .serviceaccounts import OPERATOR
from .vms import vmm_pids
from .waits import wait_for
from .worker_proc import install_crds, service_account_kubeconfig

FENCE = 10          # selfFenceAfterSeconds, for the workers and the operator
MARGIN = 12         # rescheduleMarginSeconds: a lost node's VMs move FENCE + MARGIN after its last heartbeat
HEARTBEAT = 1
KILL_AFTER = 2
PEER_WINDOW = 4     # < FENCE - 2 * HEARTBEAT
LOST_AFTER = 6      # nodeLostAfterSeconds

OPERATOR_ENV = {"MIKROM_NODE_LOST_AFTER_SECONDS": str(LOST_AFTER), "MIKROM_SELF_FENCE_AFTER_SECONDS": str(FENCE),
                "MIKROM_RESCHEDULE_MARGIN_SECONDS": str(MARGIN)}
"""The operator's settings for these tests (a module's `operator_env` fixture returns them)."""


def fenced_worker(overlap, netns, guest_image_dir, kubeconfig=None, start: bool = True, **settings):
    """A worker with the fence settings above (its state directory watched by `overlap`)."""
    w = overlap.make_worker(netns=netns, image_dir=guest_image_dir, start=False, heartbeat_seconds=HEARTBEAT,
                            self_fence_after_seconds=FENCE, fence_peer_window_seconds=PEER_WINDOW,
                            fence_kill_after_seconds=KILL_AFTER, sync_interval_seconds=3, **settings)
    if kubeconfig:
        w.env["KUBECONFIG"] = str(kubeconfig)
    return w.start() if start else w


def label(fleet, worker, sel: dict) -> None:
    fleet.patch_cluster_object(names.MICROVMNODES, worker.node, {"metadata": {"labels": sel}})


def new_selector() -> dict:
    return {"e2e-fence": uuid.uuid4().hex[:10]}


def vms_on(fleet, node, sel, count=2, timeout: float = 120) -> dict[str, dict]:
    """`count` Always VMs (not pinned, no network) placed on `node` (the only one labelled `sel`)."""
    names_ = [f"vm{i}-{uuid.uuid4().hex[:4]}" for i in range(count)]
    for name in names_:
        fleet.create(name, network=False, nodeSelector=sel)
    out = {}
    for name in names_:
        st = fleet.wait_phase(name, "Running", timeout=timeout, avoid=("Failed",))
        assert st["node"] == node
        out[name] = {"uid": fleet.get(name)["metadata"]["uid"], "pid": st["pid"]}
    return out


def fence_record(worker, uid) -> dict | None:
    try:
        return json.loads((worker.vms_dir / uid / "fence.json").read_text())
    except (OSError, ValueError):
        return None


def two_nodes(fleet, overlap, netns, guest_image_dir, kubeconfig=None):
    """The node that will be lost (with two VMs), then a spare node with the same label."""
    sel = new_selector()
    lost = fenced_worker(overlap, netns, guest_image_dir, kubeconfig)
    label(fleet, lost, sel)
    vms = vms_on(fleet, lost.node, sel)
    spare = fenced_worker(overlap, netns, guest_image_dir)
    label(fleet, spare, sel)
    return lost, spare, vms


def expect_fenced_by_supervisors_then_moved(fleet, lost, spare, vms, t0):
    """Each VM's VMM on `lost` stops (its supervisor records the fence) no earlier than the lease
    allows and before the operator moves it; then it runs on `spare`."""
    for vm in vms.values():
        wait_for(lambda: vmm_pids(lost.state_dir, vm["uid"]) == [], FENCE + KILL_AFTER + 15,
                 "the lost node's supervisor to stop its VMM")
    stopped = time.monotonic() - t0
    # the last renewal was at most one heartbeat round before t0
    assert stopped >= FENCE - HEARTBEAT - 1, f"fenced after {stopped:.1f}s, before selfFenceAfterSeconds"
    for vm in vms.values():
        record = fence_record(lost, vm["uid"])
        assert record and record["reason"] == "LeaseExpired", f"no supervisor fence record: {record}"
    for name, vm in vms.items():
        st = wait_for(lambda: (s := fleet.status(name)).get("node") == spare.node and s.get("phase") == "Running"
                      and s, 120, f"{name} to run on the spare node")
        vm["spare_pid"] = st["pid"]
        assert vmm_pids(spare.state_dir, vm["uid"]) == [st["pid"]]
    moved = time.monotonic() - t0
    assert moved >= FENCE + MARGIN - HEARTBEAT - 1, f"moved after {moved:.1f}s, before the fence plus the margin"


def still_only_on_the_spare(fleet, lost, spare, vms):
    def check() -> bool:
        for name, vm in vms.items():
            st = fleet.status(name)
            if (st.get("node"), st.get("phase"), st.get("pid")) != (spare.node, "Running", vm["spare_pid"]):
                return False
            if vmm_pids(spare.state_dir, vm["uid"]) != [vm["spare_pid"]] or vmm_pids(lost.state_dir, vm["uid"]):
                return False
        return True
    return check


def heartbeat_after(fleet, node: str, since: float) -> bool:
    """The node's lastHeartbeatTime is later than `since` (whole seconds, as the worker writes it)."""
    stamp = ((fleet.cluster_object(names.MICROVMNODES, node) or {}).get("status") or {}).get("lastHeartbeatTime")
    if not stamp:
        return False
    t = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return t >= int(since) + 1


def running_once(fleet, placed: dict[str, tuple]) -> bool:
    """Every VM (name -> (worker, uid, pid)) still runs as that one VMM, and nowhere else."""
    for _name, (w, uid, pid) in placed.items():
        if vmm_pids(w.state_dir, uid) != [pid]:
            return False
    return True


# ------------------------------------------------------------------ a control plane of their own

@pytest.fixture(scope="module")
def control_plane(artifacts_dir):
    """A kube-apiserver (and its storage) for this module alone: its tests stop it."""
    cp = controlplane.start(artifacts_dir / f"controlplane-{uuid.uuid4().hex[:6]}")
    yield cp
    cp.stop()


@pytest.fixture(scope="module")
def kube_api(control_plane):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="module")
def worker_kubeconfig(control_plane, artifacts_dir, kube_api):
    install_crds(control_plane)
    return service_account_kubeconfig(control_plane, artifacts_dir / f"worker-{uuid.uuid4().hex[:6]}" / "kubeconfig")


@pytest.fixture(scope="module")
def mikrom_operator_cluster(control_plane, worker_kubeconfig, artifacts_dir):
    operator_proc.install(control_plane)
    return OPERATOR.kubeconfig(control_plane, artifacts_dir / f"operator-{uuid.uuid4().hex[:6]}" / "kubeconfig")


DEDICATED_CONTROL_PLANE = ("control_plane", "kube_api", "worker_kubeconfig", "mikrom_operator_cluster")
