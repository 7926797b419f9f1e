"""The worker's Celery tasks, under the original Mikrom guide's names.

VM tasks (`create_vm_task`, `delete_vm_task`, `stop_vm_task`, `start_vm_task`, `restart_vm_task`)
take exactly the keyword arguments of `mikrom.models.VMRef` and are thin, like web views: unpack
the reference, drop it unless it names a real MicroVM (worker/messages.py), forward it if it
belongs to another node, take the VM's lock, call the reconciler, decide about a retry. They are
idempotent "make it so" operations: the intent is only a hint, the reconciler acts on the object
read from the API server when the message arrived (docs/protocol.md).

Beat tasks: `sync_vm_status` and `cleanup_old_vms` are broadcast (each node does its own),
`health_check` and `generate_report` run on whichever worker takes them. They take no arguments:
what they touch comes from the settings, and arguments in a message are ignored with a warning.

    from mikrom.worker.tasks import create_vm_task
    create_vm_task.delay(namespace="team-a", name="web-1", uid="…")   # forwarded to the VM's node
"""

from __future__ import annotations

import logging
import os
import threading

from celery import signals, states
from pydantic import ValidationError

from mikrom import kube, metrics, names
from mikrom.celery_app import app
from mikrom.models import VMRef

from . import context, errors, maintenance, messages, placement_wait, timing
from .collector import WorkerCollector

log = logging.getLogger(__name__)


def lock_wait_seconds(settings) -> float:
    """How long a task waits for another operation on the same VM: one boot plus two stops and
    some slack (a restart is a stop and a boot), within the hard time limit."""
    wanted = settings.boot_timeout_seconds + 2 * settings.stop_timeout_seconds + 30
    return max(5.0, min(wanted, settings.task_time_limit * 0.6))


def _ref(intent: names.Intent, args: tuple, kwargs: dict) -> VMRef:
    if args:
        raise ValueError("VM tasks take keyword arguments only: namespace, name, uid (and intent)")
    return VMRef(**{"intent": intent.value, **kwargs})


def _forward_target(ctx, task, vm: dict) -> str | None:
    """The node a message about `vm` (checked to match it) should be forwarded to, or None to
    handle it here.

    Only a message that did not arrive on this node's own queue is looked at (one typed by a person
    lands on the default queue): if its VM is placed on another node it goes to that node's queue.
    A message on our own queue is always handled here, so forwarding can never loop.
    """
    arrived = (task.request.delivery_info or {}).get("routing_key")
    if arrived == names.node_queue(ctx.node):
        return None
    node = (vm.get("status") or {}).get("node")
    if not node:
        return ""  # not placed yet: the operator dispatches it once it is
    return None if node == ctx.node else node


def run_vm_task(task, intent: names.Intent, args: tuple, kwargs: dict) -> dict:
    started = _record_started(task)
    try:
        return _run_vm_task(task, intent, args, kwargs)
    finally:
        if started is not None:
            started.join(STARTED_JOIN_SECONDS)
            if started.is_alive():
                log.warning("%s[%s]: the STARTED state was not stored within %.0fs", task.name, task.request.id,
                            STARTED_JOIN_SECONDS)


STARTED_JOIN_SECONDS = 10.0
"""How long a VM task's end waits for its STARTED state to be stored (a few Redis timeouts)."""


def _record_started(task) -> threading.Thread | None:
    """Store the task's STARTED state (`pid`, `hostname`), as Celery's `task_track_started` does,
    beside the task instead of before it: that store is a read and a write on the result backend,
    and a VM's first steps need not wait for them. The task joins it before it returns, so its
    own result is always stored after it and never overwritten by it."""
    request = task.request
    if request.is_eager or task.ignore_result or getattr(request, "ignore_result", False):
        return None

    def store():
        try:
            task.backend.store_result(request.id, {"pid": os.getpid(), "hostname": request.hostname},
                                      states.STARTED, request=request)
        except Exception as exc:  # noqa: BLE001 - a state for Flower and result.status, never the VM's
            log.warning("%s[%s]: storing its STARTED state failed: %s", task.name, request.id, exc)

    thread = threading.Thread(target=store, name=f"started-{request.id}", daemon=True)
    thread.start()
    return thread


def _run_vm_task(task, intent: names.Intent, args: tuple, kwargs: dict) -> dict:
    try:
        ref = _ref(intent, args, kwargs)
    except (ValidationError, ValueError, TypeError) as exc:
        # a malformed message will not improve by retrying it
        log.error("%s rejected: %s", task.name, exc)
        return {"outcome": "rejected", "error": str(exc)[:500]}
    ctx = context.get()
    token = timing.begin(f"{task.name} {ref.namespace}/{ref.name}")
    try:
        vm = kube.get_vm(ref.namespace, ref.name)
        timing.mark("get")
        why = messages.mismatch(ref.namespace, ref.name, ref.uid, vm, lambda: _recorded(ctx, ref.uid))
        timing.mark("verified")
        if why:
            # a stale or forged message: nothing is done for it, least of all a teardown of the uid
            log.warning("%s for %s/%s (uid %r) dropped: %s", task.name, ref.namespace, ref.name, ref.uid, why)
            return {"outcome": f"dropped: {messages.GENERIC}", "uid": ref.uid}
        target = _forward_target(ctx, task, vm)
        if target == "":
            return {"outcome": "dropped: not placed on a node yet", "uid": ref.uid}
        if target:
            app.send_task(task.name, kwargs=ref.model_dump(mode="json"), queue=names.node_queue(target))
            log.info("%s for %s/%s forwarded to %s", task.name, ref.namespace, ref.name, names.node_queue(target))
            return {"outcome": f"forwarded to {target}", "uid": ref.uid}
        pending = None
        if intent is names.Intent.CREATE and not placement_wait.settled(vm):
            # sent just before the operator records the placement: acted on only once that names
            # this node (the reconciler prepares a new VM meanwhile, and starts nothing before)
            pending = placement_wait.Pending(vm, ctx.node, ctx.settings.placement_wait_seconds)
        # the uid is this object's; should the object go while we wait for the lock, it is gone for
        # good (a uid never returns) and the reconciler may remove what the node holds for it. The
        # object just read is the reconciler's too (one GET per message): its first status write
        # checks that the object did not change meanwhile.
        try:
            outcome = ctx.reconciler.reconcile_locked(ref.namespace, ref.name, ref.uid,
                                                      lock_wait_seconds(ctx.settings), known=vm, pending=pending)
        except placement_wait.NotPlacedHere as exc:
            log.warning("%s for %s/%s (uid %r) dropped: %s", task.name, ref.namespace, ref.name, ref.uid, exc)
            return {"outcome": f"dropped: {exc}", "uid": ref.uid}
    except Exception as exc:
        if errors.is_transient(exc) and task.request.retries < errors.MAX_RETRIES:
            delay = errors.backoff(task.request.retries)
            log.warning("%s for %s/%s: %s; retry %d in %.1fs", task.name, ref.namespace, ref.name, exc,
                        task.request.retries + 1, delay)
            raise task.retry(exc=exc, countdown=delay, max_retries=errors.MAX_RETRIES)
        raise
    finally:
        timing.done(token)
    return {"outcome": outcome, "node": ctx.node, "uid": ref.uid, "intent": ref.intent}


def _recorded(ctx, uid: str) -> dict:
    """What this node recorded for `uid` when it started its VM (namespace, name), or {}."""
    local = ctx.runtime.local(uid)
    return local.read_meta() if local.exists() else {}


# STARTED is stored by the task itself, beside its first steps (_record_started)
_VM_TASK_OPTIONS = dict(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=errors.MAX_RETRIES,
                        track_started=False)


@app.task(name=names.CREATE_VM, **_VM_TASK_OPTIONS)
def create_vm_task(self, *args, **kwargs):
    """Make the VM exist and run (unless runStrategy is Halted)."""
    return run_vm_task(self, names.Intent.CREATE, args, kwargs)


@app.task(name=names.DELETE_VM, **_VM_TASK_OPTIONS)
def delete_vm_task(self, *args, **kwargs):
    """Remove the VM, its tap and its files; confirm with status.cleanedUpAt."""
    return run_vm_task(self, names.Intent.DELETE, args, kwargs)


@app.task(name=names.STOP_VM, **_VM_TASK_OPTIONS)
def stop_vm_task(self, *args, **kwargs):
    """Stop the VM (runStrategy Halted)."""
    return run_vm_task(self, names.Intent.STOP, args, kwargs)


@app.task(name=names.START_VM, **_VM_TASK_OPTIONS)
def start_vm_task(self, *args, **kwargs):
    """Start the VM again (runStrategy no longer Halted, or a restart after backoff)."""
    return run_vm_task(self, names.Intent.START, args, kwargs)


@app.task(name=names.RESTART_VM, **_VM_TASK_OPTIONS)
def restart_vm_task(self, *args, **kwargs):
    """Restart the VM because mikrom.io/restartedAt changed."""
    return run_vm_task(self, names.Intent.RESTART, args, kwargs)


# ------------------------------------------------------------------------------------ beat

def _no_arguments(name: str, args: tuple, kwargs: dict) -> None:
    """Beat tasks act on the settings only: whatever a message adds is ignored, and said so."""
    if args or kwargs:
        keys = [str(k)[:40] for k in list(kwargs)[:10]]
        log.warning("%s takes no arguments: ignored %d positional and %d keyword argument(s) %r from the message; "
                    "it acts on the settings only", name, len(args), len(kwargs), keys)


@app.task(name=names.SYNC_VM_STATUS)
def sync_vm_status(*args, **kwargs):
    """Broadcast: this node reconciles all its VMs (drift, run strategy, Unknown re-reported)."""
    _no_arguments(names.SYNC_VM_STATUS, args, kwargs)
    return maintenance.sync_node(context.get(), lock_timeout=1.0)


@app.task(name=names.CLEANUP_OLD_VMS)
def cleanup_old_vms(*args, **kwargs):
    """Broadcast: delete MicroVMs past ttlSecondsAfterFinished; remove this node's orphans older
    than `MIKROM_ORPHAN_MIN_AGE_SECONDS`."""
    _no_arguments(names.CLEANUP_OLD_VMS, args, kwargs)
    ctx = context.get()
    return maintenance.cleanup(ctx, orphan_min_age=ctx.settings.orphan_min_age_seconds)


@app.task(name=names.HEALTH_CHECK)
def health_check(*args, **kwargs):
    """Heartbeat age, broker, stuck transitional VMs and queue depths, as seen from this node."""
    _no_arguments(names.HEALTH_CHECK, args, kwargs)
    return maintenance.health(context.get())


def report_namespace(settings) -> str:
    return settings.report_namespace or os.environ.get("POD_NAMESPACE") or "mikrom"


@app.task(name=names.GENERATE_REPORT)
def generate_report(*args, **kwargs):
    """Fleet summary (VMs per phase and node, failures) into the ConfigMap mikrom-fleet-report of
    `MIKROM_REPORT_NAMESPACE`, by default the worker's namespace (POD_NAMESPACE, else `mikrom`)."""
    _no_arguments(names.GENERATE_REPORT, args, kwargs)
    ctx = context.get()  # configures the API client
    ns = report_namespace(ctx.settings)
    report = maintenance.fleet_report(ns)
    metrics.FLEET_VMS.clear()
    for phase, count in report["phases"].items():
        metrics.FLEET_VMS.labels(phase).set(count)
    return {"namespace": ns, "configMap": maintenance.REPORT_CONFIGMAP, "vmCount": report["vmCount"],
            "phases": report["phases"]}


# ------------------------------------------------------------------------------------ process

@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger=None, **_):
    """MIKROM_LOG_FORMAT=json: one JSON object per line from the worker and its tasks."""
    if app.conf.get("mikrom_log_format", "text") != "json" or logger is None:
        return
    from pythonjsonlogger.json import JsonFormatter  # kopf's dependency; the operator logs through it too

    formatter = JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                              rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
    for handler in logger.handlers:
        handler.setFormatter(formatter)


@signals.task_postrun.connect
def _count_task(sender=None, state=None, **_):
    metrics.TASKS.labels(getattr(sender, "name", "unknown"), state or "UNKNOWN").inc()


@signals.worker_init.connect
def _share_the_result_backend(sender=None, **_):
    """One result backend (one Redis connection pool) for the whole worker.

    Celery keeps the backend per thread, and under the gevent pool every task runs in a greenlet
    of its own, which counts as a new thread: each task would build a RedisBackend (reading the
    redis package's metadata from disk) and open a Redis connection of its own, just to store its
    STARTED state and its result. redis-py's client is safe to share; a worker never waits on a
    result, so the backend's result consumer, which is not, goes unused."""
    if getattr(sender, "app", app) is app:
        app.conf.result_backend_thread_safe = True


@signals.worker_ready.connect
def _start_node_agent(sender=None, **_):
    """Register the node, heartbeat, adopt running VMs: in background greenlets; serve metrics."""
    if getattr(sender, "app", app) is not app:
        return  # another Celery app's worker in this process (signals are global)
    try:
        ctx = context.get()
        metrics.register_collector(WorkerCollector(ctx))
        metrics.serve(ctx.settings, "worker")
        ctx.start_background()
    except Exception:  # a broken kubeconfig must show in the log, not vanish in a signal handler
        log.exception("cannot start the node agent (registration, heartbeats, adoption)")
        raise


@signals.worker_shutting_down.connect
def _stop_node_agent(sender=None, **_):
    ctx = context._ctx
    if ctx is not None and ctx.agent is not None:
        ctx.agent.stop()
