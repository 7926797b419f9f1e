"""Pure helpers for status conditions (type/status/reason/message/lastTransitionTime)."""

from __future__ import annotations

import datetime as _dt


def now() -> str:
    """RFC 3339 UTC timestamp with seconds, as Kubernetes writes them."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_precise() -> str:
    """RFC 3339 UTC timestamp with microseconds, for latency measurements."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> _dt.datetime | None:
    if not value:
        return None
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def age_seconds(value: str | None, at: _dt.datetime | None = None) -> float | None:
    t = parse_time(value)
    if t is None:
        return None
    return ((at or _dt.datetime.now(_dt.timezone.utc)) - t).total_seconds()


def get(conditions: list[dict] | None, type_: str) -> dict | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def is_true(conditions: list[dict] | None, type_: str) -> bool:
    c = get(conditions, type_)
    return bool(c) and c.get("status") == "True"


def set_condition(conditions: list[dict] | None, type_: str, status: bool | str, reason: str, message: str = "",
                  generation: int | None = None, at: str | None = None) -> tuple[list[dict], bool]:
    """Return (new list, changed). lastTransitionTime moves only when the status changes."""
    status = ("True" if status else "False") if isinstance(status, bool) else status
    out = [dict(c) for c in conditions or []]
    current = get(out, type_)
    if current is None:
        current = {"type": type_}
        out.append(current)
    changed = (current.get("status"), current.get("reason"), current.get("message")) != (status, reason, message)
    if current.get("status") != status or "lastTransitionTime" not in current:
        current["lastTransitionTime"] = at or now()
        changed = True
    current.update(status=status, reason=reason, message=message)
    if generation is not None:
        changed = changed or current.get("observedGeneration") != generation
        current["observedGeneration"] = generation
    return out, changed
