"""Kubernetes access shared by the operator and the worker: client configuration, status patches
and Events, every call with a timeout.

Synchronous (the kubernetes client): the worker runs it under gevent's monkey-patching, the
operator from kopf's thread pool.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

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
    global _api
    with _lock:
        _api = a


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


def event(obj: dict, reason: str, message: str, type_: str = "Normal", component: str = "mikrom") -> None:
    """Record a core/v1 Event on `obj` (shown by `kubectl describe`). Never raises: an Event is
    worth less than the work it reports."""
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace") or "default"
    ts = conditions.now_precise()
    body = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=f"{meta.get('name', 'x')}.{uuid.uuid4().hex[:12]}", namespace=namespace),
        involved_object=client.V1ObjectReference(api_version=obj.get("apiVersion"), kind=obj.get("kind"),
                                                 name=meta.get("name"), namespace=meta.get("namespace"),
                                                 uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
        reason=reason,
        message=message[:1024],
        type=type_,
        source=client.V1EventSource(component=component, host=socket.gethostname()),
        first_timestamp=ts,
        last_timestamp=ts,
        count=1,
        reporting_component=component,
        reporting_instance=socket.gethostname(),
    )
    try:
        core().create_namespaced_event(namespace, body, _request_timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record event %s on %s/%s: %s", reason, namespace, meta.get("name"), exc)
