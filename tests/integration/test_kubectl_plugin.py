"""`kubectl mikrom` against the real API server: every command run as a real process, both as the
console script `kubectl-mikrom` and as `kubectl mikrom` through kubectl's plugin lookup on PATH.
The test plays the node's part where a command waits for one (status writes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import binaries
from harness.waits import wait_for

from mikrom import names

PLUGIN = Path(sys.executable).parent / "kubectl-mikrom"
ANNOTATION = "mikrom.io/previousRunStrategy"


@pytest.fixture
def plugin(mikrom_cluster, namespace):
    """Run `kubectl-mikrom ARGS` against the test's API server and namespace."""
    def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run([str(PLUGIN), "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace, *args],
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, f"{args}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
        return res
    return run


def _background(cp, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(PLUGIN), "--kubeconfig", str(cp.kubeconfig), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _node(mvms, name: str) -> None:
    mvms.create_cluster_object(names.MICROVMNODES, "MicroVMNode", name, {"schedulable": True})


def _running_on(mvms, vm: str, node: str, **status) -> None:
    mvms.patch_status(vm, {"phase": "Running", "node": node, **status})


@pytest.fixture
def nodes(mvms):
    made: list[str] = []

    def make(name: str) -> str:
        _node(mvms, name)
        made.append(name)
        return name
    yield make
    for n in made:
        mvms.delete_cluster_object(names.MICROVMNODES, n)


def test_every_command_has_help():
    for cmd in ("", "start", "stop", "restart", "wait", "list", "cordon", "uncordon", "drain", "console"):
        res = subprocess.run([str(PLUGIN), *cmd.split(), "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: kubectl mikrom {cmd}".rstrip()), res.stdout
        assert "--namespace" in res.stdout and "--kubeconfig" in res.stdout and "--context" in res.stdout


def test_stop_halts_and_start_restores_the_recorded_run_strategy(mvms, plugin):
    mvms.create("batch", runStrategy="RerunOnFailure")
    out = plugin("stop", "batch").stdout
    assert "stopped" in out
    vm = mvms.get("batch")
    assert vm["spec"]["runStrategy"] == "Halted"
    assert vm["metadata"]["annotations"][ANNOTATION] == "RerunOnFailure"

    assert "already halted" in plugin("stop", "batch").stdout  # safe to run twice
    assert mvms.get("batch")["metadata"]["annotations"][ANNOTATION] == "RerunOnFailure"

    assert "RerunOnFailure" in plugin("start", "batch").stdout
    vm = mvms.get("batch")
    assert vm["spec"]["runStrategy"] == "RerunOnFailure"
    assert ANNOTATION not in (vm["metadata"].get("annotations") or {})
    assert "not halted" in plugin("start", "batch").stdout


def test_start_of_a_vm_halted_without_a_record_makes_it_always(mvms, plugin):
    mvms.create("cold", runStrategy="Halted")
    plugin("start", "cold")
    assert mvms.get("cold")["spec"]["runStrategy"] == "Always"


def test_restart_sets_the_restarted_at_annotation_each_time(mvms, plugin):
    mvms.create("web")
    plugin("restart", "web")
    first = mvms.get("web")["metadata"]["annotations"][names.ANNOTATION_RESTARTED_AT]
    plugin("restart", "web")
    second = mvms.get("web")["metadata"]["annotations"][names.ANNOTATION_RESTARTED_AT]
    assert first and second and second > first


def test_a_missing_vm_is_a_clear_error(plugin, namespace):
    res = plugin("stop", "nope", check=False)
    assert res.returncode == 1
    assert f'microvm "nope" not found in namespace "{namespace}"' in res.stderr
    assert "Traceback" not in res.stderr


def test_cordon_and_uncordon_flip_spec_schedulable(mvms, plugin, nodes):
    node = nodes(f"{mvms.ns}-n1")
    assert "cordoned" in plugin("cordon", node).stdout
    assert mvms.node(node)["spec"]["schedulable"] is False
    plugin("cordon", node)  # safe to run twice
    assert "uncordoned" in plugin("uncordon", node).stdout
    assert mvms.node(node)["spec"]["schedulable"] is True
    res = plugin("cordon", f"{mvms.ns}-none", check=False)
    assert res.returncode == 1 and "not found" in res.stderr


def test_list_shows_phase_node_address_shape_vmm_readiness_and_age(mvms, plugin, namespace):
    mvms.create("alpha", vcpus=2, memoryMiB=1024)
    mvms.create("beta")
    _running_on(mvms, "alpha", "node-a", ipAddress="10.244.0.2", vmm="qemu",
                conditions=[{"type": "Ready", "status": "True", "reason": "Booted"}])
    lines = plugin("list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "NODE", "IP", "VCPUS", "MEMORY", "VMM", "READY", "AGE"]
    alpha = lines[1].split()
    assert alpha[:8] == ["alpha", "Running", "node-a", "10.244.0.2", "2", "1024Mi", "qemu", "True"]
    assert alpha[8].endswith("s") or alpha[8].endswith("m")
    assert lines[2].split()[:8] == ["beta", "<none>", "<none>", "<none>", "1", "256Mi", "<none>", "Unknown"]

    everywhere = plugin("list", "-A").stdout.splitlines()
    assert everywhere[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert [namespace, "alpha", "Running"] == next(r.split()[:3] for r in everywhere if f"{namespace} " in r)


def test_wait_watches_until_the_phase_is_reached(mvms, mikrom_cluster, namespace):
    mvms.create("slow")
    waiter = _background(mikrom_cluster, "-n", namespace, "wait", "slow", "--for=phase=Running", "--timeout=60s")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(2)  # still waiting: the VM is not Running yet
        _running_on(mvms, "slow", "node-a")
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, err
        assert "microvm.mikrom.io/slow condition met" in out
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(10)


def test_wait_gives_up_after_its_timeout(mvms, plugin):
    mvms.create("never")
    res = plugin("wait", "never", "--for=phase=Running", "--timeout=2s", check=False)
    assert res.returncode == 1
    assert "timed out" in res.stderr
    bad = plugin("wait", "never", "--for=phase=Bogus", check=False)
    assert bad.returncode == 2 and "--for must be phase=" in bad.stderr


def test_drain_cordons_stops_the_nodes_vms_and_waits_until_none_runs(mvms, mikrom_cluster, namespace, nodes):
    node, other = nodes(f"{namespace}-drain"), nodes(f"{namespace}-other")
    for name, strategy in (("a", "Always"), ("b", "RerunOnFailure"), ("elsewhere", "Always")):
        mvms.create(name, runStrategy=strategy)
    _running_on(mvms, "a", node)
    _running_on(mvms, "b", node)
    _running_on(mvms, "elsewhere", other)

    drain = _background(mikrom_cluster, "drain", node, "--timeout=60s")
    try:
        wait_for(lambda: all(mvms.get(n)["spec"]["runStrategy"] == "Halted" for n in ("a", "b")), 30,
                 "drain to halt the node's VMs", abort=lambda: drain.poll() is not None and f"drain exited {drain.returncode}")
        assert mvms.node(node)["spec"]["schedulable"] is False
        with pytest.raises(subprocess.TimeoutExpired):
            drain.wait(1)  # the VMs still run: drain waits
        mvms.patch_status("a", {"phase": "Stopped"})
        with pytest.raises(subprocess.TimeoutExpired):
            drain.wait(1)  # b still runs
        mvms.patch_status("b", {"phase": "Stopped"})
        out, err = drain.communicate(timeout=30)
        assert drain.returncode == 0, err
        assert f"microvmnode.mikrom.io/{node} drained" in out
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.wait(10)
    assert mvms.get("elsewhere")["spec"]["runStrategy"] == "Always"
    assert mvms.node(other)["spec"]["schedulable"] is True
    assert mvms.get("b")["metadata"]["annotations"][ANNOTATION] == "RerunOnFailure"


def test_kubectl_finds_the_plugin_on_path(mvms, mikrom_cluster, namespace):
    mvms.create("viakubectl")
    env = dict(os.environ, PATH=f"{PLUGIN.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    kubectl = str(binaries.require("kubectl"))
    plugins = subprocess.run([kubectl, "plugin", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert str(PLUGIN) in plugins.stdout, plugins.stdout + plugins.stderr
    res = subprocess.run([kubectl, "mikrom", "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace, "stop",
                          "viakubectl"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert mvms.get("viakubectl")["spec"]["runStrategy"] == "Halted"
    listing = subprocess.run([kubectl, "mikrom", "list", "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace],
                             capture_output=True, text=True, env=env, timeout=60)
    assert listing.stdout.splitlines()[1].split()[0] == "viakubectl", listing.stdout + listing.stderr


def test_console_prints_and_follows_the_vms_console_log_across_rotation(mvms, mikrom_cluster, namespace, tmp_path):
    uid = mvms.create("chatty")["metadata"]["uid"]
    mvms.patch_status("chatty", {"phase": "Running", "node": "this-node"})
    vm_dir = tmp_path / "state" / "vms" / uid
    vm_dir.mkdir(parents=True)
    (vm_dir / "console.log").write_text("Linux version 6.1\nlogin: \n")
    once = subprocess.run([str(PLUGIN), "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace, "console",
                           "chatty", "--log", "--state-dir", str(tmp_path / "state")], capture_output=True, text=True,
                          timeout=60)
    assert once.returncode == 0, once.stderr
    assert once.stdout == "Linux version 6.1\nlogin: \n"

    out = tmp_path / "follow.out"
    with open(out, "wb") as sink:
        follower = subprocess.Popen([str(PLUGIN), "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace,
                                     "console", "chatty", "-f", "--state-dir", str(tmp_path / "state")], stdout=sink)
    try:
        wait_for(lambda: "login:" in out.read_text(), 30, "the console's first lines")
        with open(vm_dir / "console.log", "a") as log:
            log.write("before rotation\n")
        wait_for(lambda: "before rotation" in out.read_text(), 30, "an appended line")
        # the supervisor's rotation: console.log becomes console.log.1 and starts afresh
        (vm_dir / "console.log").rename(vm_dir / "console.log.1")
        (vm_dir / "console.log").write_text("after rotation\n")
        wait_for(lambda: "after rotation" in out.read_text(), 30, "a line written after the rotation")
        assert follower.poll() is None
    finally:
        follower.kill()
        follower.wait(10)
    for mode in ("--log", "--follow"):
        missing = subprocess.run([str(PLUGIN), "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace,
                                  "console", "chatty", mode, "--state-dir", str(tmp_path / "elsewhere")],
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "--via-pod" in missing.stderr and "Traceback" not in missing.stderr


def test_an_interactive_console_without_a_socket_is_a_clear_error(mvms, mikrom_cluster, namespace, tmp_path):
    """No supervisor keeps a console socket there (the VM does not run on this machine, or has
    stopped): an error naming what is missing, and the terminal is never touched."""
    uid = mvms.create("quiet")["metadata"]["uid"]
    mvms.patch_status("quiet", {"phase": "Running", "node": "this-node"})
    (tmp_path / "state" / "vms" / uid).mkdir(parents=True)
    res = subprocess.run([str(PLUGIN), "--kubeconfig", str(mikrom_cluster.kubeconfig), "-n", namespace, "console",
                          "quiet", "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"no console socket at {tmp_path}/state/vms/{uid}/console.sock" in res.stderr and "--via-pod" in res.stderr
