"""What the node reads back from a VM's state directory, without any memory of its own."""

import json
import os
import subprocess
import sys

from harness.waits import wait_for

from mikrom.worker.state import LocalVM, local_uids, process_age_seconds, vmm_processes


def _vm(tmp_path, **files):
    local = LocalVM(tmp_path / "vms", "u-1")
    local.dir.mkdir(parents=True)
    for name, content in files.items():
        (local.dir / name.replace("_", ".")).write_text(content if isinstance(content, str) else json.dumps(content))
    return local


def test_a_missing_directory_is_observed_as_nothing(tmp_path):
    obs = LocalVM(tmp_path / "vms", "u-1").observe()
    assert not obs.exists and not obs.running and not obs.exited


def test_a_clean_exit_with_a_ready_marker_is_a_clean_exit(tmp_path):
    run = {"pid": 999999, "started_at": 100.0, "started_monotonic": 10.0}
    local = _vm(tmp_path, vm_json={"driver": "qemu", "spec": {"uid": "u-1"}}, run_json=run,
                ready={"monotonic": 12.5, "at": 102.5}, exit_json={"returncode": 0, "at": 200.0},
                console_log="booting\nMIKROM-READY\nreboot: Power down\n")
    obs = local.observe()
    assert (obs.exited, obs.exit_clean, obs.ready, obs.boot_seconds, obs.exit_at) == (True, True, True, 2.5, 200.0)


def test_a_kernel_panic_is_not_a_clean_exit_even_with_status_zero(tmp_path):
    local = _vm(tmp_path, vm_json={"driver": "qemu", "spec": {"uid": "u-1"}}, run_json={"started_at": 1.0},
                exit_json={"returncode": 0, "at": 2.0}, console_log="Kernel panic - not syncing: Attempted to kill init!\n")
    assert not local.observe().exit_clean


def test_a_pid_file_naming_an_unrelated_process_is_not_trusted(tmp_path):
    local = _vm(tmp_path, vm_json={"driver": "qemu", "spec": {"uid": "u-1"}}, pid=f"{os.getpid()}\n")
    assert local.observe().pid is None


def test_meta_updates_merge_and_survive(tmp_path):
    local = LocalVM(tmp_path / "vms", "u-1")
    local.update_meta(ip="10.0.0.2", crashes=1)
    local.update_meta(crashes=2)
    assert local.read_meta() == {"ip": "10.0.0.2", "crashes": 2}
    assert local_uids(tmp_path / "vms") == ["u-1"]


def test_processes_naming_a_state_directory_are_found_by_uid(tmp_path):
    vms = tmp_path / "vms"
    (vms / "u-2").mkdir(parents=True)
    marker = str((vms / "u-2").resolve()) + "/qmp.sock"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    try:
        found = wait_for(lambda: vmm_processes(vms).get("u-2"), 5, "the process naming u-2", interval=0.05)
        assert found == [proc.pid]
        assert 0 <= process_age_seconds(proc.pid) < 30
    finally:
        proc.kill()
        proc.wait(10)
