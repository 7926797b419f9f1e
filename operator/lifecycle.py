"""What a placed VM's node should be told, and whether the node is making progress.

- `desired`: the intent that follows from the spec (`runStrategy`), the annotations
  (`mikrom.io/restartedAt`) and the status the worker reports, with a `key` naming what it was
  computed from, so a repeated event computes the same key and sends nothing new.
- `goal_reached` and `progress`: a dispatched intent whose goal is not reached and whose phase has
  not moved for `progressTimeoutSeconds` is sent again, with exponential backoff and jitter, and
  after `maxDispatchAttempts` the VM is given up on (Failed, reason NoProgress).
- `restart_required`: a shape change while the VM runs takes effect at the next start.

Pure functions over plain dicts; times are seconds since the epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from mikrom import conditions, names
from mikrom.names import Intent, Phase

TRANSITIONAL = frozenset({Phase.SCHEDULED.value, Phase.PROVISIONING.value, Phase.STOPPING.value})
OPERATOR_FAILURES = frozenset({names.INVALID_SPEC, names.NO_PROGRESS})


@dataclass(frozen=True)
class Want:
    intent: Intent
    key: str


def _status(vm: Mapping) -> Mapping:
    return vm.get("status") or {}


def restart_annotation(vm: Mapping) -> str | None:
    return ((vm.get("metadata") or {}).get("annotations") or {}).get(names.ANNOTATION_RESTARTED_AT) or None


def key_for(vm: Mapping, intent: Intent) -> str:
    meta = vm.get("metadata") or {}
    uid, generation = meta.get("uid", ""), meta.get("generation", 0)
    if intent is Intent.CREATE:
        return f"create/{uid}"
    if intent is Intent.DELETE:
        return f"delete/{uid}"
    if intent is Intent.RESTART:
        return f"restart/{uid}/{restart_annotation(vm)}"
    return f"{intent.value}/{uid}/g{generation}"


def desired(vm: Mapping) -> Want | None:
    """The intent to send now, or None when the node needs no new message."""
    status = _status(vm)
    phase = status.get("phase")
    if not status.get("node") or (vm.get("metadata") or {}).get("deletionTimestamp"):
        return None
    if phase == Phase.UNKNOWN.value or phase == Phase.DELETING.value:
        return None  # the node is unreachable, or the delete path owns the VM
    if phase == Phase.FAILED.value and status.get("reason") == names.INVALID_SPEC:
        return None
    halted = (vm.get("spec") or {}).get("runStrategy") == names.RunStrategy.HALTED.value
    if halted:
        if phase in (Phase.STOPPED.value, Phase.SUCCEEDED.value, Phase.FAILED.value):
            return None
        if phase == Phase.SCHEDULED.value and (status.get("dispatch") or {}).get("intent") == Intent.CREATE.value:
            return None  # the pending create re-reads the spec and leaves the VM stopped
        return Want(Intent.STOP, key_for(vm, Intent.STOP))
    if phase == Phase.STOPPED.value:
        return Want(Intent.START, key_for(vm, Intent.START))
    if phase == Phase.SCHEDULED.value and not status.get("dispatch"):
        return Want(Intent.CREATE, key_for(vm, Intent.CREATE))
    wanted = restart_annotation(vm)
    if wanted and wanted != status.get("restartedAt") and phase in (Phase.RUNNING.value, Phase.FAILED.value):
        return Want(Intent.RESTART, key_for(vm, Intent.RESTART))
    return None


def goal_reached(vm: Mapping, intent: Intent | str) -> bool:
    """Whether the node has done what `intent` asked (or settled the VM another way)."""
    intent = Intent(intent)
    status = _status(vm)
    phase = status.get("phase")
    if intent is Intent.DELETE:
        return bool(status.get("cleanedUpAt"))
    if intent is Intent.CREATE:
        return phase not in (None, Phase.PENDING.value, Phase.SCHEDULED.value, Phase.PROVISIONING.value)
    if intent is Intent.START:
        return phase not in (Phase.STOPPED.value, Phase.SCHEDULED.value, Phase.PROVISIONING.value)
    if intent is Intent.STOP:
        return phase in (Phase.STOPPED.value, Phase.SUCCEEDED.value, Phase.FAILED.value)
    # restart: the worker records the annotation value it acted on
    wanted = restart_annotation(vm)
    return (wanted is None or status.get("restartedAt") == wanted) and phase not in TRANSITIONAL


def jitter(uid: str, attempt: int) -> float:
    """A factor in [1, 1.25), fixed per VM and attempt, so replicas and reruns agree."""
    digest = hashlib.sha256(f"{uid}/{attempt}".encode()).digest()
    return 1.0 + (digest[0] / 256) * 0.25


def backoff(attempt: int, base: float, uid: str = "", cap: float = 300.0) -> float:
    """Delay before try number `attempt + 1`: base, 2*base, 4*base, ... (capped), with jitter."""
    return min(cap, base * (2 ** max(0, attempt - 1))) * jitter(uid, attempt)


@dataclass(frozen=True)
class Verdict:
    action: str
    """"ok" (goal reached or nothing sent), "wait" (until `due`), "redispatch" or "give-up"."""
    due: float = 0.0


def progress(vm: Mapping, progress_at: float, now: float, *, timeout: float, backoff_base: float,
             max_attempts: int, give_up: bool = True) -> Verdict:
    """Judge the VM's last dispatch. `progress_at` is when its phase last changed (as observed)."""
    status = _status(vm)
    dispatch = status.get("dispatch") or {}
    if not dispatch or status.get("phase") == Phase.UNKNOWN.value:
        return Verdict("ok")
    intent = Intent(dispatch["intent"])
    if goal_reached(vm, intent):
        return Verdict("ok")
    sent = conditions.parse_time(dispatch.get("sentAt"))
    attempts = int(dispatch.get("attempts") or 1)
    start = max(sent.timestamp() if sent else 0.0, progress_at)
    uid = (vm.get("metadata") or {}).get("uid", "")
    due = start + timeout + backoff(attempts, backoff_base, uid)
    if now < due:
        return Verdict("wait", due)
    if give_up and attempts >= max_attempts:
        return Verdict("give-up", due)
    return Verdict("redispatch", due)


def restart_required(vm: Mapping) -> tuple[bool, str] | None:
    """(required, message) when the RestartRequired condition should say something; None when the
    question does not arise (the VM runs nothing and never said it needed a restart)."""
    spec = vm.get("spec") or {}
    status = _status(vm)
    active = status.get("activeShape")
    want = (int(spec.get("vcpus") or 1), int(spec.get("memoryMiB") or 512))
    running = status.get("phase") in (Phase.RUNNING.value, Phase.PROVISIONING.value, Phase.STOPPING.value)
    if running and active:
        have = (int(active.get("vcpus") or 0), int(active.get("memoryMiB") or 0))
        if have != want:
            return True, (f"spec asks for {want[0]} vCPU and {want[1]} MiB, the running VM has {have[0]} vCPU and "
                          f"{have[1]} MiB; it takes effect at the next start (set {names.ANNOTATION_RESTARTED_AT})")
    if conditions.get(status.get("conditions"), names.RESTART_REQUIRED):
        return False, "the running VM has the shape of its spec" if running else "the VM is not running"
    return None
