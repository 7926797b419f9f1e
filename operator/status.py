"""Writing the operator's fields of a MicroVM's status, and recording Events (at most
`EVENTS_PER_OBJECT_PER_MINUTE` per object; `mikrom.kube.event` counts a repeated one onto the
existing Event, as the worker's are).

Every write is a JSON merge patch of the operator's own fields on the status subresource. It carries
the object's uid (a re-created namesake is never written) and its resourceVersion: the conditions
list is shared with the worker and a merge patch replaces a list whole, so the operator never
writes over a version it has not read. On a conflict the caller reads the object again and decides again.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from kubernetes.client.rest import ApiException

from mikrom import kube, names

from .state import STATE

log = logging.getLogger(__name__)

COMPONENT = "mikrom-operator"


def _meta(body: dict) -> dict:
    return body.get("metadata") or {}


class Conflict(Exception):
    """The object changed since it was read (409): read it again and decide again."""


def write_vm(current: dict, patch: dict) -> dict | None:
    """Write `patch` onto the MicroVM's status, on the version `current` was read at. Returns the
    object as written, or None when it is gone or replaced; raises Conflict on a newer version."""
    meta = _meta(current)
    rv = meta.get("resourceVersion")
    request = {"metadata": {"uid": meta["uid"], **({"resourceVersion": rv} if rv else {})}, "status": patch}
    return _patch_vm(kube.custom().patch_namespaced_custom_object_status, meta, request)


def add_finalizer(current: dict) -> dict | None:
    """Add the operator's finalizer to the MicroVM (a metadata write: a status patch cannot carry
    it), on the version `current` was read at. Returns the object as written, or None when it is
    gone or replaced; raises Conflict on a newer version."""
    meta = _meta(current)
    finalizers = [f for f in meta.get("finalizers") or [] if f != names.FINALIZER] + [names.FINALIZER]
    request = {"metadata": {"uid": meta["uid"], "resourceVersion": meta.get("resourceVersion"),
                            "finalizers": finalizers}}
    return _patch_vm(kube.custom().patch_namespaced_custom_object, meta, request)


def _patch_vm(patch_call: Callable, meta: dict, request: dict) -> dict | None:
    """One merge patch of the MicroVM `meta` names: the object as written, None when it is gone
    (404), Conflict when it changed (409: a newer version, or a namesake failing the uid)."""
    namespace, name = meta["namespace"], meta["name"]
    try:
        result = patch_call(names.GROUP, names.VERSION, namespace, names.MICROVMS, name, request,
                            _request_timeout=kube.TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        if exc.status == 409:
            raise Conflict(f"{namespace}/{name} changed since resourceVersion {meta.get('resourceVersion')}") from None
        raise
    return STATE.observe_vm(result)


def reread_vm(current: dict) -> dict | None:
    """The MicroVM as the API server has it now (None: gone or replaced by a namesake)."""
    meta = _meta(current)
    fresh = kube.get_vm(meta["namespace"], meta["name"])
    if fresh is None or _meta(fresh).get("uid") != meta["uid"]:
        return None
    return STATE.observe_vm(fresh)


EVENTS_PER_OBJECT_PER_MINUTE = 20
"""At most this many Events per object in any 60 s (the rest are logged only): a VM flapping
between phases, or a send failing again and again, must not flood the API server with Events."""


class EventBudget:
    """A sliding window of the Events recorded per object uid (thread-safe)."""

    def __init__(self, limit: int = EVENTS_PER_OBJECT_PER_MINUTE, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._lock = threading.Lock()
        self._sent: dict[str, collections.deque] = {}

    def allow(self, uid: str) -> bool:
        now = self._clock()
        with self._lock:
            times = self._sent.setdefault(uid, collections.deque())
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.limit:
                return False
            times.append(now)
            if len(self._sent) > 10000:  # forget objects quiet for a whole window
                for key in [k for k, v in self._sent.items() if not v or v[-1] <= now - self.window]:
                    del self._sent[key]
            return True


BUDGET = EventBudget()


def emit(body: dict, reason: str, message: str, warning: bool = False) -> None:
    """Record an Event on the object (what `kubectl describe` shows) and log it; past the object's
    Event budget, only log it."""
    meta = _meta(body)
    level = logging.WARNING if warning else logging.INFO
    recorded = BUDGET.allow(meta.get("uid") or meta.get("name") or "")
    log.log(level, "%s %s/%s: %s", reason, meta.get("namespace") or "-", meta.get("name"), message,
            extra={"reason": reason, "object_uid": meta.get("uid"), "kind": body.get("kind"),
                   **({} if recorded else {"event": "over budget, not recorded"})})
    if recorded:
        kube.event(body, reason, message, type_="Warning" if warning else "Normal", component=COMPONENT)
