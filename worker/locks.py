"""Per-VM locks on the node: two operations on one VM never overlap.

A lock has two layers:
- an in-process lock per key, shared by the worker's greenlets (under gevent's monkey-patching a
  `threading.Lock` is a gevent lock, so waiting for it yields to the hub);
- an exclusive `flock` on `<state_dir>/locks/<key>.lock`, which also excludes another worker process
  on the same node (a second worker started by mistake, or the `mikrom` CLI). The kernel releases it
  when its holder dies, so a worker killed with SIGKILL leaves no stale lock behind.

`flock` is taken with LOCK_NB and polled with a short sleep: a blocking flock would block the
whole gevent hub, not just the waiting greenlet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from pathlib import Path

POLL = 0.05
_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class LockTimeout(Exception):
    """The lock stayed held by someone else for longer than we wait; retry later."""

    reason = "LockTimeout"


class Held:
    """A held lock; `remove = True` deletes its file on release."""

    remove = False


class NodeLocks:
    """Named locks for one node, kept under `lock_dir`."""

    def __init__(self, lock_dir: str | os.PathLike):
        self.lock_dir = Path(lock_dir)
        self._guard = threading.Lock()
        self._local: dict[str, list] = {}  # key -> [lock, users]

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"invalid lock key {key!r}")
        return self.lock_dir / f"{key}.lock"

    @contextlib.contextmanager
    def hold(self, key: str, timeout: float):
        """Hold `key` exclusively for the `with` block; raise LockTimeout after `timeout` seconds.

        The block receives a `Held`; setting its `remove` deletes the lock file on release (when
        the VM itself is gone): a waiter that opened the old file notices the inode changed and
        takes the new one.
        """
        deadline = time.monotonic() + timeout
        local = self._enter(key)
        try:
            if not local.acquire(timeout=max(0.0, timeout)):
                raise LockTimeout(f"lock {key} is held by another operation in this worker")
            try:
                fd = self._flock(key, deadline)
                held = Held()
                try:
                    yield held
                finally:
                    if held.remove:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path(key))
                    os.close(fd)  # closing the last descriptor releases the flock
            finally:
                local.release()
        finally:
            self._leave(key)

    def held_here(self, key: str) -> bool:
        """Whether a greenlet of this process holds or waits for `key` (for health checks)."""
        with self._guard:
            return key in self._local

    def _enter(self, key: str) -> threading.Lock:
        with self._guard:
            entry = self._local.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
            return entry[0]

    def _leave(self, key: str) -> None:
        with self._guard:
            entry = self._local.get(key)
            if entry:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._local[key]

    def _flock(self, key: str, deadline: float) -> int:
        path = self.path(key)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise LockTimeout(f"lock {path} is held by another process") from None
                        time.sleep(POLL)
                # The holder before us may have removed the file: then we locked an orphan inode
                # and must lock the file that now has the name.
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
