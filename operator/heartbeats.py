"""When the operator itself observed each MicroVMNode's heartbeat change.

A worker writes `status.lastHeartbeatTime` with its own clock, which may be minutes off. The
operator never compares that value with its clock: it only watches whether the value changes,
and records, by its own clock, when it first saw each new value. A node's heartbeat age is the
time since that observation. A node whose clock runs behind is not taken for lost, and one whose
clock runs ahead is not kept alive by a timestamp in the future: a value that stops changing is
no heartbeat, whatever it says. Nothing is persisted: after a restart every node counts as seen
at the moment it is first observed, so a restart never declares a node lost at once.

`observe` is the pure rule; `Beats` holds the map for one process (fed from the node watch's
objects as the operator reads them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

Seen = tuple[str, float]
"""(the heartbeat value last seen, the operator's time when that value was first seen)."""


def beat_of(node: Mapping | None) -> str | None:
    return ((node or {}).get("status") or {}).get("lastHeartbeatTime") or None


def observe(previous: Seen | None, value: str | None, now: float) -> Seen | None:
    """The record after seeing `value` at `now`: kept while the value is unchanged, restarted
    at `now` when it changes (or is seen for the first time); None when there is no heartbeat."""
    if not value:
        return None
    if previous is not None and previous[0] == value:
        return previous
    return (value, now)


class Beats:
    """The observation map of this process: node name -> Seen. Thread-safe."""

    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}
        self._lock = threading.Lock()

    def observe(self, node: Mapping, now: float) -> float | None:
        """Record what `node` says now; the operator time its current heartbeat was first seen."""
        name = node["metadata"]["name"]
        with self._lock:
            seen = observe(self._seen.get(name), beat_of(node), now)
            if seen is None:
                self._seen.pop(name, None)
                return None
            self._seen[name] = seen
            return seen[1]

    def observe_all(self, nodes: Mapping[str, Mapping], now: float) -> dict[str, float]:
        """`observe` each node; forget the ones no longer there. Node name -> first-seen time."""
        out = {}
        for name, node in nodes.items():
            at = self.observe(node, now)
            if at is not None:
                out[name] = at
        with self._lock:
            for gone in set(self._seen) - set(nodes):
                del self._seen[gone]
        return out


BEATS = Beats()
