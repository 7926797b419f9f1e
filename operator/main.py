"""`mikrom operator`: run the kopf operator with Mikrom's settings.

- the finalizer is `mikrom.io/finalizer`; kopf keeps its handler progress in annotations under
  `operator.mikrom.io/` (never in status: the strict schema would prune it);
- peering: replicas share a (Cluster)KopfPeering named by `--peering` (created at start if
  missing); each replica takes `MIKROM_PEERING_PRIORITY` or a random priority, so of two replicas
  exactly one is active and the other stands by; `--standalone` runs without peering;
- synchronous handlers run in a pool of `MIKROM_OPERATOR_WORKERS` threads;
- JSON logs on stderr, one object per line; `--liveness` serves kopf's health endpoint.

`MIKROM_NAMESPACE` limits the MicroVMs served to one namespace; MicroVMNodes and IPPools are
cluster-wide and their status counts what the operator serves, so a cluster runs one operator
(with its standby), not one per namespace.
"""

from __future__ import annotations

import logging
import os
import random

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from mikrom import broker, kube, names
from mikrom.settings import Settings

log = logging.getLogger(__name__)

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
STORAGE_PREFIX = "operator.mikrom.io"


def run(standalone: bool = False, liveness: str = "", peering: str = "mikrom", verbose: bool = False) -> int:
    settings = Settings.from_env()
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    if not verbose:
        # kopf logs every handler and timer run at INFO; keep its warnings and errors only
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    _api_client(settings)
    import mikrom.operator.handlers  # noqa: F401 - registers the handlers

    namespaces = [settings.namespace] if settings.namespace else []
    log.info("starting the operator", extra={"namespace": settings.namespace or "*", "peering": None if standalone
                                             else peering, "broker": broker.redacted(settings.broker)})
    kopf.run(
        standalone=standalone,
        peering_name=None if standalone else peering,
        priority=None if standalone else priority(settings),
        liveness_endpoint=liveness or None,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )
    return 0


def priority(settings: Settings) -> int:
    return settings.peering_priority or random.randint(1, 2**31 - 1)


def configure(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Apply Mikrom's choices to kopf's settings (called from the startup handler, so that
    `kopf run` gets them too)."""
    kopf_settings.persistence.finalizer = names.FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=STORAGE_PREFIX)
    kopf_settings.execution.max_workers = settings.operator_workers
    kopf_settings.execution.default_backoff = max(1.0, settings.reconcile_interval_seconds)
    kopf_settings.posting.enabled = False  # the operator records its own Events, one per transition
    kopf_settings.peering.lifetime = settings.peering_lifetime_seconds
    kopf_settings.peering.stealth = True
    if settings.peering_priority:
        kopf_settings.peering.priority = settings.peering_priority
    kopf_settings.scanning.disabled = True  # no permission to watch CRDs or namespaces is needed
    kopf_settings.networking.request_timeout = 60
    kopf_settings.networking.connect_timeout = 10
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330


def ensure_peering(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Create the peering object if it is missing: without it a replica would stay paused."""
    if kopf_settings.peering.standalone:
        return
    name = kopf_settings.peering.name
    api = kube.custom()
    try:
        if kopf_settings.peering.clusterwide:
            api.create_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings",
                {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "ClusterKopfPeering",
                 "metadata": {"name": name}}, _request_timeout=kube.TIMEOUT)
        else:
            api.create_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, settings.namespace, "kopfpeerings",
                {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "KopfPeering",
                 "metadata": {"name": name, "namespace": settings.namespace}}, _request_timeout=kube.TIMEOUT)
        log.info("created the peering object %s", name)
    except ApiException as exc:
        if exc.status != 409:
            log.warning("could not create the peering object %s (%s %s); create it, or run --standalone",
                        name, exc.status, exc.reason)


def _api_client(settings: Settings) -> None:
    """One kubernetes ApiClient for the operator's synchronous calls, with a connection pool as
    large as the thread pool that uses it."""
    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=cfg)  # as mikrom.kube decides
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
    cfg.connection_pool_maxsize = settings.operator_workers + 4
    kube.set_api(client.ApiClient(cfg))
