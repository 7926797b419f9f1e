"""Run a short host command (`ip`, `nft`, `cp`) and collect its output, cheaply and without
blocking the gevent hub.

gevent's `subprocess` forks the worker, a large process, in Python and runs Python code in the
child before the exec: tens of milliseconds per call here, during which the whole worker stands
still, and a create makes several such calls. `os.posix_spawn` starts the command the way glibc
does it (a vfork-like clone, no Python in the child): a few milliseconds; gevent's version of it
also watches the child, so its exit status is collected by the event loop and handed to
`waitpid`. The parent looks at the pipes with the real `select` and a zero timeout between short
cooperative sleeps (`time.sleep`, gevent's under the worker), not with gevent's `select`: the
event loop keeps a descriptor's registration for a moment after it is closed, and a new pipe
given the same number can then wait for ever. The command is killed at its timeout. Only descriptors 0-2 reach the command (every
other one is closed, as subprocess's close_fds does), and SIGPIPE is back at its default there.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time

READ_SIZE = 64 * 1024
REAP_SLEEP = 0.001
POLL_MIN, POLL_MAX = 0.0005, 0.008
"""Seconds between looks at the command's pipes while it is silent (doubling up to the max)."""


def _original_select():
    """The real select.select, also under gevent's monkey-patching."""
    try:
        from gevent import monkey
    except ImportError:
        return select.select
    return monkey.get_original("select", "select") if monkey.is_module_patched("select") else select.select


_peek = _original_select()
_sigchld_for: int | None = None


def _watch_children() -> None:
    """Under gevent, make sure its SIGCHLD handler is installed: its posix_spawn watches the child
    and the event loop collects the exit status for waitpid, but only once that handler is (a
    fork through gevent installs it, a spawn does not)."""
    global _sigchld_for
    if _sigchld_for == os.getpid():
        return
    try:
        from gevent import monkey
    except ImportError:
        return
    if monkey.is_module_patched("os"):
        import gevent

        gevent.get_hub().loop.install_sigchld()
    _sigchld_for = os.getpid()


def run(cmd: list[str], timeout: float, input: str | None = None, stdin_fd: int | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` with `input` (text) or descriptor `stdin_fd` as its stdin (else /dev/null); its
    exit status and text output. subprocess.TimeoutExpired after `timeout` seconds (the command
    is killed), FileNotFoundError when it does not exist. An exit status nobody could collect
    (someone else reaped the command) is -1."""
    _watch_children()
    deadline = time.monotonic() + timeout
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r = in_w = None
    actions = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    if input is not None:
        in_r, in_w = os.pipe()
        actions.append((os.POSIX_SPAWN_DUP2, in_r, 0))
    elif stdin_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stdin_fd, 0))
    else:
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
    try:
        for attempt in (1, 2):
            try:
                pid = os.posix_spawnp(cmd[0], cmd, os.environ if env is None else env,
                                      file_actions=actions + _close_inheritable(), setsigdef=(signal.SIGPIPE,))
                break
            except OSError as exc:  # a descriptor listed went away meanwhile: list them again
                if exc.errno != errno.EBADF or attempt == 2:
                    raise
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd is not None:
                os.close(fd)
        raise
    os.close(out_w)
    os.close(err_w)
    if in_r is not None:
        os.close(in_r)
    pending = (input or "").encode()
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    readers = [out_r, err_r]
    writers = [in_w] if in_w is not None else []
    if not pending and in_w is not None:
        os.close(in_w)
        writers = []
    for fd in readers + writers:
        os.set_blocking(fd, False)
    try:
        idle = POLL_MIN
        while readers or writers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout)
            # a look without waiting (the real select, never the event loop's: see the docstring),
            # then a cooperative sleep that grows while nothing happens
            readable, writable, _ = _peek(readers, writers, [], 0)
            if not readable and not writable:
                time.sleep(min(idle, remaining))
                idle = min(idle * 2, POLL_MAX)
                continue
            idle = POLL_MIN
            for fd in writable:
                try:
                    pending = pending[os.write(fd, pending[:READ_SIZE]):]
                except BrokenPipeError:
                    pending = b""
                if not pending:
                    os.close(fd)
                    writers.remove(fd)
            for fd in readable:
                data = os.read(fd, READ_SIZE)
                if data:
                    chunks[fd].append(data)
                else:
                    readers.remove(fd)
        returncode = _reap(pid, deadline, cmd, timeout)
    except BaseException:
        _kill(pid)
        raise
    finally:
        for fd in (out_r, err_r, *writers):
            os.close(fd)
    return subprocess.CompletedProcess(cmd, returncode, b"".join(chunks[out_r]).decode(errors="replace"),
                                       b"".join(chunks[err_r]).decode(errors="replace"))


def _close_inheritable() -> list[tuple]:
    """Close actions for the caller's inheritable descriptors above 2 (Python opens none, but a
    library may), so that the command gets only its stdin, stdout and stderr, as subprocess's
    close_fds would."""
    actions = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                pass  # the listing's own descriptor, already closed
    return actions


def _reap(pid: int, deadline: float, cmd: list[str], timeout: float) -> int:
    """The exit status of `pid`, which closed its output (so it is exiting)."""
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(cmd, timeout)
        time.sleep(REAP_SLEEP)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.ECHILD):
            raise
