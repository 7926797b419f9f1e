"""The per-VM lock: exclusive across threads (greenlets in the worker) and across processes, and
released by the kernel when its holder is killed."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from harness.waits import wait_for

from mikrom.worker.locks import LockTimeout, NodeLocks


def test_two_holders_in_one_process_never_overlap(tmp_path):
    locks = NodeLocks(tmp_path)
    inside, overlaps = [], []

    def work():
        with locks.hold("vm-1", timeout=10):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.01)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not overlaps


def test_different_vms_do_not_wait_for_each_other(tmp_path):
    locks = NodeLocks(tmp_path)
    with locks.hold("vm-1", timeout=1):
        with locks.hold("vm-2", timeout=0.2):
            pass


def test_a_busy_lock_times_out(tmp_path):
    locks = NodeLocks(tmp_path)
    with locks.hold("vm-1", timeout=1):
        t0 = time.monotonic()
        with pytest.raises(LockTimeout):
            with locks.hold("vm-1", timeout=0.3):
                pass
        assert 0.25 < time.monotonic() - t0 < 2


HOLDER = """
import sys, time
from mikrom.worker.locks import NodeLocks
with NodeLocks(sys.argv[1]).hold("vm-1", timeout=5):
    print("held", flush=True)
    time.sleep(60)
"""


def test_another_process_is_excluded_until_it_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        locks = NodeLocks(tmp_path)
        with pytest.raises(LockTimeout):
            with locks.hold("vm-1", timeout=0.3):
                pass
        os.kill(proc.pid, signal.SIGKILL)  # a worker killed with -9 leaves no stale lock
        proc.wait(10)
        with locks.hold("vm-1", timeout=2):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_waiter_on_a_removed_lock_file_takes_the_new_file(tmp_path):
    # two NodeLocks on one directory behave like two worker processes: both reach the flock
    first, second = NodeLocks(tmp_path), NodeLocks(tmp_path)
    seen = []

    def waiter():
        with second.hold("vm-1", timeout=5):
            # the file under the name must be the one we hold, or a third process could lock it too
            seen.append(second.path("vm-1").exists())

    with first.hold("vm-1", timeout=1) as held:
        t = threading.Thread(target=waiter)
        t.start()
        # once the waiter has opened the old file (a second descriptor on it) it polls that file's flock
        wait_for(lambda: _descriptors_on(first.path("vm-1")) == 2, 5, "the waiter to open the lock file",
                 interval=0.01)
        held.remove = True
    t.join(10)
    assert seen == [True]


def _descriptors_on(path) -> int:
    """How many of this process's open descriptors refer to the file at `path`."""
    target = os.stat(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
    return count


def test_lock_keys_cannot_name_paths(tmp_path):
    with pytest.raises(ValueError):
        NodeLocks(tmp_path).path("../etc/passwd")
