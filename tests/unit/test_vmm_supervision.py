"""The driver machinery every VMM shares, exercised with a shell script standing in for the VMM:
detached launch, adoption by pid file, readiness, exit and timeout reporting, the console cap,
and stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.waits import wait_for
from mikrom.worker.vmm import BootTimeout, VMMExited, VMMStartFailed, VMSpec, running_pid
from mikrom.worker.vmm.base import Driver, _proc_alive
from mikrom.worker.vmm.consolecap import RotatingLog


class ShellDriver(Driver):
    """Runs `script` with sh as the "VMM"; $0 carries the state dir, as a real VMM's sockets do."""

    name = "shell"

    def __init__(self, script: str, **kwargs):
        super().__init__(**kwargs)
        self.script = script
        self.polite = []

    def available(self):
        return True

    def command(self, spec):
        return ["sh", "-c", self.script, f"{Path(spec.state_dir).resolve()}/vmm"]

    def _graceful_stop(self, state_dir, timeout):
        self.polite.append(state_dir)
        pid = running_pid(state_dir)
        os.kill(pid, 15)


def make_spec(tmp_path, name="vm") -> VMSpec:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k")
    return VMSpec(uid=f"uid-{name}", name=name, vcpus=1, memory_mib=64, kernel=str(kernel),
                  state_dir=tmp_path / name)


def zombie_children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                out.append(int(entry.name))
    return out


def test_start_returns_at_once_with_a_detached_vmm_and_no_zombie_in_the_caller(tmp_path):
    driver = ShellDriver("echo booting; echo MIKROM-READY; while :; do sleep 0.1; done")
    spec = make_spec(tmp_path)
    t0 = time.monotonic()
    pid = driver.start(spec)
    assert time.monotonic() - t0 < 5
    try:
        assert running_pid(spec.state_dir) == pid
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        assert int(stat[1]) != os.getpid(), "the VMM must not be the caller's child"
        # Fields after the command name: state, ppid, pgrp, session, ...
        assert int(stat[3]) == os.getsid(pid)
        assert os.getsid(pid) not in (0, os.getsid(0)), "the VMM must run in a session of its own"
        assert driver.wait_ready(spec, timeout=10) < 5
        assert zombie_children() == []
        saved = json.loads((spec.state_dir / "vm.json").read_text())
        assert saved["driver"] == "shell" and saved["spec"]["uid"] == spec.uid
        assert driver.start(spec) == pid, "starting a running VM returns the running one"
    finally:
        driver.stop(spec.state_dir, timeout=5)
    assert running_pid(spec.state_dir) is None
    assert not _proc_alive(pid)
    assert driver.polite == [spec.state_dir.resolve()]
    assert zombie_children() == []


def test_stop_is_idempotent_and_kills_a_vmm_that_ignores_the_polite_request(tmp_path):
    driver = ShellDriver("trap '' TERM; echo MIKROM-READY; while :; do sleep 0.1; done")
    spec = make_spec(tmp_path)
    pid = driver.start(spec)
    driver.wait_ready(spec, timeout=10)
    t0 = time.monotonic()
    driver.stop(spec.state_dir, timeout=0.5)
    assert 0.5 <= time.monotonic() - t0 < 10
    assert not _proc_alive(pid)
    driver.stop(spec.state_dir, timeout=0.5)  # already stopped: fine
    driver.stop(tmp_path / "never-started", timeout=0.5)
    assert json.loads((spec.state_dir / "exit.json").read_text())["returncode"] == -9


def test_running_pid_ignores_a_pid_file_naming_an_unrelated_process(tmp_path):
    state = tmp_path / "vm"
    state.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        (state / "pid").write_text(f"{other.pid}\n")
        assert running_pid(state) is None
        (state / "pid").write_text("not a pid")
        assert running_pid(state) is None
        (state / "pid").write_text("999999999")
        assert running_pid(state) is None
    finally:
        other.kill()
        other.wait(timeout=5)


def test_a_vmm_that_dies_before_ready_raises_vmm_exited_with_the_console_tail(tmp_path):
    driver = ShellDriver("echo 'Kernel panic - not syncing: no init'; exit 3")
    spec = make_spec(tmp_path)
    driver.start(spec)
    with pytest.raises(VMMExited, match="Kernel panic") as err:
        driver.wait_ready(spec, timeout=10)
    assert "status 3" in str(err.value)
    assert err.value.reason == "VMMExited"


def test_a_silent_guest_raises_boot_timeout_and_keeps_running(tmp_path):
    driver = ShellDriver("echo still booting; while :; do sleep 0.1; done")
    spec = make_spec(tmp_path)
    pid = driver.start(spec)
    try:
        with pytest.raises(BootTimeout, match="still booting") as err:
            driver.wait_ready(spec, timeout=0.5)
        assert err.value.reason == "BootTimeout"
        assert running_pid(spec.state_dir) == pid
    finally:
        driver.stop(spec.state_dir, timeout=2)


def test_a_supervisor_whose_starter_died_mid_launch_goes_on_draining_the_console_and_reaping_the_vmm(tmp_path):
    """A worker killed between the VMM's start and the supervisor's report leaves a report nobody
    reads: the VMM runs, so its supervisor must stay (console, ready marker, fence, exit status)."""
    from mikrom.worker.vmm import consolecap

    spec = make_spec(tmp_path)
    state = Path(spec.state_dir)
    state.mkdir()
    vmm_argv = ShellDriver("echo booting; echo MIKROM-READY; while :; do sleep 0.1; done").command(spec)
    args = consolecap._launch_args(["--state-dir", str(state), "--max-bytes", "65536",
                                    "--ready-marker", "MIKROM-READY", "--", *vmm_argv])
    report_r, report_w = os.pipe()
    os.close(report_r)  # the starter is gone: every write of the report is a broken pipe
    supervisor = os.fork()
    if supervisor == 0:
        code = 1
        try:
            code = consolecap._supervise_detached(args, report_w)
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        wait_for(lambda: (state / "ready").exists() or (state / "exit.json").exists(), 10,
                 "the supervisor to see the ready marker")
        assert not (state / "exit.json").exists(), (state / "exit.json").read_text()
        assert "MIKROM-READY" in (state / "console.log").read_text()
        assert os.waitpid(supervisor, os.WNOHANG) == (0, 0), "the supervisor left its VMM"
        vmm_pid = running_pid(state)
        assert vmm_pid is not None
        os.kill(vmm_pid, signal.SIGTERM)
        _, status = os.waitpid(supervisor, 0)
        supervisor = None
        assert os.waitstatus_to_exitcode(status) == 0
        assert json.loads((state / "exit.json").read_text())["returncode"] == -signal.SIGTERM
    finally:
        if supervisor is not None:
            pid = running_pid(state)
            if pid:
                os.kill(pid, signal.SIGKILL)
            os.kill(supervisor, signal.SIGKILL)
            os.waitpid(supervisor, 0)


def test_a_vmm_whose_supervisor_was_killed_is_observed_as_unsupervised_and_one_mid_launch_is_not(tmp_path):
    from mikrom.worker.state import LocalVM

    driver = ShellDriver("echo MIKROM-READY; while :; do sleep 0.1; done")
    spec = make_spec(tmp_path)
    pid = driver.start(spec)
    try:
        driver.wait_ready(spec, timeout=10)
        local = LocalVM(tmp_path, spec.name)
        run = json.loads((spec.state_dir / "run.json").read_text())
        assert run["pid"] == pid
        assert local.observe().supervised, "a VMM with its supervisor"

        os.kill(run["supervisor_pid"], signal.SIGKILL)
        wait_for(lambda: not _proc_alive(run["supervisor_pid"]), 10, "the supervisor to go")
        obs = local.observe()
        assert obs.pid == pid, "the VMM itself runs on"
        assert not obs.supervised

        # a launch between its pid file and its run.json: the run.json is the last run's
        (spec.state_dir / "run.json").write_text(json.dumps({**run, "pid": pid + 1}))
        assert local.observe().supervised
    finally:
        driver.stop(spec.state_dir, timeout=2)
    assert not _proc_alive(pid)


def test_a_missing_binary_or_kernel_fails_the_start_cleanly(tmp_path):
    spec = make_spec(tmp_path)

    class Missing(ShellDriver):
        def command(self, spec):
            return ["/nonexistent/vmm", f"{spec.state_dir}/x"]

    with pytest.raises(VMMStartFailed, match="cannot execute"):
        Missing("").start(spec)
    spec.kernel = str(tmp_path / "no-kernel")
    with pytest.raises(VMMStartFailed, match="kernel"):
        ShellDriver("true").start(spec)


def test_the_ready_marker_is_found_even_when_split_across_writes(tmp_path):
    driver = ShellDriver("printf 'boot\\nMIKROM-'; sleep 0.3; printf 'READY\\n'; while :; do sleep 0.1; done")
    spec = make_spec(tmp_path)
    driver.start(spec)
    try:
        assert 0.2 < driver.wait_ready(spec, timeout=10) < 5
    finally:
        driver.stop(spec.state_dir, timeout=2)


def test_console_log_stays_within_the_cap_and_keeps_the_latest_output(tmp_path):
    cap = 64 * 1024
    script = ("i=0; while [ $i -lt 5000 ]; do echo \"console line $i padding padding padding\"; i=$((i+1)); done; "
              "echo MIKROM-READY; echo last line")
    driver = ShellDriver(script, console_max_bytes=cap)
    spec = make_spec(tmp_path)
    driver.start(spec)
    wait_for(lambda: (spec.state_dir / "exit.json").exists(), 20, "the script to exit", interval=0.05)
    log = spec.state_dir / "console.log"
    rotated = spec.state_dir / "console.log.1"
    assert log.stat().st_size + rotated.stat().st_size <= cap
    assert (rotated.read_text() + log.read_text()).endswith("MIKROM-READY\nlast line\n")
    assert (spec.state_dir / "ready").exists()


def test_a_restart_moves_the_previous_boot_log_aside(tmp_path):
    driver = ShellDriver("echo first boot; echo MIKROM-READY")
    spec = make_spec(tmp_path)
    driver.start(spec)
    driver.wait_ready(spec, timeout=10)
    driver.stop(spec.state_dir, timeout=2)
    driver.script = "echo second boot; echo MIKROM-READY; while :; do sleep 0.1; done"
    driver.start(spec)
    try:
        driver.wait_ready(spec, timeout=10)
        assert (spec.state_dir / "console.log").read_text() == "second boot\nMIKROM-READY\n"
        assert (spec.state_dir / "console.log.1").read_text() == "first boot\nMIKROM-READY\n"
    finally:
        driver.stop(spec.state_dir, timeout=2)


def test_rotating_log_splits_a_large_write_at_the_limit(tmp_path):
    path = tmp_path / "c.log"
    log = RotatingLog(str(path), 100)
    log.write(b"a" * 120)
    log.close()
    assert path.read_bytes() == b"a" * 20
    assert (tmp_path / "c.log.1").read_bytes() == b"a" * 50


def test_consolecap_refuses_to_run_without_a_command():
    from mikrom.worker.vmm import consolecap

    res = subprocess.run([sys.executable, "-I", consolecap.__file__, "--state-dir", "/tmp"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "no VMM command" in res.stderr
