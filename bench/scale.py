#!/usr/bin/env python3
"""Scale benchmark: Mikrom's control plane with 1,000 MicroVMs on 20 (and on 5) fake nodes.

It starts what bench/stack.py starts (a real kube-apiserver on kine, a real Redis, the CRDs and RBAC,
the real `mikrom operator` with its production settings) and fake nodes (tests/harness/fake_worker.py)
that register MicroVMNodes, heartbeat every `heartbeatSeconds`, take their tasks off their queues in
Redis and write the VM's status as the worker would, and run the real worker's status sync selection
(`mikrom.worker.maintenance.sync_targets`: a LIST of the node's VMs by field selector, then one GET
per VM, as the worker's reconcile does) every `syncIntervalSeconds`. For each node count it reports:

- dispatch: create accepted by the API server -> create message taken off the node's queue, p50/p95
  of the N VMs created from C client threads (missing and duplicated messages counted);
- steady state: API requests per second by verb and resource (deltas of the API server's
  `apiserver_request_total` over `--window` seconds once every VM is Running and every node synced),
  and the operator's RSS (VmRSS from /proc);
then, with the most nodes:
- churn: K VMs restarted every `--churn-interval` seconds (a new `mikrom.io/restartedAt`) for
  `--churn-seconds`: Event writes (creates and count increments) per VM per minute, from the Events'
  counts, against the operator's budget, and status writes per VM and per restart;
- restart: the operator killed with SIGKILL and started again: seconds until the new process has
  reconciled every VM (its gauge `mikrom_operator_microvms_reconciled`, which counts the VMs a
  handler of that process has taken up, reaches the number of VMs), and create messages per uid over
  the whole run (a duplicate would mean a VM created twice).

    .venv/bin/python bench/scale.py [--vms 1000] [--nodes 5,20] [--clients 8] [--window 60]

What the fake nodes leave out, plainly:
  - they boot nothing: no VMM, no tap, no image, no state directory; a VM is "Running" once they
    patch its status (Provisioning then Running, each patch after a GET);
  - their sync runs the worker's real selection (the same function and so the same LIST with
    `fieldSelector=status.node=NODE`) and one GET per VM, but not the worker's reconcile: no local
    observation, no status write when nothing changed (the real one writes none either);
  - heartbeats are one status PATCH of the MicroVMNode each, without the worker's other periodic
    calls (its fence peers' exchange through Redis, the metrics); no Celery beat, so no
    broadcast sync on top of each worker's own loop, no cleanup or health tasks;
  - all nodes are threads of this process with one HTTP connection pool, on one machine that also
    runs the API server, kine (SQLite), Redis and the operator: the figures are this box's, and
    the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import Stack, cpu_seconds, load, rss_mib  # noqa: E402
from dispatch import figures, percentile  # noqa: E402
from harness import fake_worker  # noqa: E402
from harness.scrape import scrape  # noqa: E402
from harness.waits import wait_for  # noqa: E402
from kubernetes import client, config  # noqa: E402

from mikrom import names  # noqa: E402
from mikrom.settings import Settings  # noqa: E402

NS = "bench"
G, V, P = names.GROUP, names.VERSION, names.MICROVMS
T = (5, 60)


def manifest(name: str) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name},
            "spec": {"vcpus": 1, "memoryMiB": 128, "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}


def list_bench_vms(api) -> list[dict]:
    return api.list_namespaced_custom_object(G, V, NS, P, _request_timeout=T).get("items", [])


def phases(api) -> collections.Counter:
    return collections.Counter((vm.get("status") or {}).get("phase") or "New" for vm in list_bench_vms(api))


def rates(before: collections.Counter, after: collections.Counter, seconds: float) -> dict:
    """(verb, resource, subresource) -> requests per second, resource requests only."""
    out = {}
    for key in set(before) | set(after):
        delta = after.get(key, 0) - before.get(key, 0)
        if delta > 0 and key[1]:
            out[key] = delta / seconds
    return out


def print_rates(r: dict, title: str) -> None:
    by_verb: collections.Counter = collections.Counter()
    for (verb, _res, _sub), v in r.items():
        by_verb[verb] += v
    print(f"  {title}: {sum(r.values()):.2f} requests/s; by verb: "
          + ", ".join(f"{verb} {v:.2f}" for verb, v in sorted(by_verb.items())))
    for (verb, res, sub), v in sorted(r.items(), key=lambda kv: -kv[1]):
        print(f"      {verb:7s} {res + ('/' + sub if sub else ''):28s} {v:7.2f}/s")


def event_writes(core, uids: set[str]) -> dict[str, int]:
    """uid -> Event writes recorded on it so far (an Event's count is its create plus its updates)."""
    out = {u: 0 for u in uids}
    for e in core.list_namespaced_event(NS, _request_timeout=T).items:
        uid = e.involved_object.uid
        if uid in out:
            out[uid] += e.count or 1
    return out


def run(args, nodes: int, full: bool, workdir: Path) -> dict:
    settings = Settings.from_env()  # MIKROM_* of this environment, as the operator gets them
    print(f"\n=== {args.vms} MicroVMs on {nodes} fake nodes ({load()}) ===", flush=True)
    stack = Stack.start(workdir, [NS])
    worker = None
    result: dict = {"nodes": nodes}
    try:
        api_client = config.new_client_from_config(config_file=str(stack.cp.kubeconfig))
        api_client.configuration.connection_pool_maxsize = args.clients + 4
        api = client.CustomObjectsApi(api_client)
        core = client.CoreV1Api(api_client)
        worker = fake_worker.FakeWorker(str(stack.cp.kubeconfig), stack.broker,
                                        heartbeat_seconds=settings.heartbeat_seconds,
                                        sync_seconds=settings.sync_interval_seconds, threads=16)
        per_node = -(-args.vms // nodes) + 1
        node_names = [f"scale-{i:02d}" for i in range(nodes)]
        for name in node_names:
            worker.add_node(name, vcpus=per_node, memory_mib=per_node * 128)
        op = stack.operator("operator", NS, env=stack.production_env())

        def create(i: int) -> tuple[str, float]:
            obj = api.create_namespaced_custom_object(G, V, NS, P, manifest(f"vm-{i:05d}" if i >= 0 else "warm-up"),
                                                      _request_timeout=T)
            return obj["metadata"]["uid"], time.time()

        # a warm-up VM, created and deleted: the operator has listed the nodes and connected to Redis
        uid, _ = create(-1)
        wait_for(lambda: worker.messages(uid=uid, task=names.CREATE_VM), 60, "the warm-up VM's message", interval=0.05)
        api.delete_namespaced_custom_object(G, V, NS, P, "warm-up", _request_timeout=T)
        wait_for(lambda: not list_bench_vms(api), 60, "the warm-up VM to go", interval=0.2)

        accepted: dict[str, float] = {}
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            for uid, at in pool.map(create, range(args.vms)):
                accepted[uid] = at
        created_in = time.time() - t0

        def delivered() -> bool:
            got = {m.kwargs["uid"] for m in worker.messages(task=names.CREATE_VM)}
            return set(accepted) <= got

        wait_for(delivered, args.timeout, "every create message", interval=0.2)
        f = figures(worker, accepted)
        result["dispatch"] = f
        print(f"  created {args.vms} in {created_in:.1f} s from {args.clients} clients; "
              f"create accepted -> message on the node's queue: {f.line()}  ({load()})", flush=True)

        wait_for(lambda: phases(api).get("Running", 0) == args.vms, args.timeout, "every VM Running", interval=2)
        print(f"  every VM Running {time.time() - t0:.1f} s after the first create ({load()})", flush=True)
        # steady: every node has run its sync at least once since, and the operator's per-VM timers
        # have all ticked
        synced = dict(worker.syncs)
        wait_for(lambda: all(worker.syncs.get(n, 0) > synced.get(n, 0) for n in node_names),
                 settings.sync_interval_seconds * 3, "every node to sync", interval=0.5)
        before = stack.request_totals()
        start, cpu0 = time.monotonic(), cpu_seconds(op.proc.pid)
        time.sleep(args.window)  # the measurement window: nothing of the benchmark's own talks to the API
        after = stack.request_totals()
        elapsed = time.monotonic() - start
        result["cpu"] = (cpu_seconds(op.proc.pid) - cpu0) / elapsed
        r = rates(before, after, elapsed)
        result["rates"] = r
        result["rss"] = rss_mib(op.proc.pid)
        print_rates(r, f"steady state over {args.window:.0f} s ({load()})")
        per = sum(r.values()) / args.vms
        print(f"  = {per * 60:.2f} requests per VM per minute; operator RSS {result['rss']:.1f} MiB "
              f"(VmRSS, pid {op.proc.pid}); operator CPU {result['cpu'] * 100:.0f}% of a core", flush=True)

        if not full:
            return result

        # ---------------------------------------------------------------- churn
        vms = sorted(list_bench_vms(api), key=lambda vm: vm["metadata"]["name"])[:args.churn_vms]
        churned = {vm["metadata"]["uid"]: vm["metadata"]["name"] for vm in vms}
        ev0 = event_writes(core, set(churned))
        before = stack.request_totals()
        start = time.monotonic()
        restarts = 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while time.monotonic() - start < args.churn_seconds:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
                body = {"metadata": {"annotations": {names.ANNOTATION_RESTARTED_AT: stamp}}}
                list(pool.map(lambda n: api.patch_namespaced_custom_object(G, V, NS, P, n, body, _request_timeout=T),
                              churned.values()))
                restarts += 1
                time.sleep(args.churn_interval)
        elapsed = time.monotonic() - start
        after = stack.request_totals()
        ev1 = event_writes(core, set(churned))
        r = rates(before, after, elapsed)
        status_writes = sum(v for (verb, res, sub), v in r.items() if res == P and sub == "status"
                            and verb in ("PATCH", "UPDATE")) * elapsed
        per_vm_events = {u: ev1[u] - ev0[u] for u in churned}
        worst = max(per_vm_events.values())
        minutes = elapsed / 60
        print(f"\n  churn: {len(churned)} VMs restarted every {args.churn_interval:.1f} s for {elapsed:.0f} s "
              f"({restarts} restarts each; {load()})")
        budget = 20 * -(-elapsed // 60)  # the operator's budget: 20 per object in any 60 s
        print(f"    Event writes per VM: max {worst}, mean {sum(per_vm_events.values()) / len(churned):.1f} in "
              f"{elapsed:.0f} s ({worst / minutes:.1f} per minute; the operator's budget allows {budget:.0f} in "
              f"that time: 20 per object in any 60 s; the fake node records none of its own)")
        print(f"    MicroVM status writes (all writers): {status_writes / len(churned) / minutes:.1f} per VM per "
              f"minute, {status_writes / len(churned) / max(restarts, 1):.1f} per restart requested")
        print_rates(r, "during the churn")
        result["churn"] = {"events_max_per_min": worst / minutes, "events_max": worst, "budget": budget,
                           "status_per_restart": status_writes / len(churned) / max(restarts, 1)}
        wait_for(lambda: phases(api).get("Running", 0) == args.vms, args.timeout, "every VM Running again",
                 interval=2)

        # ---------------------------------------------------------------- restart
        creates_before = len(worker.messages(task=names.CREATE_VM))
        op.kill()
        killed = time.monotonic()
        op.proc.popen.wait(timeout=30)
        op2 = stack.operator("operator-2", NS, env=stack.production_env(), wait=False)
        started = time.monotonic()
        url = f"http://127.0.0.1:{op2.metrics_port}/metrics"

        def caught_up() -> bool:
            try:
                s = scrape(url, timeout=2)
            except OSError:
                return False
            return s.get("mikrom_operator_microvms_reconciled", 0) >= args.vms

        wait_for(caught_up, args.timeout, "the new operator to reconcile every VM", interval=0.1,
                 abort=lambda: None if op2.alive() else f"operator-2 exited:\n{op2.proc.tail(40)}")
        done = time.monotonic()
        result["restart"] = done - started
        # a duplicate create would be sent right after the resume: give it a few seconds to show
        time.sleep(args.after_restart)
        # every uid the node was sent a create for, the warm-up VM's among them: a duplicate is a
        # duplicate whether or not its create was one the clients saw accepted
        counts = collections.Counter(m.kwargs["uid"] for m in worker.messages(task=names.CREATE_VM))
        duplicated = sum(c - 1 for c in counts.values() if c > 1)
        result["duplicates"] = duplicated
        result["rss2"] = rss_mib(op2.proc.pid)
        print(f"\n  restart: SIGKILL, new process started {started - killed:.1f} s later; every one of the "
              f"{args.vms} VMs reconciled by it {done - started:.1f} s after its start ({done - killed:.1f} s "
              f"after the kill; {load()})")
        print(f"    create messages: {creates_before} before the kill (for {len(counts)} uids; the {args.vms} "
              f"VMs and the warm-up VM are {args.vms + 1}), {len(worker.messages(task=names.CREATE_VM)) - creates_before} after; "
              f"uids with more than one: {duplicated}; new operator's RSS {result['rss2']:.1f} MiB")
        for line in duplicate_causes(worker, counts, stack.operators):
            print(f"    {line}")
        for o in stack.operators:
            if o.problems():
                print(f"  {o.name} logged {len(o.problems())} tracebacks: see {o.proc.log}")
                result["tracebacks"] = True
        return result
    finally:
        for o in stack.operators:
            o.stop()  # first, so that they do not see the fake nodes go silent
        stack.operators.clear()
        if worker is not None:
            worker.close()
        stack.close()


def duplicate_causes(worker, counts: collections.Counter, operators) -> list[str]:
    """For each uid sent more than one create: its messages (task id, when received) and the
    operators' `dispatch` records for it (why, attempt, task id), so a duplicate says whether the
    operator sent twice (and why) or one send was delivered twice (one task id, one record)."""
    dups = sorted(uid for uid, c in counts.items() if c > 1)
    records = [(o.name, r) for o in operators for r in o.dispatches()] if dups else []
    out = []
    for uid in dups:
        got = [f"task {m.headers.get('id')} at {m.received_at:.3f}" for m in worker.messages(uid=uid, task=names.CREATE_VM)]
        sent = [f"{name}: why {r.get('why')} attempt {r.get('attempt')} task {r.get('task_id')} at {r.get('sent_at')}"
                for name, r in records if r.get("vm_uid") == uid and r.get("intent") == "create"]
        out.append(f"duplicate {uid}: received {'; '.join(got)}; the operators sent: {'; '.join(sent) or 'nothing logged'}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000, help="MicroVMs (default 1000)")
    parser.add_argument("--nodes", default="5,20", help="node counts to compare, comma-separated; the "
                        "largest also runs churn and restart (default 5,20)")
    parser.add_argument("--clients", type=int, default=8, help="client threads creating the VMs")
    parser.add_argument("--window", type=float, default=60, help="steady-state measurement window, seconds")
    parser.add_argument("--churn-vms", type=int, default=20, help="VMs restarted over and over in the churn")
    parser.add_argument("--churn-seconds", type=float, default=60)
    parser.add_argument("--churn-interval", type=float, default=1.0, help="seconds between restarts of each VM")
    parser.add_argument("--after-restart", type=float, default=5.0,
                        help="seconds to watch for duplicate creates after the restarted operator caught up")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each stage")
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.nodes.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="mikrom-scale-"))
    print(f"Mikrom scale benchmark: {args.vms} MicroVMs, nodes {counts} (logs in {workdir}; {load()})")
    results = []
    began = time.monotonic()
    try:
        for n in counts:
            results.append(run(args, n, n == counts[-1], workdir / f"nodes-{n}"))
    finally:
        if args.keep:
            print(f"\nlogs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n=== summary ({time.monotonic() - began:.0f} s in all; {load()}) ===")
    ok = True
    for res in results:
        f = res["dispatch"]
        ms = [x * 1000 for x in f.latencies]
        total = sum(res["rates"].values())
        vm_reads = sum(v for (verb, r, s), v in res["rates"].items() if r == P and not s and verb in ("LIST", "GET"))
        print(f"  {res['nodes']:3d} nodes: dispatch p50 {percentile(ms, 0.5):.0f} ms p95 {percentile(ms, 0.95):.0f} ms "
              f"(missing {f.missing}, duplicated {f.duplicated}); steady {total:.1f} requests/s "
              f"(MicroVM GET+LIST {vm_reads:.1f}/s); operator RSS {res['rss']:.0f} MiB")
        ok = ok and not f.missing and not f.duplicated and res["rss"] <= 150
    last = results[-1]
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        ratio = sum(hi["rates"].values()) / max(sum(lo["rates"].values()), 1e-9)
        print(f"  requests/s with {hi['nodes']} nodes / with {lo['nodes']} nodes: {ratio:.2f}x "
              f"(nodes x VMs would be {hi['nodes'] / lo['nodes']:.0f}x)")
    if "restart" in last:
        print(f"  restart: every VM reconciled {last['restart']:.1f} s after the new operator started "
              f"(target <= 30 s); duplicate creates {last['duplicates']}")
        ok = ok and last["restart"] <= 30 and not last["duplicates"]
    if "churn" in last:
        print(f"  churn: at most {last['churn']['events_max_per_min']:.1f} Event writes per VM per minute; "
              f"{last['churn']['status_per_restart']:.1f} status writes per restart requested")
        ok = ok and last["churn"]["events_max"] <= last["churn"]["budget"]
    ok = ok and not any(r.get("tracebacks") for r in results)
    print(f"  targets {'met' if ok else 'NOT all met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
