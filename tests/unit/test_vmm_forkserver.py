"""Supervisors forked by the fork server (worker/vmm/forkserver.py): what they are, and what
happens when the server is not there. The "VMM" is sh, as in test_vmm_supervision.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from harness.waits import wait_for
from mikrom.worker.vmm import base
from mikrom.worker.vmm.base import Driver, VMSpec, running_pid

pytestmark = pytest.mark.unit


class ShellDriver(Driver):
    name = "shell"

    def available(self):
        return True

    def command(self, spec):
        # `read` waits on the serial input without a child process holding the console
        return ["sh", "-c", "echo MIKROM-READY; read x", f"{Path(spec.state_dir).resolve()}/vmm"]


def _spec(tmp_path: Path, name: str) -> VMSpec:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k")
    return VMSpec(uid=f"uid-{name}", name=name, vcpus=1, memory_mib=64, kernel=str(kernel),
                  state_dir=tmp_path / name)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _boot(tmp_path: Path, name: str) -> tuple[Driver, VMSpec, int]:
    driver = ShellDriver()
    spec = _spec(tmp_path, name)
    driver.start(spec)
    driver.wait_ready(spec, timeout=20)
    supervisor = json.loads((spec.state_dir / "run.json").read_text())["supervisor_pid"]
    return driver, spec, supervisor


def test_a_supervisor_is_forked_by_the_fork_server_recognised_as_its_vms_and_waited_for_on_stop(tmp_path):
    driver, spec, supervisor = _boot(tmp_path, "forked")
    state = spec.state_dir.resolve()
    assert "forkserver.py" in _cmdline(supervisor)
    assert base.is_supervisor(supervisor, state)
    assert not base.is_supervisor(supervisor, state.parent), "another VM's directory is not its own"
    assert not base.is_supervisor(os.getpid(), state)
    ppid = int(Path(f"/proc/{supervisor}/stat").read_text().rpartition(")")[2].split()[1])
    assert ppid != os.getpid(), "detached: not a child of the process that started the VM"
    driver.stop(spec.state_dir, timeout=0)
    # the stop waited for the supervisor: the exit status is recorded and it is gone
    assert json.loads((spec.state_dir / "exit.json").read_text())["returncode"] is not None
    assert not base._proc_alive(supervisor)


def test_without_the_fork_server_a_launcher_process_of_its_own_starts_the_supervisor(tmp_path, monkeypatch):
    class Unavailable:
        def launch(self, *args, **kwargs):
            return None

    monkeypatch.setattr(base, "fork_server", lambda: Unavailable())
    driver, spec, supervisor = _boot(tmp_path, "direct")
    try:
        assert "consolecap.py" in _cmdline(supervisor)
        assert base.is_supervisor(supervisor, spec.state_dir.resolve())
    finally:
        driver.stop(spec.state_dir, timeout=0)
    assert running_pid(spec.state_dir) is None


def test_a_fork_server_that_died_is_started_again(tmp_path):
    base.prestart_fork_server()
    server = base.fork_server()._proc
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    driver, spec, supervisor = _boot(tmp_path, "again")
    try:
        assert "forkserver.py" in _cmdline(supervisor)
        assert base.fork_server()._proc.pid != server.pid
    finally:
        driver.stop(spec.state_dir, timeout=0)


def _group(tmp_path: Path) -> dict:
    """A stand-in host cgroup: directories whose cgroup.procs are plain files, so a join is a
    write of the pid that can be read back."""
    root = tmp_path / "cgroup"
    for name in ("cpu,cpuacct", "memory"):
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    return {"root": str(root), "parent": "mikrom", "memory_overhead_mib": 64}


def _fake_kernel_groups(driver: Driver, spec: VMSpec) -> list[Path]:
    from mikrom.worker import hostcgroup

    placement = hostcgroup.create(driver.host_cgroup, spec.uid, spec.vcpus, spec.memory_mib)
    for procs in placement.procs:
        procs.write_text("")  # what the kernel puts in every new group
    return placement.procs


def _staged(tmp_path: Path, name: str):
    """A VM's launcher staged in its (fake) host cgroup; the driver, spec, groups, handle and the
    launcher's pid once it joined."""
    driver = ShellDriver(host_cgroup=_group(tmp_path))
    spec = _spec(tmp_path, name)
    spec.state_dir.mkdir()
    procs = _fake_kernel_groups(driver, spec)
    staged = driver.stage(spec.state_dir, spec.uid, spec.vcpus, spec.memory_mib)
    assert staged is not None
    launcher = int(wait_for(lambda: procs[0].read_text().strip(), timeout=10, what="the launcher's join"))
    return driver, spec, procs, staged, launcher


def test_a_staged_launcher_joins_the_vms_cgroup_before_the_launch_and_starts_the_vmm_only_when_told(tmp_path):
    driver, spec, procs, staged, launcher = _staged(tmp_path, "staged")
    assert [p.read_text().strip() for p in procs] == [str(launcher)] * 2
    assert "forkserver.py" in _cmdline(launcher)
    assert not (spec.state_dir / "run.json").exists() and running_pid(spec.state_dir) is None
    pid = driver.start(spec, staged=staged)
    try:
        driver.wait_ready(spec, timeout=20)
        run = json.loads((spec.state_dir / "run.json").read_text())
        assert run["pid"] == pid
        # the staged launcher became the supervisor (no fork of a launcher): in the group from the
        # start, it was not told to join it again (nothing else wrote a pid), and it is detached
        assert run["supervisor_pid"] == launcher
        assert [p.read_text().strip() for p in procs] == [str(launcher)] * 2
        assert base.is_supervisor(launcher, spec.state_dir.resolve())
        ppid = int(Path(f"/proc/{launcher}/stat").read_text().rpartition(")")[2].split()[1])
        assert ppid == base.fork_server()._proc.pid
    finally:
        driver.stop(spec.state_dir, timeout=0)


def test_a_staged_launcher_given_up_exits_having_started_nothing(tmp_path):
    _driver, spec, _procs, staged, launcher = _staged(tmp_path, "given-up")
    staged.close()
    assert not base._proc_alive(launcher), "close waits for the launcher to exit"
    assert not (spec.state_dir / "run.json").exists() and not (spec.state_dir / "pid").exists()
    assert not (spec.state_dir / "console.log").exists()


@pytest.mark.parametrize("fds,request_body,refusal", [
    (1, b'{"argv": "not a list", "cwd": "/"}', "malformed launch request"),
    (2, b'{"stage": {"cgroup_procs": [1]}, "cwd": "/"}', "malformed stage request"),
    (1, b"not json", "malformed launch request"),
])
def test_a_malformed_request_is_answered_on_its_reply_channel_and_forks_nothing(fds, request_body, refusal):
    import socket
    import threading

    from mikrom.worker.vmm import forkserver

    forked = []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=forkserver.serve, args=(theirs, forked.append, forked.append, forked.append))
    server.start()
    channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(fds)]
    try:
        socket.send_fds(ours, [request_body], [far.fileno() for _near, far in channels])
        for _near, far in channels:
            far.close()
        reply = channels[0][0]
        reply.settimeout(10)
        assert json.loads(reply.recv(65536)) == {"error": refusal}
        assert reply.recv(65536) == b""  # the server kept no copy of the channel
    finally:
        ours.close()  # the worker's end: the server returns
        server.join(10)
        for near, _far in channels:
            near.close()
    assert not server.is_alive() and forked == []
