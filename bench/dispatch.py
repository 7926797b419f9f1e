#!/usr/bin/env python3
"""Dispatch benchmark: how fast the operator turns accepted MicroVMs into messages on node queues.

It starts what the integration tests start (tests/harness): a real kube-apiserver on kine, a real
redis-server, the CRDs and the operator's RBAC, and `mikrom operator` as its own process running
cluster-wide as the mikrom-operator ServiceAccount. Fake nodes register and heartbeat and consume
their queues (they record messages and boot nothing). Then it creates N MicroVMs from a few client
threads and reports, per VM, the time from "the API server accepted the create" to "the message
was taken from the node's queue in Redis": p50, p95, max, and the throughput.

    .venv/bin/python bench/dispatch.py [--count 200] [--nodes 4] [--clients 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import controlplane, fake_worker, operator_proc, redis_server  # noqa: E402
from kubernetes import client, config  # noqa: E402

from mikrom import names  # noqa: E402

LEFT_OUT = """\
What this leaves out:
  - fake nodes: a test stand-in plays the worker (it registers, heartbeats and consumes its queue in
    the real Redis, but boots no VM and writes no VM status), so no worker-side time is included;
  - one kube-apiserver on kine/SQLite and one Redis, on loopback, on this machine, sharing its CPUs
    with the operator, the client threads and the fake nodes;
  - the clock stops when the fake node takes the message off its queue, which it polls continuously
    (this adds at most a few milliseconds over the moment of enqueueing)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="MicroVMs to create")
    parser.add_argument("--nodes", type=int, default=4, help="fake MicroVMNodes")
    parser.add_argument("--clients", type=int, default=8, help="client threads creating MicroVMs")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for all messages")
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mikrom-bench-"))
    started: list = []
    worker = op = None
    try:
        print(f"starting kube-apiserver, redis-server and the operator (logs in {workdir}) ...", flush=True)
        cp = controlplane.start(workdir / "controlplane")
        started += cp.processes
        redis = redis_server.start(workdir / "redis")
        started.append(redis.proc)
        operator_proc.install(cp)
        kubeconfig = operator_proc.service_account_kubeconfig(cp, workdir / "operator.kubeconfig")
        cp.kubectl("create", "namespace", "bench")
        broker = redis.url(db=0)

        worker = fake_worker.FakeWorker(str(cp.kubeconfig), broker)
        per_node = max(1, -(-args.count // args.nodes))
        for i in range(args.nodes):
            worker.add_node(f"bench-{i}", vcpus=per_node, memory_mib=per_node * 256, answering=False)
        op = operator_proc.start(cp, broker, workdir / "operator", "operator", kubeconfig, namespace="",
                                 env={"MIKROM_RECONCILE_INTERVAL_SECONDS": "10",
                                      "MIKROM_PROGRESS_TIMEOUT_SECONDS": "600"})
        started.append(op.proc)
        op.wait_live()
        time.sleep(2)  # let it list the nodes and settle

        api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cp.kubeconfig)))
        accepted: dict[str, float] = {}

        def create(i: int) -> None:
            body = {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": f"vm-{i:04d}"},
                    "spec": {"vcpus": 1, "memoryMiB": 128,
                             "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}
            obj = api.create_namespaced_custom_object(names.GROUP, names.VERSION, "bench", names.MICROVMS, body,
                                                      _request_timeout=(5, 30))
            accepted[obj["metadata"]["uid"]] = time.time()

        print(f"creating {args.count} MicroVMs from {args.clients} client threads ...", flush=True)
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.count)))
        created_in = time.time() - t0

        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            got = {m.kwargs["uid"] for m in worker.messages(task=names.CREATE_VM)}
            if accepted.keys() <= got:
                break
            time.sleep(0.1)
        first: dict[str, float] = {}
        for m in worker.messages(task=names.CREATE_VM):
            first.setdefault(m.kwargs["uid"], m.received_at)
        missing = [u for u in accepted if u not in first]
        latencies = [first[u] - accepted[u] for u in accepted if u in first]
        total = len(worker.messages(task=names.CREATE_VM))
        span = max(first.values()) - t0 if first else float("nan")

        print()
        print(f"MicroVMs created:      {len(accepted)} in {created_in:.2f}s "
              f"({len(accepted) / created_in:.0f}/s accepted by the API server)")
        print(f"messages on queues:    {len(first)} VMs ({total} create messages in all), {len(missing)} missing")
        if latencies:
            print(f"dispatch latency:      p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
                  f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
                  f"(mean {statistics.mean(latencies) * 1000:.0f} ms)")
            print(f"throughput:            {len(first) / span:.1f} VMs/s dispatched "
                  f"(first create to last message: {span:.2f}s)")
        print(f"setup:                 {args.nodes} fake nodes, operator with {os.environ.get('MIKROM_OPERATOR_WORKERS', 16)} "
              f"handler threads, {os.cpu_count()} CPUs")
        print()
        print(LEFT_OUT)
        problems = op.problems()
        if problems:
            print(f"\nthe operator logged {len(problems)} tracebacks: see {op.proc.log}")
        return 1 if missing or problems else 0
    finally:
        if op is not None:
            op.stop()  # first, so that it does not see the fake nodes go silent
        if worker is not None:
            worker.close()
        for p in reversed(started):
            p.stop()
        if args.keep:
            print(f"\nlogs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
