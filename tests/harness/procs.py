"""Start and stop server processes for the tests, with logs on disk and stop by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .waits import holds_for, wait_for  # noqa: F401 - the tests' long-standing import path


STARTED: list["Proc"] = []
"""Every long-lived server the test session started: for teardown, the loopback check and the log
tails attached to failed tests."""


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: "Proc | None" = None) -> None:
    """Until something accepts connections on 127.0.0.1:`port`; give up at once if `proc` exits."""
    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def exited() -> str | None:
        if proc is not None and proc.popen.poll() is not None:
            return f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
        return None

    wait_for(accepts, timeout, f"a listener on 127.0.0.1:{port}" + (f" ({proc.name})" if proc else ""),
             interval=0.1, abort=exited)


@dataclass
class Proc:
    """A child process started by the tests: its own session, its output in `log`."""

    name: str
    popen: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not gone within `timeout`."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        else:
            # the leader is gone; children it left in its group must go too
            _signal_group(self.popen.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the process itself (not its group): a crash, as `kill -9` does it."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start(name: str, argv: list[str], logdir: Path, env: dict | None = None, cwd: str | None = None) -> Proc:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    fh = open(log, "ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        fh.close()
    return Proc(name=name, popen=popen, log=log)
