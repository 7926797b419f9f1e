"""Placement against real capacity: least-allocated first, never double-booked, Pending with the
shortage named when nothing fits, and placed as soon as capacity appears."""

from __future__ import annotations

import collections
import time

from harness.procs import holds_for, wait_for
from mikrom import names


def _phases(mvms, count: int) -> dict:
    return {vm["metadata"]["name"]: vm.get("status") or {} for vm in mvms.list()[:count]}


def test_six_two_vcpu_vms_on_two_four_vcpu_nodes_place_four_and_leave_two_unschedulable(operators, worker, mvms):
    sel = {"test": mvms.label}
    a, b = f"a-{mvms.label}", f"b-{mvms.label}"
    worker.add_node(a, vcpus=4, memory_mib=8192, labels=sel)
    worker.add_node(b, vcpus=4, memory_mib=8192, labels=sel)
    operators()
    for i in range(6):
        mvms.create(f"vm-{i}", vcpus=2, memoryMiB=256, nodeSelector=sel)

    def settled():
        st = _phases(mvms, 6)
        placed = [n for n, s in st.items() if s.get("node")]
        pending = [n for n, s in st.items() if s.get("phase") == "Pending"]
        return st if len(placed) == 4 and len(pending) == 2 else None

    st = wait_for(settled, 30, "four VMs placed and two Pending")
    per_node = collections.Counter(s["node"] for s in st.values() if s.get("node"))
    assert per_node == {a: 2, b: 2}
    placed = {n: s.get("node") for n, s in st.items()}
    holds_for(lambda: {n: s.get("node") for n, s in _phases(mvms, 6).items()} == placed, 2,
              "the placement to stay as it is (no double booking, no flapping)")

    pending = sorted(n for n, s in st.items() if not s.get("node"))
    for name in pending:
        cond = mvms.condition(name, names.SCHEDULED)
        assert cond["status"] == "False" and cond["reason"] == names.UNSCHEDULABLE
        assert "too few free vCPUs (0 of 4 free)" in cond["message"] and a in cond["message"] and b in cond["message"]
        assert mvms.status(name)["reason"] == names.UNSCHEDULABLE
        warnings = mvms.wait_events(mvms.get(name)["metadata"]["uid"], names.UNSCHEDULABLE)
        assert warnings[0].type == "Warning" and "vCPU" in warnings[0].message

    # capacity appears when a placed VM is deleted (the worker confirms): one pending VM takes it
    victim = next(n for n, s in st.items() if s.get("node") == a)
    mvms.delete(victim)
    wait_for(lambda: mvms.get(victim) is None, 15, f"{victim} to be deleted")

    def one_more():
        now = _phases(mvms, 5)
        moved = [n for n in pending if now[n].get("node")]
        return moved if len(moved) == 1 else None

    moved = wait_for(one_more, 10, "one pending VM to be placed")
    assert mvms.status(moved[0])["node"] == a
    mvms.wait_phase(moved[0], "Running")
    still = next(n for n in pending if n != moved[0])
    holds_for(lambda: mvms.status(still)["phase"] == "Pending", 1, f"{still} to stay Pending")
    per_node = collections.Counter(s["node"] for s in _phases(mvms, 5).values() if s.get("node"))
    assert per_node == {a: 2, b: 2}


def test_pending_vm_is_placed_as_soon_as_a_fitting_node_registers(operators, worker, mvms):
    sel = {"test": mvms.label}
    worker.add_node(f"small-{mvms.label}", vcpus=1, memory_mib=1024, labels=sel)
    # no periodic retry within the test's time: only the node's watch event can place the VM
    operators(env={"MIKROM_RECONCILE_INTERVAL_SECONDS": "120"})
    mvms.create("big", vcpus=4, memoryMiB=2048, nodeSelector=sel)
    wait_for(lambda: mvms.status("big").get("reason") == names.UNSCHEDULABLE, 15, "big to be Unschedulable")
    message = mvms.status("big")["message"]
    assert "too few free vCPUs (1 of 1 free)" in message, message

    started = time.monotonic()
    worker.add_node(f"large-{mvms.label}", vcpus=8, memory_mib=8192, labels=sel)
    mvms.wait_phase("big", "Running", timeout=30)
    assert time.monotonic() - started < 30
    assert mvms.status("big")["node"] == f"large-{mvms.label}"


def test_least_allocated_node_is_chosen_and_cordoned_or_lost_nodes_are_not(operators, worker, mvms):
    sel = {"test": mvms.label}
    busy, idle, cordoned = (f"{p}-{mvms.label}" for p in ("busy", "idle", "cordoned"))
    for n in (busy, idle, cordoned):
        worker.add_node(n, vcpus=8, memory_mib=8192, labels=sel)
    mvms.patch_cluster_object(names.MICROVMNODES, cordoned, {"spec": {"schedulable": False}})
    operators()
    mvms.create("first", vcpus=4, memoryMiB=512, nodeSelector=sel, nodeName=busy)
    mvms.wait_phase("first", "Running")
    for i in range(3):
        mvms.create(f"next-{i}", vcpus=1, memoryMiB=256, nodeSelector=sel)
        mvms.wait_phase(f"next-{i}", "Running")
    nodes = [mvms.status(f"next-{i}")["node"] for i in range(3)]
    # idle (0 -> 1 -> 2 of 8) stays below busy (4 of 8) until it catches up; the cordoned node gets nothing
    assert nodes == [idle, idle, idle], nodes
    mvms.create("pinned", vcpus=1, memoryMiB=256, nodeName=cordoned)
    wait_for(lambda: mvms.status("pinned").get("reason") == names.UNSCHEDULABLE, 15, "pinned to be Unschedulable")
    assert f"{cordoned}: cordoned" in mvms.status("pinned")["message"]
