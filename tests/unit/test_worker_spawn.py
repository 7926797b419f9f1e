"""The worker's way of running host commands (worker/spawn.py) and of running a start's steps at the
same time (worker/concurrently.py)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from mikrom.worker import concurrently, spawn

pytestmark = pytest.mark.unit


def test_a_command_gets_its_input_and_returns_its_output_error_and_status():
    res = spawn.run(["sh", "-c", "cat; echo oops >&2; exit 3"], timeout=10, input="hello\n")
    assert (res.returncode, res.stdout, res.stderr) == (3, "hello\n", "oops\n")


def test_a_command_without_input_reads_dev_null_and_gets_no_other_descriptor(tmp_path):
    keep = os.open(tmp_path, os.O_RDONLY)  # close-on-exec, as every descriptor Python opens
    try:
        res = spawn.run(["sh", "-c", "cat; ls /proc/self/fd"], timeout=10)
    finally:
        os.close(keep)
    assert res.returncode == 0
    assert sorted(int(fd) for fd in res.stdout.split()) == [0, 1, 2, 3]  # 3: ls's own directory


def test_a_large_input_and_output_do_not_deadlock():
    text = "x" * (1 << 20)
    res = spawn.run(["cat"], timeout=30, input=text)
    assert res.stdout == text


def test_a_command_past_its_timeout_is_killed():
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        spawn.run(["sh", "-c", "echo $$; exec sleep 30"], timeout=0.5)
    assert time.monotonic() - started < 5


def test_a_missing_command_raises_file_not_found():
    with pytest.raises(FileNotFoundError):
        spawn.run(["mikrom-no-such-command"], timeout=5)


def test_a_stdin_descriptor_is_what_the_command_reads(tmp_path):
    src = tmp_path / "src"
    src.write_text("from the descriptor")
    fd = os.open(src, os.O_RDONLY)
    try:
        res = spawn.run(["cat"], timeout=10, stdin_fd=fd)
    finally:
        os.close(fd)
    assert res.stdout == "from the descriptor"


def test_steps_run_at_the_same_time_and_all_end_before_run_returns():
    started = threading.Barrier(3, timeout=5)  # only passes if all three run at once
    ended = []

    def step(name, fail=False):
        def go():
            started.wait()
            time.sleep(0.05)
            ended.append(name)
            if fail:
                raise ValueError(name)
            return name
        return go

    out = concurrently.run(a=step("a"), b=step("b", fail=True), c=step("c"))
    assert sorted(ended) == ["a", "b", "c"]
    assert out.results == {"a": "a", "c": "c"}
    assert isinstance(out.errors["b"], ValueError)
    assert out.first_error("c", "a") is out.errors["b"]
    assert concurrently.run(x=lambda: 1).first_error() is None


UNDER_GEVENT = r"""
from gevent import monkey; monkey.patch_all()
import subprocess, sys, threading, gevent
from mikrom.worker import concurrently, spawn

for i in range(30):  # alone, before gevent ever forked: nothing else wakes the event loop
    r = spawn.run(["echo", "alone"], timeout=5)
    assert (r.returncode, r.stdout) == (0, "alone\n"), r
bad = []
def commands():
    for i in range(10):
        try:
            r = spawn.run(["sh", "-c", "echo out; exit 4"], timeout=5)
            assert (r.returncode, r.stdout) == (4, "out\n"), r
            r = spawn.run(["echo", "x"], timeout=5)
            assert (r.returncode, r.stdout) == (0, "x\n"), r
            r = spawn.run(["cat"], timeout=5, input="y" * 100000)
            assert r.stdout == "y" * 100000
            if i % 3 == 0:  # gevent's own subprocess meanwhile (after the first commands: they must
                subprocess.run(["true"], check=True)  # work before gevent ever forked)
        except BaseException as exc:
            bad.append(repr(exc))
            return
gevent.joinall([gevent.spawn(commands) for _ in range(6)], timeout=60)
assert not bad, bad

hub_thread = threading.get_ident()
def elsewhere():
    return threading.get_ident()
def fails():
    raise ValueError("in the thread")
out = concurrently.run(a=concurrently.in_os_thread(elsewhere), b=concurrently.in_os_thread(fails))
assert out.results["a"] != hub_thread, "a real OS thread"
assert isinstance(out.errors["b"], ValueError)
print("ok")
"""


def test_under_gevent_commands_from_many_greenlets_return_their_status_and_output_and_os_thread_steps_work():
    import sys

    res = subprocess.run([sys.executable, "-c", UNDER_GEVENT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
