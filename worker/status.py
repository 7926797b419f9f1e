"""The one place where the worker writes a MicroVM's status, and the Events that go with it.

The worker owns the fields listed in docs/protocol.md (phase Provisioning/Running/Stopping/Stopped/
Succeeded and node-side Failed, ipAddress, pid, timings, condition Ready...). Each write is a JSON
merge patch of those fields only, carrying `metadata.uid` (a recreated namesake is never written)
and `metadata.resourceVersion`: conditions are a list, which a merge patch replaces whole, so the
list is recomputed from a fresh read whenever the object changed in between (HTTP 409). A write
that would change nothing is skipped, so a level-triggered sync costs one GET per VM. Events go
through `mikrom.kube.event`, which counts a repeated one onto the existing Event (count, lastTimestamp).

A guarded write (the first of an action decided from an object read earlier) is a JSON patch
instead (`guarded_patch`): it tests what the decision rests on, the object (uid), its spec and
its deletion (generation: the API server bumps it when a delete begins), its node and the
conditions it replaces, and is refused (422) if any of them changed, so the action is decided
again. A change of metadata alone (kopf's finalizer, added just after the placement, a label)
does not refuse it: the first write of a new VM does not wait for the finalizer nor race it.
"""

from __future__ import annotations

import json
import logging

from kubernetes.client.rest import ApiException

from mikrom import conditions, kube, metrics, names

from . import timing
from mikrom.names import Phase

log = logging.getLogger(__name__)

MAX_CONFLICTS = 8
COMPONENT = "mikrom-worker"

# the Event reason of entering each phase (Failed uses the failure's own reason)
PHASE_EVENT = {
    Phase.PROVISIONING.value: "Provisioning",
    Phase.RUNNING.value: "Started",
    Phase.STOPPING.value: "Stopping",
    Phase.STOPPED.value: "Stopped",
    Phase.SUCCEEDED.value: "Succeeded",
}


def _pointer(key: str) -> str:
    return "/status/" + key.replace("~", "~0").replace("/", "~1")


def guarded_patch(vm: dict, patch: dict) -> list[dict]:
    """The JSON patch (RFC 6902) of a guarded write of `patch` (status_patch's merge patch, whose
    keys are status fields) on `vm`: its tests, then one operation per field."""
    meta, status = vm["metadata"], vm.get("status") or {}
    ops = [{"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
           {"op": "test", "path": "/metadata/generation", "value": meta.get("generation")},
           {"op": "test", "path": "/status/node", "value": status.get("node")}]
    if "conditions" in patch and "conditions" in status:
        ops.append({"op": "test", "path": "/status/conditions", "value": status["conditions"]})
    for key, value in patch.items():
        if value is not None:
            ops.append({"op": "add", "path": _pointer(key), "value": value})
        elif key in status:
            ops.append({"op": "remove", "path": _pointer(key)})
    return ops


def _refused(exc: ApiException) -> bool:
    """A guarded write refused because the object is not as it was read: a failed test (or a
    field to remove that is gone). The API server answers both 422 with a bare "rejected our
    request" Status, and an invalid value 422 with its causes."""
    if exc.status != 422:
        return False
    try:
        answer = json.loads(exc.body or "{}")
    except ValueError:
        return False
    return not (answer.get("details") or {}).get("causes") and "rejected our request" in str(answer.get("message"))


def status_patch(current: dict, generation: int | None, phase: str | None, reason: str | None,
                 message: str | None, fields: dict, ready: tuple[bool, str, str] | None) -> dict:
    """The merge patch that moves `current` (a status) to the given values; empty if nothing changes.

    Pure, so its rules are tested without a server: Ready follows the phase unless given, and
    `observedGeneration` records the spec generation acted on.
    """
    want: dict = dict(fields)
    if phase is not None:
        want.update(phase=phase, reason=reason or phase, message=message or "")
        if ready is None:
            ready = (True, "GuestReady", message or "the guest is up") if phase == Phase.RUNNING.value \
                else (False, reason or phase, message or "")
    if generation is not None:
        want["observedGeneration"] = generation
    patch = {k: v for k, v in want.items() if current.get(k) != v}
    if ready is not None:
        conds, changed = conditions.set_condition(current.get("conditions"), names.READY, ready[0], ready[1],
                                                  ready[2], generation=generation)
        if changed:
            patch["conditions"] = conds
    return patch


class StatusWriter:
    def __init__(self, node: str):
        self.node = node

    def report(self, vm: dict, phase: str | None = None, reason: str | None = None, message: str | None = None,
               fields: dict | None = None, ready: tuple[bool, str, str] | None = None,
               event_reason: str | None = None, event: tuple[str, str, str] | None = None,
               guard: bool = False, defer_events: list | None = None) -> dict | None:
        """Write the worker's view of `vm`; returns the updated object, or None if the object is
        gone or is now another object with the same name.

        Entering a new phase records an Event (reason `event_reason`, by default the phase's own,
        or the failure's reason); `event` = (type, reason, message) records one regardless. With
        `defer_events` (a list) the Events are appended to it instead, for `record_events` later,
        so that a write on a task's critical path does not wait for them.

        `guard`: the write is the first of an action decided from `vm`, so it also checks that the
        object has not changed since `vm` was read in what the decision rests on (guarded_patch).
        If it has, nothing is written and ObjectChanged carries the fresh object, for the caller
        to decide again.
        """
        fields = fields or {}
        for _ in range(MAX_CONFLICTS):
            meta = vm["metadata"]
            current = vm.get("status") or {}
            patch = status_patch(current, meta.get("generation"), phase, reason, message, fields, ready)
            if not patch and not guard:
                return vm
            if guard:  # nothing to change: the tests alone still check the object
                body, kind = guarded_patch(vm, patch), "application/json-patch+json"
            else:
                body = {"metadata": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}, "status": patch}
                kind = "application/merge-patch+json"
            timing.mark(f"sending_{phase or 'status'}")
            try:
                updated = kube.custom().patch_namespaced_custom_object_status(
                    names.GROUP, names.VERSION, meta["namespace"], names.MICROVMS, meta["name"], body,
                    _content_type=kind, _request_timeout=kube.TIMEOUT)
            except ApiException as exc:
                if exc.status not in (404, 409) and not (guard and _refused(exc)):
                    raise
                fresh = kube.get_vm(meta["namespace"], meta["name"])
                if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
                    return None
                if (fresh.get("status") or {}).get("node") != self.node:
                    # placed elsewhere meanwhile (the operator rescheduled it off a lost node):
                    # no longer this node's to report; the caller removes what it holds
                    return None
                if guard:
                    raise ObjectChanged(fresh)
                vm = fresh
                continue
            timing.mark(f"write_{phase or 'status'}")
            events = self._events(vm, phase, reason, message, event_reason, event)
            if defer_events is not None:
                defer_events.extend((updated, *e) for e in events)
            else:
                self.record_events([(updated, *e) for e in events])
            return updated
        raise ConflictStorm(f"status of {vm['metadata']['namespace']}/{vm['metadata']['name']} changed "
                            f"{MAX_CONFLICTS} times while being written")

    def _events(self, before: dict, phase, reason, message, event_reason, event) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events a write records; counts the phase entered."""
        events = [event] if event else []
        if phase is not None and phase != (before.get("status") or {}).get("phase"):
            metrics.PHASES.labels(phase).inc()
            if phase == Phase.FAILED.value:
                events.append(("Warning", event_reason or reason or "Failed", message or "the VM failed"))
            else:
                events.append(("Normal", event_reason or PHASE_EVENT.get(phase, phase), message or phase))
        return events

    def record_events(self, events: list[tuple[dict, str, str, str]]) -> None:
        """Record (object as written, type, reason, message) Events, in order."""
        for after, type_, ev_reason, ev_message in events:
            log.info("%s/%s: %s %s: %s", after["metadata"]["namespace"], after["metadata"]["name"], type_,
                     ev_reason, ev_message)
            kube.event(after, ev_reason, f"{ev_message} (node {self.node})", type_=type_, component=COMPONENT)
        if events:
            timing.mark("events_" + "_".join(e[2] for e in events))


class ConflictStorm(Exception):
    """The object kept changing under the status write; retry the task later."""

    reason = "Conflict"


class ObjectChanged(ConflictStorm):
    """A guarded write found the object changed since it was read: decide again from `fresh`
    (should it escape, the task is retried like any conflict)."""

    def __init__(self, fresh: dict):
        super().__init__(f"{fresh['metadata'].get('namespace')}/{fresh['metadata'].get('name')} changed "
                         "since it was read")
        self.fresh = fresh
