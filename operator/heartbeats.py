"""When the operator itself observed each MicroVMNode's heartbeat change.

A worker writes `status.lastHeartbeatTime` with its own clock, which may be minutes off. The
operator never compares that value with its clock: it only watches whether the value changes,
and records, by its own clock, when it first saw each new value. A node's heartbeat age is the
time since that observation. A node whose clock runs behind is not taken for lost, and one whose
clock runs ahead is not kept alive by a timestamp in the future: a value that stops changing is
no heartbeat, whatever it says. Nothing is persisted: after a restart every node counts as seen
at the moment it is first observed, so a restart never declares a node lost at once; except a
node whose Ready condition already says NodeLost (the previous process found it lost, by the
operator's clock): it stays lost from then on until its heartbeat changes.

`observe` is the pure rule; `Beats` holds the map for one process (fed from the node watch's
objects as the operator reads them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from mikrom import conditions, names

Seen = tuple[str, float]
"""(the heartbeat value last seen, the operator's time when that value was first seen)."""


def beat_of(node: Mapping | None) -> str | None:
    return ((node or {}).get("status") or {}).get("lastHeartbeatTime") or None


def first_seen(node: Mapping, now: float, lost_after: float) -> float:
    """When a heartbeat this process has not seen change counts as seen: now, or, for a node
    already marked lost (Ready=False, reason NodeLost), `lost_after` before it was marked, so it
    stays lost and the time it has been lost goes on counting."""
    ready = conditions.get((node.get("status") or {}).get("conditions"), names.READY)
    if ready and ready.get("status") == "False" and ready.get("reason") == names.NODE_LOST:
        marked = conditions.parse_time(ready.get("lastTransitionTime"))
        if marked is not None:
            return min(now, marked.timestamp() - lost_after)
    return now


def observe(previous: Seen | None, value: str | None, now: float, first: float | None = None) -> Seen | None:
    """The record after seeing `value` at `now`: kept while the value is unchanged, restarted
    at `now` when it changes; the first sight counts from `first` (default `now`). None when
    there is no heartbeat."""
    if not value:
        return None
    if previous is None:
        return (value, now if first is None else first)
    if previous[0] == value:
        return previous
    return (value, now)


class Beats:
    """The observation map of this process: node name -> Seen. Thread-safe."""

    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}
        self._lock = threading.Lock()

    def observe(self, node: Mapping, now: float, lost_after: float) -> float | None:
        """Record what `node` says now; the operator time its current heartbeat was first seen."""
        name = node["metadata"]["name"]
        with self._lock:
            previous = self._seen.get(name)
            first = first_seen(node, now, lost_after) if previous is None else None
            seen = observe(previous, beat_of(node), now, first)
            if seen is None:
                self._seen.pop(name, None)
                return None
            self._seen[name] = seen
            return seen[1]

    def observe_all(self, nodes: Mapping[str, Mapping], now: float, lost_after: float) -> dict[str, float]:
        """`observe` each node; forget the ones no longer there. Node name -> first-seen time."""
        out = {}
        for name, node in nodes.items():
            at = self.observe(node, now, lost_after)
            if at is not None:
                out[name] = at
        with self._lock:
            for gone in set(self._seen) - set(nodes):
                del self._seen[gone]
        return out


BEATS = Beats()
