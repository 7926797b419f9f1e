"""Writing the operator's fields of a MicroVM's status, and recording Events.

Every write is a JSON merge patch of the operator's own fields on the status subresource. It carries
the object's uid (a re-created namesake is never written) and its resourceVersion: the conditions
list is shared with the worker and a merge patch replaces a list whole, so the operator never
writes over a version it has not read. On a conflict it reads the object again and recomputes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes.client.rest import ApiException

from mikrom import conditions, kube, names

from .state import STATE

log = logging.getLogger(__name__)

COMPONENT = "mikrom-operator"


@dataclass(frozen=True)
class Written:
    body: dict
    """The object as the API server returned it after the write."""
    patch: dict
    """The status fields written."""


def _meta(body: dict) -> dict:
    return body.get("metadata") or {}


def update_vm(body: dict, compute: Callable[[dict], dict | None], attempts: int = 8) -> Written | None:
    """Write `compute(current)` (a status patch, or None for nothing to do) onto the MicroVM.
    Returns None when nothing was written: no change wanted, or the object is gone or replaced."""
    meta = _meta(body)
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    current = STATE.latest(body)
    for _ in range(attempts):
        patch = compute(current)
        if not patch:
            return None
        rv = _meta(current).get("resourceVersion")
        request = {"metadata": {"uid": uid, **({"resourceVersion": rv} if rv else {})}, "status": patch}
        try:
            result = kube.custom().patch_namespaced_custom_object_status(
                names.GROUP, names.VERSION, namespace, names.MICROVMS, name, request, _request_timeout=kube.TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status != 409:
                raise
            fresh = kube.get_vm(namespace, name)
            if fresh is None or _meta(fresh).get("uid") != uid:
                return None
            current = STATE.observe_vm(fresh)
            continue
        return Written(STATE.observe_vm(result), patch)
    raise RuntimeError(f"{namespace}/{name}: status kept changing under {attempts} writes")


def condition_patch(status: dict, type_: str, value: bool, reason: str, message: str,
                    generation: int | None = None) -> list[dict] | None:
    """The new conditions list when the condition changes, else None."""
    new, changed = conditions.set_condition(status.get("conditions"), type_, value, reason, message, generation)
    return new if changed else None


def emit(body: dict, reason: str, message: str, warning: bool = False) -> None:
    """Record an Event on the object (what `kubectl describe` shows) and log it."""
    meta = _meta(body)
    level = logging.WARNING if warning else logging.INFO
    log.log(level, "%s %s/%s: %s", reason, meta.get("namespace") or "-", meta.get("name"), message,
            extra={"reason": reason, "object_uid": meta.get("uid"), "kind": body.get("kind")})
    kube.event(body, reason, message, type_="Warning" if warning else "Normal", component=COMPONENT)
