"""The kube-apiserver really stopped (killed, then started again on the same port with the same
storage) for 30 s and then for 150 s, far past the fence plus the margin, with two real workers,
a QEMU VM on each and the real operator running throughout: no VM stops anywhere, the operator
does not take the nodes for lost when the API server returns (its heartbeat clock counts its own
blindness), and status catches up within 30 s of the return. The module has a control plane of
its own (harness.fence_cases), so stopping it cannot break the session's other tests."""

from __future__ import annotations

import time

import pytest
from harness.fence_cases import (FENCE, LOST_AFTER, MARGIN, OPERATOR_ENV, fence_record, fenced_worker,
                                 heartbeat_after, label, new_selector, running_once, vms_on)
from harness.fence_cases import control_plane, kube_api, mikrom_operator_cluster, worker_kubeconfig  # noqa: F401
from harness.overlap import overlap  # noqa: F401 - the fixture
from harness.procs import holds_for, wait_for
from harness.vms import e2e_skip_reason

from mikrom import conditions, names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

OUTAGES = (30, 150)
CATCH_UP = 30       # seconds after the API server is back: heartbeats and VM status current again


@pytest.fixture
def operator_env():
    return dict(OPERATOR_ENV)


def test_the_api_server_stopped_for_30s_then_150s_stops_no_vm_and_status_catches_up_each_time(
        fleet, overlap, netns, guest_image_dir, control_plane):
    assert max(OUTAGES) > FENCE + MARGIN + 60 and min(OUTAGES) > FENCE + MARGIN, "outages past the fence"
    sel = new_selector()
    a = fenced_worker(overlap, netns, guest_image_dir)
    label(fleet, a, sel)
    on_a = vms_on(fleet, a.node, sel, count=1)
    fleet.patch_cluster_object(names.MICROVMNODES, a.node, {"spec": {"schedulable": False}})
    b = fenced_worker(overlap, netns, guest_image_dir)
    label(fleet, b, sel)
    on_b = vms_on(fleet, b.node, sel, count=1)
    workers = (a, b)
    placed = {name: (w, vm["uid"], vm["pid"]) for w, vms in ((a, on_a), (b, on_b)) for name, vm in vms.items()}

    for seconds in OUTAGES:
        with control_plane.apiserver_stopped():
            holds_for(lambda: running_once(fleet, placed) and fleet.operator.alive(), seconds,
                      f"every VM to keep running through a {seconds}s API server outage", interval=0.5)
        back, since = time.monotonic(), time.time()
        seen = []

        def caught_up() -> bool:
            phases = {name: fleet.status(name) for name in placed}
            seen.extend((name, st.get("phase"), st.get("node")) for name, st in phases.items())
            return (all(heartbeat_after(fleet, w.node, since) and _ready(fleet, w.node) for w in workers)
                    and all(st.get("phase") == "Running" and st.get("pid") == placed[name][2]
                            and st.get("node") == placed[name][0].node for name, st in phases.items()))

        wait_for(caught_up, CATCH_UP, f"status to catch up after the {seconds}s outage", interval=0.5)
        took = time.monotonic() - back
        # past the node-lost time after the return: nothing is taken for lost, nothing moves
        holds_for(lambda: caught_up() and running_once(fleet, placed), LOST_AFTER + 2,
                  "the nodes Ready and the VMs Running in place after the return", interval=0.5)
        wrong = [s for s in seen if s[1] != "Running" or s[2] != placed[s[0]][0].node]
        assert not wrong, f"after the {seconds}s outage the operator took a node for lost: {wrong[:5]}"
        for w in workers:
            assert "ControlPlaneOutage" in w.log_text()
            assert not any(fence_record(w, uid) for _, uid, _ in placed.values())
        assert any("can be read again" in line for line in fleet.operator.lines())
        print(f"{seconds}s outage: status caught up {took:.1f}s after the API server was back")
    overlap.assert_no_overlap()


def _ready(fleet, node: str) -> bool:
    st = (fleet.cluster_object(names.MICROVMNODES, node) or {}).get("status") or {}
    return conditions.is_true(st.get("conditions"), names.READY)
