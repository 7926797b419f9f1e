#!/usr/bin/env python3
"""Dispatch benchmark: how fast the operator turns accepted MicroVMs into messages on node queues,
beside its floor, a kopf operator that does nothing but send that message (bench/floor_operator.py).

It starts what the integration tests start (tests/harness): a real kube-apiserver on kine, a real
redis-server, the CRDs and the operator's RBAC, and, as their own processes with the
mikrom-operator ServiceAccount, `mikrom operator` serving namespace `bench` and the floor operator
serving namespace `floor` (both standalone, kopf's own per-object log at WARNING: Mikrom's
operator sets it so, the floor runs `kopf run --quiet`). Fake nodes register,
heartbeat and consume their queues (they record messages and boot nothing). For each operator it
reports the time from "the API server accepted the create" to "the message was taken from the node's
queue in Redis", in two phases:

- one at a time (`--single N`): a create, its message, a pause (`--gap`, 0.25 s), then the next;
  Mikrom's and the floor's creates alternate, so both are measured under the same conditions. The
  pause makes each create meet an idle operator, as a single VM does: Mikrom's work for a VM goes
  on for some 30-60 ms after its message (its status write, Events, kopf's finalizer patch and
  their watch events), and a create sent in that time would measure that queue, not the dispatch
  (the burst measures the queue);
- a burst (`--count N --clients C`): N creates from C client threads, the floor's burst first (it
  has no timers to disturb the second), then Mikrom's: p50, p95, max, how long after the last create
  was accepted the last message arrived, and messages missing or duplicated.

    .venv/bin/python bench/dispatch.py [--single 60] [--gap 0.25] [--count 200] [--clients 8] [--nodes 4]
                                       [--trace FILE]

`--trace` writes each burst VM's create and message times (from the burst's first create) to a
file, to see where in a burst the latency grows.

One self-contained command (it starts and stops everything it uses); it prints the load average
at its start and end, since other work on the machine moves every figure.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import fake_worker, operator_proc, procs  # noqa: E402
from harness.waits import wait_for  # noqa: E402
from stack import Stack  # noqa: E402
from kubernetes import client, config  # noqa: E402

from mikrom import names  # noqa: E402

LEFT_OUT = """\
What this leaves out:
  - fake nodes: a test stand-in plays the worker (it registers, heartbeats and consumes its queue in
    the real Redis, but boots no VM and writes no VM status), so no worker-side time is included;
  - one kube-apiserver on kine/SQLite and one Redis, on loopback, on this machine, sharing its CPUs
    with both operators, the client threads and the fake nodes;
  - the clock stops when the fake node takes the message off its queue, which it polls continuously
    (this adds at most a few milliseconds over the moment of enqueueing)."""

OPERATORS = (("mikrom", "bench"), ("floor", "floor"))  # name, namespace


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Figures:
    latencies: list[float]
    missing: int
    duplicated: int
    tail: float
    """Seconds from the last create accepted to the last message."""

    def line(self) -> str:
        if not self.latencies:
            return f"no messages, {self.missing} missing"
        ms = [x * 1000 for x in self.latencies]
        return (f"p50 {percentile(ms, 0.5):6.1f} ms  p95 {percentile(ms, 0.95):6.1f} ms  max {max(ms):6.1f} ms  "
                f"mean {statistics.mean(ms):6.1f} ms  last message {self.tail * 1000:6.0f} ms after the last "
                f"create  missing {self.missing}  duplicated {self.duplicated}")


def first_messages(worker) -> tuple[dict[str, float], collections.Counter]:
    """Per uid, when its first create message was taken off a queue, and how many it was sent."""
    first: dict[str, float] = {}
    counts: collections.Counter = collections.Counter()
    for m in worker.messages(task=names.CREATE_VM):
        counts[m.kwargs["uid"]] += 1
        first.setdefault(m.kwargs["uid"], m.received_at)
    return first, counts


def figures(worker, accepted: dict[str, float]) -> Figures:
    first, counts = first_messages(worker)
    first = {u: at for u, at in first.items() if u in accepted}
    counts = collections.Counter({u: c for u, c in counts.items() if u in accepted})
    lat = [first[u] - accepted[u] for u in accepted if u in first]
    tail = (max(first.values()) - max(accepted.values())) if first else float("nan")
    return Figures(lat, sum(1 for u in accepted if u not in first), sum(c - 1 for c in counts.values()), tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=60, help="MicroVMs per operator created one at a time")
    parser.add_argument("--gap", type=float, default=0.25,
                        help="seconds between a single create's message and the next create")
    parser.add_argument("--count", type=int, default=200, help="MicroVMs per operator in the burst (0: none)")
    parser.add_argument("--nodes", type=int, default=4, help="fake MicroVMNodes")
    parser.add_argument("--clients", type=int, default=8, help="client threads creating the burst")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the messages")
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    parser.add_argument("--trace", type=Path, help="write each burst VM's times here (TSV: operator, seconds "
                        "from the burst's first create to its create accepted and to its message)")
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="mikrom-bench-"))
    stack = None
    worker = None
    ops: dict[str, operator_proc.Operator] = {}
    try:
        print(f"starting kube-apiserver, redis-server and both operators (logs in {workdir}) ...", flush=True)
        stack = Stack.start(workdir, namespaces=[ns for _, ns in OPERATORS])
        cp = stack.cp
        worker = fake_worker.FakeWorker(str(cp.kubeconfig), stack.broker)
        per_node = max(1, -(-(args.count + args.single + 1) // args.nodes))
        node_names = [f"bench-{i}" for i in range(args.nodes)]
        for name in node_names:
            worker.add_node(name, vcpus=per_node, memory_mib=per_node * 256, answering=False)
        ops["mikrom"] = stack.operator("operator", "bench", wait=False,
                                       # a loaded API server delays the fake nodes' heartbeats:
                                       # the tests' 6 s would mark nodes lost mid-burst
                                       env={"MIKROM_RECONCILE_INTERVAL_SECONDS": "10",
                                            "MIKROM_NODE_LOST_AFTER_SECONDS": "60",
                                            "MIKROM_PROGRESS_TIMEOUT_SECONDS": "600"})
        ops["floor"] = start_floor(stack.broker, stack.operator_kubeconfig, workdir / "floor", node_names)
        for op in ops.values():
            op.wait_live()
        api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cp.kubeconfig)))

        def create(ns: str, name: str) -> tuple[str, float]:
            body = {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name},
                    "spec": {"vcpus": 1, "memoryMiB": 128,
                             "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}
            obj = api.create_namespaced_custom_object(names.GROUP, names.VERSION, ns, names.MICROVMS, body,
                                                      _request_timeout=(5, 30))
            return obj["metadata"]["uid"], time.time()

        def delivered(uids) -> bool:
            got = {m.kwargs["uid"] for m in worker.messages(task=names.CREATE_VM)}
            return set(uids) <= got

        for op_name, ns in OPERATORS:  # a warm-up VM each: both have listed the nodes and connected to Redis
            uid, _ = create(ns, "warm-up")
            wait_for(lambda: delivered([uid]), 60, f"the {op_name} operator's first message", interval=0.01)

        single: dict[str, dict[str, float]] = {name: {} for name, _ in OPERATORS}
        print(f"one at a time: {args.single} MicroVMs per operator, alternating ...", flush=True)
        for i in range(args.single):
            for op_name, ns in OPERATORS:
                uid, at = create(ns, f"one-{i:04d}")
                single[op_name][uid] = at
                wait_for(lambda: delivered([uid]), args.timeout, f"the {op_name} message of one-{i:04d}",
                         interval=0.002)
                time.sleep(args.gap)  # the workload's pacing (see the docstring), not a wait for a condition

        burst: dict[str, dict[str, float]] = {name: {} for name, _ in OPERATORS}
        if args.count:
            for op_name, ns in reversed(OPERATORS):  # the floor first: it has no timers to disturb the other
                print(f"burst: {args.count} MicroVMs from {args.clients} client threads for {op_name} ...",
                      flush=True)
                with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                    for uid, at in pool.map(lambda i, ns=ns: create(ns, f"burst-{i:04d}"), range(args.count)):
                        burst[op_name][uid] = at
                try:
                    wait_for(lambda: delivered(burst[op_name]), args.timeout, f"the {op_name} burst's messages",
                             interval=0.05)
                except Exception as exc:  # noqa: BLE001 - report what arrived
                    print(f"  {exc}")

        print()
        print(f"setup: {args.nodes} fake nodes; single creates {args.gap:g} s apart; Mikrom's operator with {os.environ.get('MIKROM_OPERATOR_WORKERS', 16)} "
              f"handler threads; {os.cpu_count()} CPUs; load average {_load(load_at_start)} at the start, "
              f"{_load(os.getloadavg())} at the end (1, 5, 15 min)")
        bad = False
        for phase, data in (("one at a time", single), (f"burst ({args.count} from {args.clients} clients)", burst)):
            if not any(data.values()):
                continue
            f = {name: figures(worker, data[name]) for name, _ in OPERATORS}
            print(f"\n{phase}: create accepted -> message on the node's queue")
            for name, _ in OPERATORS:
                print(f"  {name:7s} {f[name].line()}")
            if f["mikrom"].latencies and f["floor"].latencies:
                r50 = percentile(f["mikrom"].latencies, 0.5) / percentile(f["floor"].latencies, 0.5)
                r95 = percentile(f["mikrom"].latencies, 0.95) / percentile(f["floor"].latencies, 0.95)
                print(f"  ratio   mikrom/floor: p50 {r50:.2f}x, p95 {r95:.2f}x")
            bad = bad or any(x.missing or x.duplicated for x in f.values())
        if args.trace:
            write_trace(args.trace, worker, burst)
        print()
        print(LEFT_OUT)
        for op in ops.values():
            problems = op.problems()
            if problems:
                print(f"\n{op.name} logged {len(problems)} tracebacks: see {op.proc.log}")
                bad = True
        return 1 if bad else 0
    finally:
        for op in ops.values():
            op.stop()  # first, so that they do not see the fake nodes go silent
        if worker is not None:
            worker.close()
        if stack is not None:
            stack.close()
        if args.keep:
            print(f"\nlogs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def write_trace(path: Path, worker, burst: dict[str, dict[str, float]]) -> None:
    """Per burst VM, when its create was accepted and when its message arrived, from the burst's
    first create: where in a burst the latency grows."""
    first, _ = first_messages(worker)
    lines = ["operator\taccepted_s\tmessage_s"]
    for name, accepted in burst.items():
        if not accepted:
            continue
        t0 = min(accepted.values())
        for uid, at in sorted(accepted.items(), key=lambda kv: kv[1]):
            got = f"{first[uid] - t0:.4f}" if uid in first else ""
            lines.append(f"{name}\t{at - t0:.4f}\t{got}")
    path.write_text("\n".join(lines) + "\n")
    print(f"\nburst trace written to {path}")


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def start_floor(broker: str, kubeconfig: Path, workdir: Path, nodes: list[str]) -> operator_proc.Operator:
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIKROM_") and k != "KUBECONFIG"}
    env.update({"KUBECONFIG": str(kubeconfig), "MIKROM_BROKER_URL": broker, "PYTHONUNBUFFERED": "1",
                "FLOOR_NODES": ",".join(nodes)})
    argv = [str(Path(sys.executable).with_name("kopf")), "run", "--quiet", "--standalone", "-n", "floor",
            "--liveness", f"http://127.0.0.1:{port}/healthz", str(REPO / "bench" / "floor_operator.py")]
    proc = procs.start("floor-operator", argv, workdir, env=env, cwd=str(workdir))
    return operator_proc.Operator(proc=proc, liveness_port=port)


if __name__ == "__main__":
    sys.exit(main())
