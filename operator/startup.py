"""kopf's settings as Mikrom chooses them, and the peering object a replica needs.

Called from the startup handler (so that `kopf run -m mikrom.operator.handlers` gets them too).
The watch-to-message path is tuned for latency; `configure` says how and why.
"""

from __future__ import annotations

import logging
import sys
import threading

import kopf
from kubernetes.client.rest import ApiException

from mikrom import kube, names
from mikrom.settings import Settings

from . import malloctune

log = logging.getLogger(__name__)

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
STORAGE_PREFIX = names.OPERATOR_STORAGE_PREFIX
IDLE_WORKER_SECONDS = 5.0
"""Seconds kopf's worker task for one object outlives that object's last watch event."""
SWITCH_INTERVAL = 0.001
"""Seconds between the interpreter's thread switches (default 0.005)."""
DIFF_BASE_REMEMBERED = 200000
"""Diff bases kept at most; one forgotten only makes kopf treat its object's next event as a
creation (a reconcile that finds nothing to do)."""


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """kopf's diff base per object uid, in memory (see `configure`). Thread-safe."""

    def __init__(self, limit: int = DIFF_BASE_REMEMBERED) -> None:
        super().__init__()
        self._limit = limit
        self._lock = threading.Lock()
        self._essences: dict[str, kopf.BodyEssence] = {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        with self._lock:
            return self._essences.get(body.metadata.uid or "")

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        uid = body.metadata.uid or ""
        with self._lock:
            self._essences.pop(uid, None)
            self._essences[uid] = essence
            while len(self._essences) > self._limit:
                del self._essences[next(iter(self._essences))]

    def forget(self, uid: str) -> None:
        with self._lock:
            self._essences.pop(uid, None)


DIFF_BASE = MemoryDiffBaseStorage()


class UnmarkedAnnotationsProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's annotations progress storage, without its branding marker.

    kopf adds `<prefix>/kopf-managed: yes` to an object the first time a handler's progress is
    stored, only to make the prefix recognisable; on every new MicroVM that was one more patch
    (and one more watch event for the operator and the node's worker) after kopf's finalizer. A
    handler that succeeds at once leaves no progress, so nothing else is written."""

    def _store_marker(self, prefix, patch, body) -> None:  # noqa: ANN001 - kopf's signature
        return None


def configure(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Apply Mikrom's choices to kopf's settings (called from the startup handler, so that
    `kopf run` gets them too)."""
    kopf_settings.persistence.finalizer = names.FINALIZER
    # kopf adds the finalizer to every MicroVM (its delete handler and timer need it) in the cycle
    # right after the raw-event handler sent the create (docs/protocol.md, Dispatch).
    # Handler progress (retries of a handler that failed) goes in annotations, not status: the
    # strict status schema would prune it, and a status write is ours alone (one merge patch per
    # decision). A handler that succeeds at once leaves none, and
    # no kopf-managed marker is added either (`UnmarkedAnnotationsProgressStorage`).
    kopf_settings.persistence.progress_storage = UnmarkedAnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    # The diff base (the spec as last handled, which tells kopf an update from a mere status change)
    # stays in this process's memory: kept in an annotation it was one more write after every
    # create and spec change, competing with the status writes that carry dispatches. Nothing
    # depends on it surviving a restart: create, update and resume are one level-triggered
    # reconcile, so an object with no diff base (after a restart) is a creation, which reconciles it.
    kopf_settings.persistence.diffbase_storage = DIFF_BASE
    # Latency. A new VM is placed and its create sent from the raw-event handler of the first cycle
    # that sees it: in that cycle kopf only adds its finalizer and runs no change handler, and the
    # next cycle's change handlers may wait up to `consistency_timeout` for kopf's own patch to
    # come back. Raw-event handlers wait for neither, so the message leaves one status write after
    # the watch event; kopf's finalizer patch follows it. kopf >= 1.40 has no time-based batching
    # any more (`batching.batch_window` is deprecated and ignored), so there is no window to
    # shorten; `batching.worker_limit` stays unlimited (one worker task per object: a burst of new
    # VMs is handled side by side, up to the thread pool). An object's worker task stays this long
    # after its last event, so the events that follow a create (our status write, kopf's finalizer,
    # within a second) reuse it. No longer: an idle worker holds its object's last watch event, its
    # queue and its task, and with 30 s a burst of 1,000 new VMs kept all 1,000 alive together
    # (some 7 MiB that the allocator keeps once the burst is over). A later event (the node's
    # status writes) starts a new worker, which costs no API call; kopf keeps a worker past this
    # while it waits for its own patch to come back (`consistency_timeout`).
    kopf_settings.queueing.idle_timeout = IDLE_WORKER_SECONDS
    # A handler thread whose API or Redis answer has arrived waits for the interpreter lock while
    # the event loop parses watch events; at the default 5 ms per hand-over, the few hand-overs of
    # one write and one send added tens of milliseconds under load.
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Memory: large blocks (TLS buffers, watch chunks) given back once a burst is over.
    malloctune.fix_mmap_threshold()
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


