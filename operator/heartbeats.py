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

The operator also counts its own blindness. While it cannot read the API server (its probe, a
list of the MicroVMNodes once per node check, fails, or no check ran at all because the operator
itself was stopped; operator/nodes.py), no heartbeat can change in its eyes,
which says nothing about the nodes: the workers may well be heartbeating to an API server the
operator cannot reach, or keeping their VMs through an outage (worker/fence.py). So while it is
blind no node's heartbeat ages, and once a probe succeeds again every age counts from that
moment at the earliest (`counted_from`): a node is found lost `nodeLostAfterSeconds` after the
operator could see again, its VMs moved `selfFenceAfterSeconds` + margin after that, never at
once on its return. A node already lost when the blindness began stays lost meanwhile (NotReady,
its VMs Unknown), but its VMs also wait the full self-fence time plus the margin after the
return: it may have renewed its lease through the outage as every other node did.

`observe` and `counted_from` are the pure rules; `Beats` holds the map for one process (fed
from the node watch's objects and the probe's list as the operator reads them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from mikrom import conditions, names

log = logging.getLogger(__name__)

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


LOST_EPSILON = 1.0
"""How far past nodeLostAfterSeconds a node lost before a blindness is held meanwhile (lost, but
not a second nearer its rescheduling)."""


def counted_from(seen_at: float, now: float, lost_after: float, blind: bool, sight_from: float | None,
                 lost_before: bool) -> float:
    """The time a heartbeat's age counts from, given the operator's blindness: `seen_at` when it
    first saw the current value; `blind` while its probe fails; `sight_from` when it could see
    again after the last blindness (None: never blind); `lost_before`: the node was already lost
    when that blindness began. A node lost before keeps an age just past `lost_after` until as
    long after the return as it would have been counted otherwise, so it stays lost without
    nearing its rescheduling; any other node ages only from the return."""
    if blind:
        return now - lost_after - LOST_EPSILON if lost_before else now
    if sight_from is None or seen_at >= sight_from:
        return seen_at
    if lost_before:
        return min(now - lost_after - LOST_EPSILON, sight_from)
    return sight_from


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
    """The observation map of this process: node name -> Seen, and the operator's blindness.
    Thread-safe."""

    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}
        self._lock = threading.Lock()
        self._blind_since: float | None = None
        self._sight_from: float | None = None
        self._lost_before: set[str] = set()
        """Nodes already lost when the last blindness began."""
        self.frozen_after: float | None = None
        """A gap this long between two looks at the heartbeats (operator/nodes.py sets it) means
        the operator itself was not running: blind for that gap."""
        self._last_look: float | None = None

    def blind(self, now: float, lost_after: float) -> bool:
        """The operator could not read the API server at `now`; True if it could until then."""
        with self._lock:
            return self._blind(now, lost_after)

    def _blind(self, now: float, lost_after: float) -> bool:
        if self._blind_since is not None:
            return False
        self._lost_before = {n for n, (_, at) in self._seen.items()
                             if now - self._counted(n, at, now, lost_after) > lost_after}
        self._blind_since = now
        return True

    def sighted(self, now: float) -> float | None:
        """The operator read the API server at `now`; how long it was blind, if it was."""
        with self._lock:
            return self._sighted(now)

    def _sighted(self, now: float) -> float | None:
        if self._blind_since is None:
            return None
        blind_for, self._blind_since, self._sight_from = now - self._blind_since, None, now
        return blind_for

    def _look(self, now: float, lost_after: float) -> None:
        """Count a long gap since the last look as blindness (the operator was frozen, suspended
        or starved, and saw nothing meanwhile), over at once if it is not blind otherwise."""
        last, self._last_look = self._last_look, now if self._last_look is None else max(now, self._last_look)
        if last is not None and self.frozen_after and now - last > self.frozen_after and self._blind(last, lost_after):
            self._sighted(now)
            log.warning("no heartbeat was looked at for %.0fs (the operator was stopped): seeing again after that "
                        "gap, heartbeat ages count from now", now - last)

    @property
    def is_blind(self) -> bool:
        return self._blind_since is not None

    def _counted(self, name: str, seen_at: float, now: float, lost_after: float) -> float:
        return counted_from(seen_at, now, lost_after, self._blind_since is not None, self._sight_from,
                            name in self._lost_before)

    def observe(self, node: Mapping, now: float, lost_after: float) -> float | None:
        """Record what `node` says now; the operator time its heartbeat's age counts from (when
        it first saw the current value, or later after a blindness)."""
        name = node["metadata"]["name"]
        with self._lock:
            self._look(now, lost_after)
            previous = self._seen.get(name)
            first = first_seen(node, now, lost_after) if previous is None else None
            seen = observe(previous, beat_of(node), now, first)
            if seen is None:
                self._seen.pop(name, None)
                return None
            self._seen[name] = seen
            if previous is not None and seen != previous:
                self._lost_before.discard(name)  # a new heartbeat: back among the living
            return self._counted(name, seen[1], now, lost_after)

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
                self._lost_before.discard(gone)
        return out


BEATS = Beats()
