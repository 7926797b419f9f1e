"""The README's first command: `make demo` brings up the whole stack and boots a VM."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (network namespace, bridge, taps)")
def test_demo_boots_a_vm_and_pings_it():
    # a short directory: VMM sockets live under it, and unix socket paths are limited to 107 bytes
    workdir = Path(tempfile.mkdtemp(prefix="mkdemo-", dir="/tmp"))
    res = subprocess.run([sys.executable, str(REPO / "hack/demo.py"), "--once", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "phase: Running" in out, out[-4000:]
    assert " 0% packet loss" in out, out[-4000:]
    # everything it started is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30).stdout
    assert str(workdir) not in ps
    shutil.rmtree(workdir, ignore_errors=True)
