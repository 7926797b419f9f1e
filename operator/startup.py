"""kopf's settings as Mikrom chooses them, and the peering object a replica needs.

Called from the startup handler (so that `kopf run -m mikrom.operator.handlers` gets them too).
The watch-to-message path is tuned for latency; `configure` says how and why.
"""

from __future__ import annotations

import logging

import kopf
from kubernetes.client.rest import ApiException

from mikrom import kube, names
from mikrom.settings import Settings

log = logging.getLogger(__name__)

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
STORAGE_PREFIX = "operator.mikrom.io"


def configure(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Apply Mikrom's choices to kopf's settings (called from the startup handler, so that
    `kopf run` gets them too)."""
    kopf_settings.persistence.finalizer = names.FINALIZER
    # Progress and the diff base go in annotations, not status: the strict status schema would prune
    # them, and a status write is ours alone (one merge patch per decision). kopf writes them after
    # the handler returned, so they never stand between a create and its message.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=STORAGE_PREFIX)
    # Latency. A new VM is placed and its create sent from the raw-event handler of the first cycle
    # that sees it: in that cycle kopf only adds its finalizer and runs no change handler, and the
    # next cycle's change handlers may wait up to `consistency_timeout` for kopf's own patch to
    # come back. Raw-event handlers wait for neither, so the message leaves one finalizer write
    # and one status write after the watch event. kopf >= 1.40 has no time-based batching any more
    # (`batching.batch_window` is deprecated and ignored), so there is no window to shorten.
    # An object's worker task stays this long after its last event (default 5 s), so the burst of
    # events that follows a create (our writes, kopf's annotations) reuses it.
    kopf_settings.queueing.idle_timeout = 30.0
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


