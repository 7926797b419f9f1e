"""Node-level pure pieces: capacity, self-fencing, the fleet summary, task arguments."""

import os

import pytest
from pydantic import ValidationError

from mikrom import names
from mikrom.settings import Settings
from mikrom.worker.maintenance import summarize
from mikrom.worker.node import host_capacity, should_fence
from mikrom.worker.tasks import _ref, lock_wait_seconds


def test_capacity_comes_from_settings_when_given():
    assert host_capacity(8, 4096) == {"vcpus": 8, "memoryMiB": 4096}


def test_capacity_defaults_to_the_cpus_this_process_may_use_and_ninety_percent_of_memory():
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert host_capacity() == {"vcpus": len(os.sched_getaffinity(0)), "memoryMiB": int(total_kib / 1024 * 0.9)}


def test_a_worker_fences_itself_only_after_the_configured_silence():
    assert not should_fence(last_ok=100.0, now=159.0, fence_after=60)
    assert should_fence(last_ok=100.0, now=161.0, fence_after=60)
    assert not should_fence(last_ok=0.0, now=1e9, fence_after=0)  # 0 disables it


def _vm(name, phase, node=None, reason=None, vcpus=1, mem=128):
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"vcpus": vcpus, "memoryMiB": mem},
            "status": {"phase": phase, "node": node, "reason": reason, "finishedAt": "2024-01-01T00:00:00Z"}}


def test_the_fleet_summary_counts_phases_per_node_and_lists_failures():
    vms = [_vm("a", "Running", "n1", vcpus=2), _vm("b", "Running", "n1"), _vm("c", "Failed", "n2", "BootTimeout"),
           _vm("d", "Pending")]
    nodes = [{"metadata": {"name": "n1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]
    report = summarize(vms, nodes)
    assert report["phases"] == {"Running": 2, "Failed": 1, "Pending": 1}
    assert report["byNode"]["n1"] == {"phases": {"Running": 2}, "vcpus": 3, "memoryMiB": 256}
    assert report["byNode"]["(unplaced)"]["phases"] == {"Pending": 1}
    assert report["failures"] == [{"vm": "ns/c", "reason": "BootTimeout", "message": "", "at": "2024-01-01T00:00:00Z"}]
    assert report["nodes"]["n1"]["ready"] is True


def test_vm_tasks_take_a_reference_and_nothing_else():
    ref = _ref(names.Intent.CREATE, (), {"namespace": "a", "name": "b", "uid": "c"})
    assert ref.intent == "create"
    with pytest.raises(ValueError, match="keyword arguments only"):
        _ref(names.Intent.CREATE, (1, 2, 2048), {})  # the old guide's positional form
    with pytest.raises(ValidationError) as forged:
        _ref(names.Intent.CREATE, (), {"namespace": "a", "name": "b", "uid": "c", "kernel_path": "/boot/evil"})
    assert [(e["loc"], e["type"]) for e in forged.value.errors()] == [(("kernel_path",), "extra_forbidden")]
    assert "kernel_path" in str(forged.value)


def test_a_task_waits_for_the_vm_lock_less_than_its_hard_time_limit():
    s = Settings()
    assert s.boot_timeout_seconds < lock_wait_seconds(s) < s.task_time_limit
    short = s.replace(task_time_limit=60)
    assert lock_wait_seconds(short) <= 36
