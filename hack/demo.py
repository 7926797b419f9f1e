"""`make demo`: a whole local Mikrom stack on this machine, booting a real VM.

It starts kine + kube-apiserver and redis-server on loopback, installs the CRDs, RBAC and the
`default` IPPool, starts the operator and one node worker (as root, its bridge, taps and VMs in a
network namespace of its own), Celery beat and Flower (on loopback, basic auth with a generated
password), applies examples/microvm.yaml and waits until the VM is Running, then pings the guest
and shows what `kubectl get` and `kubectl describe` say.

    python hack/demo.py            # keep running until Ctrl-C or `make demo-down`; prints the
                                   # KUBECONFIG, Flower's URL and credentials, commands to try
    python hack/demo.py --once     # tear everything down after the VM is Running
    python hack/demo.py --down     # `make demo-down`: stop a running demo, every process by PID

A running demo records its PID and those of everything it started in `--state-file`
(default ~/.cache/mikrom/demo.json); `--down` asks the demo to stop (SIGTERM: it stops its parts
in order and removes its network namespace), then kills by PID whatever it recorded that is still
there (checked against the recorded command line, so a reused PID is never hit).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import controlplane, operator_proc, procs, redis_server, worker_proc  # noqa: E402

STATE_FILE = Path.home() / ".cache" / "mikrom" / "demo.json"
NETNS_PREFIX = "mkdemo-"
"""The demo's network namespace is named this plus 8 hex digits (the tests' are `mkt-`)."""


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop everything once the VM is Running")
    parser.add_argument("--workdir", default="", help="where logs, kubeconfig and state go (default: a new temp dir)")
    parser.add_argument("--down", action="store_true", help="stop the running demo (make demo-down)")
    parser.add_argument("--state-file", default=str(STATE_FILE), help=f"the running demo's PIDs (default {STATE_FILE})")
    args = parser.parse_args()
    if args.down:
        return down(Path(args.state_file))
    if os.geteuid() != 0:
        print("the demo needs root: it creates a network namespace, a bridge and tap devices", file=sys.stderr)
        return 2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mikrom-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    stack: list = []
    netns = None
    t0 = time.monotonic()
    try:
        say("building the guest image (cached after the first run)")
        image_dir = worker_proc.guest_image()

        say("starting kube-apiserver (on kine) and redis-server on loopback")
        cp = controlplane.start(work / "controlplane")
        stack.append(cp)
        redis = redis_server.start(work / "redis")
        stack.append(redis)

        say("installing the CRDs, RBAC and the default IPPool")
        operator_proc.install(cp)
        cp.kubectl("apply", "-f", str(REPO / "examples/ippool-default.yaml"))

        say("starting the operator")
        op_kubeconfig = operator_proc.service_account_kubeconfig(cp, work / "operator" / "kubeconfig")
        op = operator_proc.start(cp, redis.url(), work / "operator", "operator", op_kubeconfig, standalone=True,
                                 env={"MIKROM_PROGRESS_TIMEOUT_SECONDS": "120", "MIKROM_NODE_LOST_AFTER_SECONDS": "40",
                                      "MIKROM_RECONCILE_INTERVAL_SECONDS": "5"})
        stack.append(op)
        op.wait_live()

        netns = worker_proc.netns_create(prefix=NETNS_PREFIX)
        say(f"starting the node worker (its bridge, taps and VMs live in network namespace {netns})")
        wk_kubeconfig = worker_proc.service_account_kubeconfig(cp, work / "worker" / "kubeconfig")
        node = "demo-node"
        env = worker_proc.worker_env(kubeconfig=wk_kubeconfig, broker_url=redis.url(), node=node,
                                     state_dir=work / "state", image_dir=image_dir, netns=netns)
        worker = worker_proc.WorkerProc(node=node, env=env, logdir=work / "worker", state_dir=work / "state")
        stack.append(worker)
        worker.start()

        say("starting Celery beat and Flower (loopback, basic auth)")
        celery_env = dict(os.environ, MIKROM_BROKER_URL=redis.url(), PYTHONUNBUFFERED="1")
        beat = procs.start("beat", [sys.executable, "-m", "mikrom.beat", "-s", str(work / "beat" / "schedule")],
                           work / "beat", env=celery_env)
        stack.append(beat)
        flower_port, flower_password = procs.free_port(), secrets.token_urlsafe(18)
        flower = procs.start("flower", [sys.executable, "-m", "celery", "-A", "mikrom.celery_app", "flower",
                                        "--address=127.0.0.1", f"--port={flower_port}",
                                        f"--basic_auth=admin:{flower_password}"], work / "flower", env=celery_env)
        stack.append(flower)
        procs.wait_port(flower_port, 90, flower)
        record(Path(args.state_file), work, stack, worker, netns)

        say("kubectl apply -f examples/microvm.yaml")
        applied = time.monotonic()
        print(cp.kubectl("apply", "-n", "default", "-f", str(REPO / "examples/microvm.yaml")).stdout, end="")
        vm = wait_running(cp, "hello", timeout=180)
        say(f"Running {time.monotonic() - applied:.1f}s after apply (guest boot {vm['status'].get('bootSeconds')}s "
            f"under {'KVM' if 'kvm' in json.dumps(vm['status']).lower() else 'TCG'})")
        print(cp.kubectl("get", "mvm", "-n", "default", "-o", "wide").stdout)
        print(cp.kubectl("get", "mvmn", "-o", "wide").stdout)
        print(cp.kubectl("describe", "mvm", "hello", "-n", "default").stdout)

        ip = vm["status"]["ipAddress"]
        say(f"ping -c 3 {ip} (from the node's network namespace)")
        subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "3", "-W", "2", ip], timeout=30)
        console = work / "state" / "vms" / vm["metadata"]["uid"] / "console.log"
        if console.exists():
            say(f"the guest's console ({console}), last lines")
            print("\n".join(console.read_text(errors="replace").splitlines()[-5:]))

        say(f"demo stack up in {time.monotonic() - t0:.0f}s")
        if args.once:
            return 0
        plugin = Path(sys.executable).parent
        print(f"\n  Flower:      http://127.0.0.1:{flower_port}/  (user admin, password {flower_password})"
              f"\n  export KUBECONFIG={cp.kubeconfig}"
              f"\n  export PATH={controlplane.binaries.require('kubectl').parent}:{plugin}:$PATH"
              f"\n  kubectl mikrom list -A; kubectl mikrom restart -n default hello"
              f"\n  kubectl mikrom console -n default hello --state-dir {work / 'state'}   "
              f"# the serial console, Ctrl-] detaches; --follow: the log only"
              f"\n  logs and state: {work}\n\nCtrl-C or `make demo-down` stops everything.", flush=True)
        # blocked only now, so the children started above keep the default SIGTERM action
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        say("stopping")
        for part in reversed(stack):
            try:
                (part.cleanup if hasattr(part, "cleanup") else part.stop)()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"  while stopping {part!r:.60}: {exc}", file=sys.stderr)
        if netns:
            worker_proc.netns_delete(netns)
        forget(Path(args.state_file))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids(part) -> list[int]:
    """The PIDs of one part of the stack (a Proc, a server or worker holding one, the control plane)."""
    found = []
    for proc in getattr(part, "processes", None) or [getattr(part, "proc", None) or part]:
        pid = getattr(proc, "pid", None) or getattr(getattr(proc, "popen", None), "pid", None)
        if pid:
            found.append(pid)
    return found


def pids_under(workdir: str) -> list[int]:
    """Live processes whose command line names the demo's directory or which run inside it."""
    root = str(Path(workdir).resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        if root in _cmdline(int(entry)) or cwd == root or cwd.startswith(root + "/"):
            found.append(int(entry))
    return found


def record(path: Path, work: Path, stack: list, worker, netns: str) -> None:
    """Write the demo's PID and its parts' PIDs with their command lines, and its network
    namespace, for `--down`."""
    pids = [{"pid": pid, "cmdline": _cmdline(pid)} for part in stack for pid in _pids(part)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"demo": {"pid": os.getpid(), "cmdline": _cmdline(os.getpid())}, "workdir": str(work),
                               "state_dir": str(worker.state_dir), "netns": netns, "processes": pids}, indent=1))
    tmp.replace(path)


def forget(path: Path) -> None:
    try:
        if json.loads(path.read_text())["demo"]["pid"] == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError):
        pass


def down(path: Path, grace: float = 90) -> int:
    """Stop the demo recorded in `path`: SIGTERM to the demo (it stops its parts in order), then
    SIGKILL, by PID, each recorded process still running the same command line, and the VMMs
    left under its state directory."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"no running demo recorded in {path}")
        return 0
    demo = state["demo"]
    if demo["cmdline"] and _cmdline(demo["pid"]) == demo["cmdline"]:
        say(f"stopping the demo (pid {demo['pid']})")
        os.kill(demo["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _cmdline(demo["pid"]) == demo["cmdline"] and time.monotonic() < deadline:
            time.sleep(0.5)  # another process's exit gives no signal to wait on
    left = [p for p in state["processes"] + [demo] if p["cmdline"] and _cmdline(p["pid"]) == p["cmdline"]]
    for p in left:
        print(f"  killing {p['pid']}: {p['cmdline'][:100]}")
        try:
            os.killpg(p["pid"], signal.SIGKILL)  # each part leads its own session and process group
        except OSError:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    from harness.vms import vmm_pids

    for pid in vmm_pids(Path(state["state_dir"])):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # anything else still running from the demo's directory (a part's child that outlived it)
    for pid in pids_under(state["workdir"]):
        print(f"  killing {pid}: {_cmdline(pid)[:100]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if state.get("netns"):  # the demo removes it when it stops in order; not when it was killed
        worker_proc.netns_delete(state["netns"])
    path.unlink(missing_ok=True)
    say("demo stopped")
    return 0


def wait_running(cp, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        vm = json.loads(cp.kubectl("get", "mvm", name, "-n", "default", "-o", "json").stdout)
        phase = vm.get("status", {}).get("phase")
        if phase != last:
            print(f"    phase: {phase}", flush=True)
            last = phase
        if phase == "Running":
            return vm
        if phase == "Failed":
            raise SystemExit(f"the VM failed: {vm['status'].get('message')}")
        time.sleep(0.5)
    raise SystemExit(f"the VM was not Running within {timeout}s (phase {last})")


if __name__ == "__main__":
    sys.exit(main())
