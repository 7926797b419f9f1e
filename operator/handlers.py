"""The kopf handlers, thin: each one hands the object to the module that decides.

- index handlers feed `state` (so no other handler runs before the initial listing is complete);
- MicroVM: the raw-event handler places a new VM and sends its create in the first cycle that
  sees it; create/update/resume reconcile it (`vms`, which asks `decide`), and so does the
  periodic sweep over the operator's view (`sweep`) while its decision can change with time; a delete
  handler holds the finalizer until the node confirms (`vms.finalize`);
- MicroVMNode: a timer checks the heartbeat and the counts (`nodes`), and drives the sweep;
- Node (core): a cordon keeps new VMs off the MicroVMNode of the same name (`cordons`);
- IPPool: a timer keeps the pool's status current (`pools`);
- watch events for deletions and capacity changes wake the placement sweep (`scheduler`).

`kopf run -m mikrom.operator.handlers` works as well as `mikrom operator`.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from mikrom import metrics, names

from . import apisession, cordons, gctuning, nodes, pools, scheduler, startup, sweep, vms
from .collector import OperatorCollector
from .dispatch import NOTES, DispatchRetry
from .state import SETTINGS, STATE

log = logging.getLogger(__name__)

VMS = (names.GROUP, names.VERSION, names.MICROVMS)
NODES = (names.GROUP, names.VERSION, names.MICROVMNODES)
POOLS = (names.GROUP, names.VERSION, names.IPPOOLS)


_EXECUTOR: list = [None]
"""kopf's thread pool for synchronous handlers (raw-event handlers are not given the settings)."""


@kopf.on.startup()
async def operator_startup(settings: kopf.OperatorSettings, **_) -> None:
    startup.configure(settings, SETTINGS)
    _EXECUTOR[0] = settings.execution.executor
    metrics.register_collector(OperatorCollector())
    metrics.serve(SETTINGS, "operator")
    scheduler.SWEEPER.attach(asyncio.get_running_loop(), settings.execution.executor, _sweep)
    STATE.waker = scheduler.SWEEPER.wake
    await asyncio.get_running_loop().run_in_executor(settings.execution.executor, startup.ensure_peering,
                                                     settings, SETTINGS)
    log.info("garbage collector: %d objects alive at startup frozen", gctuning.freeze())


@kopf.on.login()
async def operator_login(**kwargs):
    return await apisession.login(**kwargs)  # kopf's credentials, a bounded connection pool


@kopf.on.cleanup()
async def operator_cleanup(**_) -> None:
    NOTES.close()  # a backlog of Events must not hold up the exit


def _sweep() -> None:
    for vm in STATE.pending():
        try:
            vms.reconcile(vm, cause="capacity")
        except DispatchRetry:
            pass  # recorded; the periodic sweep retries the send when its backoff is over
        except Exception as exc:  # noqa: BLE001 - one VM must not stop the sweep; the periodic sweep retries
            log.warning("placement of %s/%s failed: %s", vm["metadata"].get("namespace"),
                        vm["metadata"].get("name"), exc)


# ---------------------------------------------------------------------------- the cluster view

@kopf.index(*VMS)
async def microvm_index(body, **_):
    STATE.observe_vm(body)


@kopf.index(*NODES)
async def microvmnode_index(body, **_):
    STATE.observe_node(body)


@kopf.index(*POOLS)
async def ippool_index(body, **_):
    STATE.observe_pool(body)


@kopf.on.event(*VMS)
async def microvm_event(event, body, **_):
    if event["type"] == "DELETED":
        STATE.forget_vm(body["metadata"]["uid"])
        startup.DIFF_BASE.forget(body["metadata"]["uid"])
        return
    if not (body.get("status") or {}).get("node") and not body["metadata"].get("deletionTimestamp"):
        # A VM that needs a node is placed and its create sent now: in the first cycle, kopf adds
        # its finalizer and runs no change handler, so waiting for those would cost a round trip.
        await asyncio.get_running_loop().run_in_executor(_EXECUTOR[0], _place_now, dict(body))
        _advance(event, STATE.vm(body["metadata"]["uid"]))


def _advance(event: dict, known: dict | None) -> None:
    """Bring the resourceVersion and finalizers of the raw event's object up to the newest version
    known (the one this handler's status write left). kopf adds its finalizer after the raw-event
    handlers, with a JSON patch computed from that object and guarded by a test of its
    resourceVersion: on the version as created it would fail (422) and wait for the next event;
    on the version written, whose metadata is the same but for the resourceVersion, it applies at
    once. Should kopf ever work on a copy, it only falls back to that next event."""
    obj = event.get("object")
    if known is None or not isinstance(obj, dict):
        return
    meta, new = obj.get("metadata") or {}, known.get("metadata") or {}
    try:
        newer = int(new.get("resourceVersion") or 0) > int(meta.get("resourceVersion") or 0)
    except ValueError:
        return
    if new.get("uid") != meta.get("uid") or not newer:
        return
    meta["resourceVersion"] = new["resourceVersion"]
    if new.get("finalizers"):
        meta["finalizers"] = list(new["finalizers"])
    else:
        meta.pop("finalizers", None)


def _place_now(body: dict) -> None:
    try:
        vms.reconcile(body, cause="event")
    except DispatchRetry:
        pass  # recorded with its backoff; the create handler or the periodic sweep retries
    except Exception as exc:  # noqa: BLE001 - kopf ignores raw-event errors; the create handler retries
        log.warning("placement of %s/%s failed: %s", body["metadata"].get("namespace"), body["metadata"].get("name"),
                    exc)


@kopf.on.event(*NODES)
async def microvmnode_event(event, body, **_):
    if event["type"] == "DELETED":
        STATE.forget_node(body["metadata"]["name"])


# Kubernetes Nodes: a cordon (spec.unschedulable) keeps new VMs off the MicroVMNode of that name.
# An index, so no VM is placed before the cordons are known; an uncordon wakes the Pending VMs.
CORE_NODES = ("v1", "nodes")


@kopf.index(*CORE_NODES)
async def node_index(body, **_):
    if cordons.observe(body):
        STATE.wake()


@kopf.on.event(*CORE_NODES)
async def node_event(event, body, **_):
    if event["type"] == "DELETED":
        changed = cordons.forget(body["metadata"]["name"])
    else:
        changed = cordons.observe(body)
    if changed:
        STATE.wake()


@kopf.on.event(*POOLS)
async def ippool_event(event, body, **_):
    if event["type"] == "DELETED":
        STATE.forget_pool(body["metadata"]["name"])


# ---------------------------------------------------------------------------- MicroVM

def _reconcile(body, cause: str) -> None:
    try:
        decision = vms.reconcile(dict(body), cause=cause)
    except DispatchRetry as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    if decision.requeue_after:
        raise kopf.TemporaryError("next send after a failed one", delay=decision.requeue_after)


@kopf.on.create(*VMS)
def microvm_create(body, **_):
    _reconcile(body, "create")


@kopf.on.update(*VMS)
def microvm_update(body, **_):
    _reconcile(body, "update")


@kopf.on.resume(*VMS)
def microvm_resume(body, **_):
    _reconcile(body, "resume")


@kopf.on.delete(*VMS)
def microvm_delete(body, retry, **_):
    try:
        decision = vms.finalize(dict(body), retry=retry or 0)
    except DispatchRetry as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from None
    if not decision.finalizer_remove:
        raise kopf.TemporaryError(decision.waiting or "waiting for the node", delay=decision.requeue_after or 1.0)


# ---------------------------------------------------------------------------- MicroVMNode, IPPool

@kopf.timer(*NODES, interval=nodes.check_interval())
def microvmnode_timer(body, **_):
    # No timer per MicroVM: kopf would keep each one's latest body and a task per VM. The node
    # checks drive one sweep over the operator's view instead, paused with them by peering.
    try:
        nodes.reconcile(dict(body))
    finally:
        sweep.SWEEP.tick()


@kopf.timer(*POOLS, interval=SETTINGS.reconcile_interval_seconds)
def ippool_timer(body, **_):
    STATE.touch("pool", body["metadata"]["name"])
    pools.refresh(body["metadata"]["name"])
