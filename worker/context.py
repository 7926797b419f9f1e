"""The worker process's shared parts, built once: settings, node name, locks, runtime, status
writer, node agent and reconciler. Tasks and background loops reach them through `get()`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

# The kubernetes client imports its API classes lazily on first attribute access, and
# core_v1_api alone takes most of a second of CPU to import: on the first Event a task records
# that would block the gevent hub. Importing them here does it before the worker consumes tasks.
from kubernetes.client import (  # noqa: F401
    CoreV1Api,
    CoreV1Event,
    CustomObjectsApi,
    V1ConfigMap,
    V1DeleteOptions,
    V1EventSource,
    V1ObjectMeta,
    V1ObjectReference,
    V1Preconditions,
)

from mikrom import kube, names
from mikrom.settings import Settings

from .locks import NodeLocks
from .runtime import Runtime
from .status import StatusWriter

log = logging.getLogger(__name__)

KUBE_POOL_SIZE = 64
"""HTTP connections to the API server kept open; the gevent pool runs up to 100 tasks at once."""

_lock = threading.Lock()
_ctx: "WorkerContext | None" = None


@dataclass
class WorkerContext:
    settings: Settings
    node: str
    locks: NodeLocks
    runtime: Runtime
    writer: StatusWriter
    agent: object = None
    reconciler: object = None
    started: bool = field(default=False)

    def node_cidr(self) -> str:
        from . import ipalloc

        cidr = self.agent.node_cidr()
        if not cidr:
            raise ipalloc.NoAddressBlock(f"MicroVMNode {self.node} has no spec.cidr yet")
        return cidr

    def schedule_restart(self, vm: dict, delay: float) -> None:
        """Send start_vm_task for `vm` to this node's own queue after `delay` seconds."""
        from mikrom.celery_app import app

        meta = vm["metadata"]
        ref = {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"], "intent": "start"}
        app.send_task(names.START_VM, kwargs=ref, queue=names.node_queue(self.node),
                      countdown=max(0.0, delay) + 0.5)

    def start_background(self) -> None:
        """Registration, heartbeats and the periodic sync (idempotent)."""
        with _lock:
            if self.started:
                return
            self.started = True
        from .vmm import base as vmmbase

        try:
            vmmbase.prestart_fork_server()  # so that no create waits for its start
        except OSError as exc:
            log.warning("cannot start the supervisor fork server (%s); each VMM launch starts a process", exc)
        # the first create's placement watch then finds its connection made (placement_wait.py)
        threading.Thread(target=kube.warm_watch_connection, name="warm-watch", daemon=True).start()
        self.agent.start()


def build(settings: Settings | None = None) -> WorkerContext:
    from .node import NodeAgent
    from .reconcile import Reconciler

    settings = settings or Settings.from_env()
    _configure_kube()
    state = Path(settings.state_dir)
    locks = NodeLocks(state / "locks")
    ctx = WorkerContext(settings=settings, node=settings.node_name, locks=locks,
                        runtime=Runtime(settings, locks), writer=StatusWriter(settings.node_name))
    ctx.agent = NodeAgent(ctx)
    ctx.reconciler = Reconciler(ctx)
    return ctx


def get() -> WorkerContext:
    global _ctx
    with _lock:
        if _ctx is None:
            _ctx = build()
        return _ctx


def _configure_kube() -> None:
    """A kubernetes client with a connection pool sized for the gevent pool (the default keeps
    5 per CPU and would open and discard connections under load)."""
    import os

    from kubernetes import client, config

    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
    cfg.connection_pool_maxsize = KUBE_POOL_SIZE
    kube.set_api(client.ApiClient(cfg))
