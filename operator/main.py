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

from mikrom import broker, kube
from mikrom.settings import Settings

log = logging.getLogger(__name__)

def run(standalone: bool = False, liveness: str = "", peering: str = "mikrom", verbose: bool = False) -> int:
    settings = Settings.from_env()
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    if not verbose:
        # kopf logs every handler and timer run at INFO; keep its warnings and errors only
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    _api_client(settings)
    from . import handlers  # noqa: F401 - registers the handlers (imported here: it reads the settings at import)

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
