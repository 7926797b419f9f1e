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


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _clean_home_env(home: Path) -> dict:
    """A fresh HOME; the caches of what `make demo` would otherwise build for half an hour are
    pointed at the real ones by their documented overrides (README, hack/testbin.sh and
    hack/test-image.sh): MIKROM_TESTBIN_CACHE and MIKROM_IMAGE_CACHE."""
    from harness import binaries

    real_home = Path(os.environ.get("HOME", "/root"))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TERM")}
    env.update(HOME=str(home), MIKROM_TESTBIN_CACHE=str(binaries.CACHE),
               MIKROM_IMAGE_CACHE=os.environ.get("MIKROM_IMAGE_CACHE", str(real_home / ".cache/mikrom/images")))
    return env


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (network namespace, bridge, taps)")
def test_make_demo_in_a_clean_home_serves_flower_with_its_password_and_make_demo_down_leaves_nothing_running(tmp_path):
    import re

    from harness.waits import wait_for

    home = tmp_path / "home"
    home.mkdir()
    env = _clean_home_env(home)
    links_before, netns_before = _links(), _netns()
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        demo = subprocess.Popen(["make", "demo"], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    state_file = home / ".cache/mikrom/demo.json"
    try:
        text = wait_for(lambda: "make demo-down` stops everything" in out.read_text() and out.read_text(), 900,
                        "the demo to be up", interval=1,
                        abort=lambda: demo.poll() is not None and f"demo exited {demo.returncode}:\n{out.read_text()[-3000:]}")
        assert "phase: Running" in text and " 0% packet loss" in text, text[-4000:]
        url, password = re.search(r"Flower: +(http://127\.0\.0\.1:\d+/) +\(user admin, password (\S+)\)", text).groups()
        assert _get(url + "api/workers") == 401
        assert _get(url + "api/workers", f"admin:{password}") == 200
        assert _get(url, f"admin:{password}") == 200
        assert "kubectl mikrom list" in text and "export KUBECONFIG=" in text
        recorded = json.loads(state_file.read_text())
        workdir, netns = recorded["workdir"], recorded["netns"]
        assert netns in _netns() and netns not in netns_before
        names = " ".join(p["cmdline"] for p in recorded["processes"])
        assert "mikrom.beat" in names and "flower" in names and "kube-apiserver" in names
        assert demo.poll() is None  # it stays up
        try:
            _screenshot_flower(url, password)
            shot_error = None
        except ImportError as exc:  # checked last, so the stop is still checked meanwhile
            shot_error = exc

        res = subprocess.run(["make", "demo-down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert demo.wait(60) == 0
        assert not state_file.exists()
        for p in recorded["processes"] + [recorded["demo"]]:
            assert not Path(f"/proc/{p['pid']}").exists() or p["cmdline"] not in \
                Path(f"/proc/{p['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        sys.path.insert(0, str(REPO / "hack"))
        from demo import pids_under

        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids_under(workdir)}
        assert not left, f"processes of the demo left: {left}"
        assert netns not in _netns() and not {n for n in _netns() - netns_before if n.startswith("mkdemo-")}
        assert not _links() - links_before, "a link the demo created on the host is left"
        shutil.rmtree(workdir, ignore_errors=True)  # the logs it keeps for a person to read
        if shot_error:
            raise shot_error
    finally:
        if demo.poll() is None:  # a failure above: stop it the way a person would, then for sure
            subprocess.run(["make", "demo-down"], cwd=REPO, env=env, timeout=300)
        if demo.poll() is None:
            os.killpg(demo.pid, 9)
            demo.wait(30)


def _screenshot_flower(url: str, password: str) -> None:
    """Flower's dashboard as the demo serves it, for a person to look at."""
    from harness.screenshot import screenshot

    path = REPO / ".test-artifacts" / "flower-demo.png"
    path.parent.mkdir(exist_ok=True)
    screenshot(url, path, basic_auth=("admin", password), width=1280, height=900, timeout=60)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
