"""`make demo`: a whole local Mikrom stack on this machine, booting a real VM.

It starts kine + kube-apiserver and redis-server on loopback, installs the CRDs, RBAC and the
`default` IPPool, starts the operator and one node worker (as root, its bridge, taps and VMs in a
network namespace of its own), applies examples/microvm.yaml and waits until the VM is Running,
then pings the guest and shows what `kubectl get` and `kubectl describe` say.

    python hack/demo.py            # keep running until Ctrl-C; prints a KUBECONFIG to play with
    python hack/demo.py --once     # tear everything down after the VM is Running
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import controlplane, operator_proc, redis_server, worker_proc  # noqa: E402


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop everything once the VM is Running")
    parser.add_argument("--workdir", default="", help="where logs, kubeconfig and state go (default: a new temp dir)")
    args = parser.parse_args()
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

        say("starting the node worker (its network lives in namespace mikrom-demo-*)")
        netns = worker_proc.netns_create()
        wk_kubeconfig = worker_proc.service_account_kubeconfig(cp, work / "worker" / "kubeconfig")
        node = "demo-node"
        env = worker_proc.worker_env(kubeconfig=wk_kubeconfig, broker_url=redis.url(), node=node,
                                     state_dir=work / "state", image_dir=image_dir, netns=netns)
        worker = worker_proc.WorkerProc(node=node, env=env, logdir=work / "worker", state_dir=work / "state")
        stack.append(worker)
        worker.start()

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
        print(f"\n  export KUBECONFIG={cp.kubeconfig}\n  alias kubectl={controlplane.binaries.require('kubectl')}"
              f"\n  logs and state: {work}\n\nCtrl-C stops everything.")
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
