"""The level-triggered maintenance behind the beat tasks (DESIGN.md section 6).

- `sync_node`: every VM assigned to this node is reconciled (state directory and live process
  against the API object): drift fixed, run strategy applied, `Unknown` re-reported.
- `cleanup`: MicroVMs past `ttlSecondsAfterFinished` are deleted; orphans (state directories,
  VMM processes and taps with no MicroVM assigned here) are removed once older than a minimum age,
  so nothing that a task is creating right now is mistaken for one.
- `health`: this node's view of heartbeats, the broker, stuck VMs and queue depths.
- `fleet_report`: VMs per phase and node and recent failures, as a ConfigMap.

Every per-node task lists only its node's VMs (`assigned`: a field selector on `status.node`), so
the API server's load from the workers grows with the VMs, not with nodes x VMs; only the fleet
report, one task for the whole cluster, lists them all.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client
from kubernetes.client.rest import ApiException

from mikrom import broker, conditions, kube, names
from mikrom.names import Phase

from . import netdev
from .locks import LockTimeout
from .runtime import kill_pid
from .state import dir_age_seconds, local_uids, process_age_seconds, vmm_processes

log = logging.getLogger(__name__)

SYNC_PARALLEL = 4
ORPHAN_MIN_AGE_SECONDS = 300.0
REPORT_CONFIGMAP = "mikrom-fleet-report"
TRANSITIONAL = (Phase.SCHEDULED.value, Phase.PROVISIONING.value, Phase.STOPPING.value)


def node_field_selector(node: str) -> str:
    """The field selector of the MicroVMs placed on `node` (`status.node` is a selectable field of
    the MicroVM CRD): the API server sends a node only its own VMs, so a worker's periodic work
    costs it that node's VMs, not every VM in the cluster on every node."""
    return f"status.node={node}"


def assigned(node: str, api: client.CustomObjectsApi | None = None) -> list[dict]:
    """The MicroVMs placed on `node`, as the API server has them now (one LIST, filtered there)."""
    res = (api or kube.custom()).list_cluster_custom_object(
        names.GROUP, names.VERSION, names.MICROVMS, field_selector=node_field_selector(node),
        _request_timeout=kube.TIMEOUT)
    # checked again here: what the callers treat as this node's must say so itself
    return [vm for vm in res.get("items", []) if (vm.get("status") or {}).get("node") == node]


def sync_targets(node: str, held: dict[str, dict], api: client.CustomObjectsApi | None = None) -> list[dict]:
    """What a node's status sync reconciles: every VM placed on `node`, plus a reference to every
    VM it holds (`held`: uid -> {namespace, name} as this node recorded them when it started them)
    that is not among those: placed on another node while this one was lost, or deleted. The
    reconcile of such a reference re-reads that one object (a GET) under the VM's lock, and removes
    what this node holds if it is elsewhere or gone. Held VMs are few; the cluster's are many."""
    vms = assigned(node, api)
    listed = {vm["metadata"]["uid"] for vm in vms}
    refs = [{"metadata": {"namespace": ref["namespace"], "name": ref["name"], "uid": uid}}
            for uid, ref in sorted(held.items()) if uid not in listed]
    return vms + refs


def reconcile_locked(ctx, namespace: str, name: str, uid: str, lock_timeout: float) -> str:
    """Reconcile one VM under its lock; the lock file goes once nothing is left for the VM."""
    with ctx.locks.hold(uid, timeout=lock_timeout) as held:
        outcome = ctx.reconciler.reconcile(namespace, name, uid)
        held.remove = not ctx.runtime.local(uid).exists()
        return outcome


def _held(ctx) -> dict[str, dict]:
    """The VMs this node holds (a state directory), by uid, named as this node recorded them when
    it started them, never as a message claimed. A directory without that record (a task is
    creating it right now, or it is an orphan) is left to its task and to `cleanup`."""
    refs = {}
    for uid in local_uids(ctx.runtime.vms_dir):
        meta = ctx.runtime.local(uid).read_meta()
        if meta.get("uid") == uid and meta.get("namespace") and meta.get("name"):
            refs[uid] = {"namespace": meta["namespace"], "name": meta["name"]}
    return refs


def sync_node(ctx, lock_timeout: float = 0.5) -> dict:
    """Reconcile every VM assigned to this node, every VM this node still holds that is now
    assigned elsewhere (placed on another node while this one was lost: reconciling it re-reads the
    object under its lock and removes what this node held), and every VM it holds whose object is
    gone. A VM busy with a task is left to it. The API cost is one LIST of this node's VMs and one
    GET per VM reconciled (`sync_targets`), whatever the size of the cluster."""
    mine = sync_targets(ctx.node, _held(ctx))

    def one(vm: dict) -> str:
        meta = vm["metadata"]
        try:
            return reconcile_locked(ctx, meta["namespace"], meta["name"], meta["uid"], lock_timeout)
        except LockTimeout:
            return "busy"
        except Exception as exc:  # noqa: BLE001 - one VM's trouble must not stop the others
            log.warning("sync of %s/%s failed: %s", meta["namespace"], meta["name"], exc)
            return f"error: {exc}"

    with ThreadPoolExecutor(max_workers=SYNC_PARALLEL) as pool:
        outcomes = list(pool.map(one, mine))
    summary: dict[str, int] = {}
    for outcome in outcomes:
        key = outcome.split(":", 1)[0].split(";", 1)[0]
        summary[key] = summary.get(key, 0) + 1
    return {"node": ctx.node, "vms": len(mine), "outcomes": summary}


def cleanup(ctx, orphan_min_age: float = ORPHAN_MIN_AGE_SECONDS) -> dict:
    runtime = ctx.runtime
    # taps first, then directories: a tap is made after its VM's directory, so a tap that has no
    # directory in the later listing really is an orphan
    taps = netdev.list_taps(runtime.netns)
    vms = assigned(ctx.node)
    mine = {vm["metadata"]["uid"] for vm in vms}
    done = {"expired": [], "orphanDirs": [], "orphanProcesses": [], "orphanTaps": []}

    for vm in vms:
        ttl = (vm.get("spec") or {}).get("ttlSecondsAfterFinished")
        status = vm.get("status") or {}
        if ttl is None or vm["metadata"].get("deletionTimestamp"):
            continue
        if status.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value) and status.get("finishedAt"):
            age = conditions.age_seconds(status["finishedAt"])
            if age is not None and age >= ttl:
                _delete_vm(vm)
                done["expired"].append(f"{vm['metadata']['namespace']}/{vm['metadata']['name']}")

    local = local_uids(runtime.vms_dir)
    for uid in local:
        if uid in mine:
            continue
        if dir_age_seconds(runtime.local(uid).dir) < orphan_min_age:
            continue
        try:
            with ctx.locks.hold(uid, timeout=1.0) as held:
                runtime.teardown(uid)
                held.remove = True
            done["orphanDirs"].append(uid)
        except LockTimeout:
            continue

    for uid, pids in vmm_processes(runtime.vms_dir).items():
        if uid in mine or runtime.local(uid).exists():
            continue
        for pid in pids:
            if process_age_seconds(pid) >= orphan_min_age:
                kill_pid(pid)
                done["orphanProcesses"].append(pid)

    known_taps = {netdev.tap_name_for_uid(uid) for uid in set(local) | mine}
    for tap in taps:
        if tap not in known_taps:
            netdev.delete_tap(tap, runtime.netns)
            done["orphanTaps"].append(tap)
    if any(done.values()):
        log.info("cleanup on %s: %s", ctx.node, done)
    return {"node": ctx.node, **done}


def _delete_vm(vm: dict) -> None:
    meta = vm["metadata"]
    try:
        kube.custom().delete_namespaced_custom_object(
            names.GROUP, names.VERSION, meta["namespace"], names.MICROVMS, meta["name"],
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=meta["uid"])),
            _request_timeout=kube.TIMEOUT)
        kube.event(vm, "TTLExpired", "deleted: ttlSecondsAfterFinished has passed", component="mikrom-worker")
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise


def health(ctx) -> dict:
    """This node's health as seen from here; warnings are logged, the dict is the task's result."""
    settings = ctx.settings
    agent = ctx.agent
    report: dict = {"node": ctx.node, "fenced": agent.fenced,
                    "heartbeatAgeSeconds": round(time.monotonic() - agent.last_ok, 1),
                    "localVMs": len(local_uids(ctx.runtime.vms_dir))}
    problems = []
    try:
        broker.check(settings.broker, timeout=settings.redis_timeout_seconds, settings=settings)
        r = broker.client(settings.broker, timeout=settings.redis_timeout_seconds, settings=settings)
        with r:
            report["queueDepth"] = {q: r.llen(q) for q in (names.node_queue(ctx.node), names.DEFAULT_QUEUE)}
    except broker.BrokerUnavailable as exc:
        problems.append(str(exc))
    stuck = []
    try:
        for vm in assigned(ctx.node):
            status = vm.get("status") or {}
            if status.get("phase") not in TRANSITIONAL or ctx.locks.held_here(vm["metadata"]["uid"]):
                continue
            ready = conditions.get(status.get("conditions"), names.READY) or {}
            age = conditions.age_seconds(ready.get("lastTransitionTime") or vm["metadata"].get("creationTimestamp"))
            if age is not None and age > settings.progress_timeout_seconds:
                stuck.append(f"{vm['metadata']['namespace']}/{vm['metadata']['name']} {status.get('phase')} "
                             f"for {age:.0f}s")
                ctx.agent.sync_wanted.set()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"API server: {exc}")
    report["stuck"] = stuck
    if report["heartbeatAgeSeconds"] > 3 * settings.heartbeat_seconds:
        problems.append(f"heartbeat is {report['heartbeatAgeSeconds']}s old")
    report["problems"] = problems
    report["healthy"] = not problems and not stuck
    (log.info if report["healthy"] else log.warning)("health of %s: %s", ctx.node, report)
    return report


def summarize(vms: list[dict], nodes: list[dict], failures_max: int = 50) -> dict:
    """The fleet summary: VMs per phase and per node, node heartbeats, recent failures (pure)."""
    totals: dict[str, int] = {}
    by_node: dict[str, dict] = {}
    failures = []
    for vm in vms:
        status = vm.get("status") or {}
        phase = status.get("phase") or "New"
        totals[phase] = totals.get(phase, 0) + 1
        node = status.get("node") or "(unplaced)"
        entry = by_node.setdefault(node, {"phases": {}, "vcpus": 0, "memoryMiB": 0})
        entry["phases"][phase] = entry["phases"].get(phase, 0) + 1
        if phase not in (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.STOPPED.value):
            entry["vcpus"] += int((vm.get("spec") or {}).get("vcpus", 0))
            entry["memoryMiB"] += int((vm.get("spec") or {}).get("memoryMiB", 0))
        if phase == Phase.FAILED.value:
            failures.append({"vm": f"{vm['metadata']['namespace']}/{vm['metadata']['name']}",
                             "reason": status.get("reason"), "message": (status.get("message") or "")[:300],
                             "at": status.get("finishedAt")})
    failures.sort(key=lambda f: f.get("at") or "", reverse=True)
    node_info = {}
    for n in nodes:
        st = n.get("status") or {}
        node_info[n["metadata"]["name"]] = {
            "ready": conditions.is_true(st.get("conditions"), names.READY),
            "lastHeartbeatTime": st.get("lastHeartbeatTime"), "capacity": st.get("capacity"),
            "schedulable": (n.get("spec") or {}).get("schedulable", True)}
    return {"generatedAt": conditions.now(), "vmCount": len(vms), "phases": totals, "byNode": by_node,
            "nodes": node_info, "failures": failures[:failures_max]}


def fleet_report(namespace: str) -> dict:
    vms = kube.list_vms()
    nodes = kube.custom().list_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMNODES,
                                                     _request_timeout=kube.TIMEOUT).get("items", [])
    report = summarize(vms, nodes)
    lines = [f"{k}: {v}" for k, v in sorted(report["phases"].items())]
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=REPORT_CONFIGMAP, namespace=namespace,
                                     labels={"app.kubernetes.io/part-of": "mikrom",
                                             "app.kubernetes.io/component": "worker"}),
        data={"report.json": json.dumps(report, indent=1, sort_keys=True),
              "summary.txt": f"{report['vmCount']} MicroVMs at {report['generatedAt']}\n" + "\n".join(lines) + "\n"})
    core = kube.core()
    try:
        core.replace_namespaced_config_map(REPORT_CONFIGMAP, namespace, body, _request_timeout=kube.TIMEOUT)
    except ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespaced_config_map(namespace, body, _request_timeout=kube.TIMEOUT)
    return report
