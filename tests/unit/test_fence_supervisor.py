"""The supervisor's half of the fence, with a shell script standing in for the VMM: a VMM runs
only while its node's lease (worker/lease.py) is renewed, is stopped by its supervisor alone once
the lease runs out (no worker involved), leaves a fence record and journal entries, and a normal
stop is never taken for a fence."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harness.overlap import OverlapChecker, read_journal
from harness.waits import holds_for, wait_for

from mikrom.worker import lease
from mikrom.worker.state import LocalVM
from mikrom.worker.vmm import VMMStartFailed, VMSpec, running_pid
from mikrom.worker.vmm.base import Driver, _proc_alive

BUSY = "echo MIKROM-READY; while :; do sleep 0.1; done"
STUBBORN = "trap '' TERM; echo MIKROM-READY; while :; do sleep 0.1; done"


class ShellDriver(Driver):
    """Runs `script` with sh as the "VMM"; $0 carries the state dir, as a real VMM's sockets do."""

    name = "shell"

    def __init__(self, script: str, **kwargs):
        super().__init__(**kwargs)
        self.script = script

    def available(self):
        return True

    def command(self, spec):
        return ["sh", "-c", self.script, f"{Path(spec.state_dir).resolve()}/vmm"]

    def _graceful_stop(self, state_dir, timeout):
        os.kill(running_pid(state_dir), 15)


@pytest.fixture
def vms(tmp_path):
    """The node's vms dir; every VMM started under it is killed at the end."""
    d = tmp_path / "vms"
    d.mkdir()
    yield d
    for child in d.iterdir():
        pid = running_pid(child) if child.is_dir() else None
        if pid:
            os.kill(pid, 9)


def spec_in(vms: Path, uid: str = "uid-a") -> VMSpec:
    kernel = vms.parent / "kernel"
    kernel.write_bytes(b"k")
    return VMSpec(uid=uid, name=uid, vcpus=1, memory_mib=64, kernel=str(kernel), state_dir=vms / uid)


def lease_for(vms: Path, seconds: float, kill_after: float = 1.0) -> None:
    lease.renew(vms, lease.boottime() + seconds, "node-a", "ApiReachable", ttl=seconds, kill_after=kill_after)


def events(vms: Path, uid: str) -> list[str]:
    return [e["event"] for e in read_journal(vms) if e["uid"] == uid]


def test_a_supervisor_stops_its_vmm_by_itself_when_the_lease_runs_out_and_records_why(vms):
    lease_for(vms, 2.0)
    spec = spec_in(vms)
    pid = ShellDriver(BUSY).start(spec)
    t0 = time.monotonic()
    wait_for(lambda: not _proc_alive(pid), 10, "the supervisor to stop its VMM")
    assert 1.0 <= time.monotonic() - t0 <= 5.0
    record = wait_for(lambda: (spec.state_dir / "exit.json").exists() and
                      json.loads((spec.state_dir / "fence.json").read_text()), 5, "the fence record")
    assert record["reason"] == "LeaseExpired" and record["pid"] == pid
    assert "expired" in record["message"]
    assert json.loads((spec.state_dir / "exit.json").read_text())["fenced"] is True
    assert events(vms, spec.uid) == ["start", "fence", "stop"]
    [run] = [r for r in _runs(vms) if r.uid == spec.uid]
    assert run.fenced and run.stop is not None


def _runs(vms: Path):
    checker = OverlapChecker()
    checker.vms_dirs.append(vms)
    return checker.runs()


def test_a_vmm_that_ignores_the_polite_stop_is_killed_after_the_lease_s_kill_time(vms):
    lease_for(vms, 1.0, kill_after=2.0)
    spec = spec_in(vms)
    pid = ShellDriver(STUBBORN).start(spec)
    wait_for(lambda: (spec.state_dir / "fence.json").exists(), 5, "the fence")
    fenced_at = time.monotonic()
    holds_for(lambda: _proc_alive(pid), 1.2, "the VMM to get its kill time after SIGTERM")
    wait_for(lambda: not _proc_alive(pid), 5, "the VMM to be killed")
    assert time.monotonic() - fenced_at < 4.0


def test_a_lease_renewed_in_time_keeps_the_vmm_running_past_its_first_deadline(vms):
    lease_for(vms, 2.0)
    spec = spec_in(vms)
    pid = ShellDriver(BUSY).start(spec)

    def renewed_and_running():
        lease_for(vms, 2.0)
        return _proc_alive(pid)

    holds_for(renewed_and_running, 4.0, "the VMM to keep running under a renewed lease", interval=0.5)
    assert not (spec.state_dir / "fence.json").exists()


def test_a_supervisor_refuses_to_start_a_vmm_under_an_expired_lease(vms):
    lease.renew(vms, lease.boottime() - 1, "node-a", "ApiReachable", ttl=5, kill_after=1)
    spec = spec_in(vms)
    with pytest.raises(VMMStartFailed, match="fence lease is not valid"):
        ShellDriver(BUSY).start(spec)
    assert events(vms, spec.uid) == []


def test_a_start_decided_under_a_lease_that_ran_out_is_refused_although_the_lease_was_renewed_since(vms):
    # a worker frozen between its decision (lease taken, placement confirmed) and the launch: on
    # waking it renews the lease, but the decision may predate a reschedule elsewhere
    decided_under = lease.boottime() - 0.5
    lease_for(vms, 30)
    spec = spec_in(vms)
    spec.start_before = decided_under
    with pytest.raises(VMMStartFailed, match="decided under a fence lease that ran out"):
        ShellDriver(BUSY).start(spec)
    assert events(vms, spec.uid) == []
    assert running_pid(spec.state_dir) is None


def test_a_start_launched_within_the_lease_it_was_decided_under_runs(vms):
    lease_for(vms, 30)
    spec = spec_in(vms)
    spec.start_before = lease.deadline(vms)
    pid = ShellDriver(BUSY).start(spec)
    assert pid and running_pid(spec.state_dir) == pid


def test_removing_the_lease_file_after_it_was_seen_fences(vms):
    lease_for(vms, 60.0)
    spec = spec_in(vms)
    pid = ShellDriver(BUSY).start(spec)
    lease.lease_path(vms).unlink()
    wait_for(lambda: not _proc_alive(pid), 6, "the supervisor to fence a VMM whose lease vanished")
    assert "removed" in json.loads((spec.state_dir / "fence.json").read_text())["message"]


def test_a_normal_stop_is_not_taken_for_a_fence_and_a_new_start_clears_an_old_fence_record(vms):
    lease_for(vms, 60.0)
    spec = spec_in(vms)
    driver = ShellDriver(BUSY)
    driver.start(spec)
    driver.stop(spec.state_dir, timeout=5)
    assert not (spec.state_dir / "fence.json").exists()
    assert json.loads((spec.state_dir / "exit.json").read_text())["fenced"] is False
    assert [r.fenced for r in _runs(vms)] == [False]

    (spec.state_dir / "fence.json").write_text(json.dumps({"reason": "LeaseExpired", "at": 1.0}))
    driver.start(spec)
    assert not (spec.state_dir / "fence.json").exists()
    assert events(vms, spec.uid) == ["start", "stop", "start"]


def test_a_fence_record_becomes_the_worker_s_own_stop_exactly_once(vms):
    local = LocalVM(vms, "uid-b")
    local.update_meta(desiredStop=False, crashes=0)
    (local.dir / "fence.json").write_text(json.dumps({"reason": "LeaseExpired", "at": 123.0, "message": "m"}))
    assert lease.absorb_fences(vms) == ["uid-b"]
    meta = local.read_meta()
    assert (meta["desiredStop"], meta["fenced"], meta["fenceSeen"]) == (True, True, 123.0)
    local.update_meta(desiredStop=False, fenced=False)  # the VM started again
    assert lease.absorb_fences(vms) == []
    assert local.read_meta()["desiredStop"] is False

