"""Kubernetes access shared by the operator and the worker: client configuration, status patches
and Events, every call with a timeout.

Synchronous (the kubernetes client): the worker runs it under gevent's monkey-patching, the
operator from kopf's thread pool.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from . import conditions, names

log = logging.getLogger(__name__)

TIMEOUT = (5, 30)  # connect, read: every API call carries it
_lock = threading.Lock()
_api: client.ApiClient | None = None


def api() -> client.ApiClient:
    """One ApiClient per process: in-cluster config when running in a Pod, else KUBECONFIG."""
    global _api
    with _lock:
        if _api is None:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
                config.load_incluster_config()
                _api = client.ApiClient()
            else:
                _api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
        return _api


def set_api(a: client.ApiClient | None) -> None:
    global _api, _watch_api
    with _lock:
        _api = a
        _watch_api = None


_watch_api: client.ApiClient | None = None


def watch_api() -> client.ApiClient:
    """A second client, with a connection pool of its own, for short watches ended before the
    server ends them: ending one closes its connection (the stream is not read to its end), which
    on the shared pool would cost the next request a new connection and TLS handshake."""
    global _watch_api
    shared = api()
    with _lock:
        if _watch_api is None:
            _watch_api = client.ApiClient(configuration=shared.configuration)
        return _watch_api


def warm_watch_connection() -> None:
    """Leave a connected, idle connection in `watch_api`'s pool (a GET of /version, which every
    identity may read), so the next short watch does not open one on its critical path."""
    try:
        client.VersionApi(watch_api()).get_code(_request_timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - only a head start: the watch connects by itself
        log.debug("could not warm the watch connection: %s", exc)


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def get_vm(namespace: str, name: str) -> dict | None:
    try:
        return custom().get_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.MICROVMS, name,
                                                     _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_vms(namespace: str | None = None, **kw) -> list[dict]:
    if namespace:
        res = custom().list_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.MICROVMS,
                                                     _request_timeout=TIMEOUT, **kw)
    else:
        res = custom().list_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMS,
                                                  _request_timeout=TIMEOUT, **kw)
    return res.get("items", [])


def get_node(name: str) -> dict | None:
    try:
        return custom().get_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMNODES, name,
                                                  _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch_vm_status(namespace: str, name: str, status: dict, uid: str | None = None) -> dict | None:
    """Merge-patch the status subresource. With `uid`, only if the object is still that one (a
    deleted and recreated namesake must not inherit it). Returns None if the object is gone."""
    body: dict = {"status": status}
    if uid:
        body["metadata"] = {"uid": uid}
    try:
        return custom().patch_namespaced_custom_object_status(names.GROUP, names.VERSION, namespace, names.MICROVMS,
                                                              name, body, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status in (404, 409):
            return None
        raise


def patch_node_status(name: str, status: dict) -> dict | None:
    try:
        return custom().patch_cluster_custom_object_status(names.GROUP, names.VERSION, names.MICROVMNODES, name,
                                                           {"status": status}, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


# ---------------------------------------------------------------------------- Events, aggregated
# A repeated Event updates one object (count + 1, lastTimestamp, the latest message) rather than
# adding another, as client-go's EventCorrelator does, so `kubectl describe` shows "(x100 over 5m)"
# after a hundred retries instead of a hundred lines. Identical Events (same object, component,
# type, reason and message) share a deterministic name; past SIMILAR_LIMIT distinct messages with
# one reason on one object within SIMILAR_WINDOW seconds, further ones are combined into one more
# Event whose message is the latest, prefixed "(combined from similar events): ".

SIMILAR_LIMIT = 10
SIMILAR_WINDOW = 600.0
_EVENT_CACHE_SIZE = 4096
_events_lock = threading.Lock()
_known_events: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
"""Event name -> (count, resourceVersion) as this process last wrote it."""
_similar: collections.OrderedDict[str, dict[str, float]] = collections.OrderedDict()
"""(object, component, type, reason) key -> distinct message digest -> when last seen."""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _remember(cache: collections.OrderedDict, key: str, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _EVENT_CACHE_SIZE:
        cache.popitem(last=False)


def event_key(obj: dict, reason: str, message: str, type_: str, component: str,
              clock: Callable[[], float] = time.monotonic) -> tuple[str, str]:
    """The Event's deterministic name and the message to record (a similar one's is combined)."""
    meta = obj.get("metadata", {})
    ident = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
    group = _digest(ident, component, type_, reason)
    now = clock()
    with _events_lock:
        seen = {m: t for m, t in (_similar.get(group) or {}).items() if t > now - SIMILAR_WINDOW}
        mine = _digest(message)
        combine = mine not in seen and len(seen) >= SIMILAR_LIMIT
        if not combine:
            seen[mine] = now
        _remember(_similar, group, seen)
    prefix = meta.get("name", "x")[:200]
    if combine:
        return f"{prefix}.{_digest(group, 'combined')}", f"(combined from similar events): {message}"
    return f"{prefix}.{_digest(group, message)}", message


def event(obj: dict, reason: str, message: str, type_: str = "Normal", component: str = "mikrom") -> None:
    """Record a core/v1 Event on `obj` (shown by `kubectl describe`), or count one more of an
    existing one. Never raises: an Event is worth less than the work it reports."""
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    name, message = event_key(obj, reason, message[:1024], type_, component)
    try:
        _record_event(obj, namespace, name, reason, message, type_, component)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record event %s on %s/%s: %s", reason, namespace, meta.get("name"), exc)


def _record_event(obj: dict, namespace: str, name: str, reason: str, message: str, type_: str,
                  component: str) -> None:
    """Create the Event, or patch count + 1 onto it on the resourceVersion last seen (a
    concurrent writer's 409 re-reads through a patch of lastTimestamp: the writers hold create
    and patch, not get)."""
    meta = obj.get("metadata", {})
    for _ in range(4):
        ts = conditions.now_precise()
        with _events_lock:
            known = _known_events.get(name)
        if known is None:
            body = client.CoreV1Event(
                metadata=client.V1ObjectMeta(name=name, namespace=namespace),
                involved_object=client.V1ObjectReference(
                    api_version=obj.get("apiVersion"), kind=obj.get("kind"), name=meta.get("name"),
                    namespace=meta.get("namespace"), uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
                reason=reason, message=message, type=type_,
                source=client.V1EventSource(component=component, host=socket.gethostname()),
                first_timestamp=ts, last_timestamp=ts, count=1,
                reporting_component=component, reporting_instance=socket.gethostname(),
            )
            try:
                created = core().create_namespaced_event(namespace, body, _request_timeout=TIMEOUT)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                _refresh_event(namespace, name, ts)  # another process (or an earlier life) made it
                continue
            with _events_lock:
                _remember(_known_events, name, (1, created.metadata.resource_version))
            return
        count, rv = known
        patch = {"metadata": {"resourceVersion": rv}, "count": count + 1, "lastTimestamp": ts, "message": message}
        try:
            updated = core().patch_namespaced_event(name, namespace, patch, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:  # expired (the API server's event TTL) or deleted: start again
                with _events_lock:
                    _known_events.pop(name, None)
                continue
            if exc.status != 409:
                raise
            _refresh_event(namespace, name, ts)
            continue
        with _events_lock:
            _remember(_known_events, name, (updated.count or count + 1, updated.metadata.resource_version))
        return
    log.warning("event %s/%s kept changing; not counted", namespace, name)


def _refresh_event(namespace: str, name: str, ts) -> None:
    """Learn an existing Event's count and resourceVersion (a patch answers with the object)."""
    try:
        current = core().patch_namespaced_event(name, namespace, {"lastTimestamp": ts}, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status != 404:
            raise
        with _events_lock:
            _known_events.pop(name, None)
        return
    with _events_lock:
        _remember(_known_events, name, (current.count or 1, current.metadata.resource_version))
