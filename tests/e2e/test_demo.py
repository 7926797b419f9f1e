"""The README's first command: `make demo` brings up the whole stack and boots a VM."""

import json
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


def _get(url: str, auth: str | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (network namespace, bridge, taps)")
def test_demo_stays_up_with_beat_and_flower_and_demo_down_stops_every_process(tmp_path):
    import re

    from harness.waits import wait_for

    workdir = Path(tempfile.mkdtemp(prefix="mkdemo-", dir="/tmp"))
    state_file = tmp_path / "demo.json"
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        demo = subprocess.Popen([sys.executable, str(REPO / "hack/demo.py"), "--workdir", str(workdir),
                                 "--state-file", str(state_file)], stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        text = wait_for(lambda: "make demo-down` stops everything" in out.read_text() and out.read_text(), 600,
                        "the demo to be up", interval=1,
                        abort=lambda: demo.poll() is not None and f"demo exited {demo.returncode}:\n{out.read_text()[-3000:]}")
        assert "phase: Running" in text and " 0% packet loss" in text, text[-4000:]
        url, password = re.search(r"Flower: +(http://127\.0\.0\.1:\d+/) +\(user admin, password (\S+)\)", text).groups()
        assert _get(url + "api/workers") == 401
        assert _get(url + "api/workers", f"admin:{password}") == 200
        assert "kubectl mikrom list" in text and "export KUBECONFIG=" in text
        recorded = json.loads(state_file.read_text())
        assert recorded["demo"]["pid"] == demo.pid
        names = " ".join(p["cmdline"] for p in recorded["processes"])
        assert "mikrom.beat" in names and "flower" in names and "kube-apiserver" in names
        assert demo.poll() is None  # it stays up

        res = subprocess.run([sys.executable, str(REPO / "hack/demo.py"), "--down", "--state-file", str(state_file)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert demo.wait(60) == 0
        assert not state_file.exists()
        for p in recorded["processes"]:
            assert not Path(f"/proc/{p['pid']}").exists() or p["cmdline"] not in \
                Path(f"/proc/{p['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30).stdout
        assert str(workdir) not in ps
    finally:
        if demo.poll() is None:  # a failure above: stop it the way a person would, then for sure
            subprocess.run([sys.executable, str(REPO / "hack/demo.py"), "--down", "--state-file", str(state_file)],
                           timeout=300)
        if demo.poll() is None:
            os.killpg(demo.pid, 9)
            demo.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
