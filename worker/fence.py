"""Whether this node may renew its VMs' lease: the pure decision (no I/O).

The operator places a lost node's VMs elsewhere once it has seen no heartbeat for
`selfFenceAfterSeconds` plus a margin. So a worker may keep its VMs running (renew the lease,
worker/lease.py) only while the operator can see it, or while nobody can see anybody:

| heartbeat written to the API server | Redis | live peers (seen in Redis within the window) | verdict |
|---|---|---|---|
| yes | any | any | renew (`ApiReachable`) |
| no | unreachable | unknown | let the lease run out (`PeersUnreachable`) |
| no | reachable | none | let it run out (`NoLivePeers`) |
| no | reachable | one wrote to the API server within the window | let it run out (`PeersReachApiServer`) |
| no | reachable | some, none wrote within the window | renew (`ControlPlaneOutage`) |

Whatever the table says, the first round of a new worker process renews nothing (`Starting`):
a worker must have completed one heartbeat period to vouch for its VMs, so one that crash-loops
(dies within a heartbeat period of each start) cannot keep them alive by renewing once per start.
It writes no heartbeat in that round either (worker/node.py), so the operator sees it as dead too.

Cut off from both the API server and Redis, a node cannot tell an outage of both from its own
isolation; like medik8s's self-node-remediation it assumes it is the isolated one and fences,
so a simultaneous API server and Redis outage longer than `selfFenceAfterSeconds` stops every VM.
That is the price of never running a VM in two places. A lone node (no live peer) fences for the
same reason: nobody can vouch that the control plane is down rather than out of its reach.

Times in the peer view are Redis's own clock (`TIME`), so node clocks never matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerView:
    """What Redis said: its time, and per node the last time it checked in (`seen`) and the last
    time it wrote its heartbeat to the API server (`api_writes`)."""

    now: float
    seen: dict[str, float] = field(default_factory=dict)
    api_writes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    renew: bool
    reason: str
    """CamelCase, as in conditions."""
    message: str


def decide(api_ok: bool, node: str, peers: PeerView | None, window: float, settled: bool = True) -> Verdict:
    """May `node` renew its lease? `api_ok`: its heartbeat write just succeeded; `peers`: None
    when Redis could not be reached; `window`: how recent "alive" and "wrote" must be (seconds);
    `settled`: this worker process has completed a round before this one."""
    if not settled:
        return Verdict(False, "Starting", "the first heartbeat round of a new worker process renews nothing: a "
                                          "worker must stay up for a heartbeat period to keep its VMs")
    if api_ok:
        return Verdict(True, "ApiReachable", "the heartbeat reached the API server")
    if peers is None:
        return Verdict(False, "PeersUnreachable",
                       "neither the API server nor Redis can be reached: assuming this node is the isolated one")

    def recent(t: float | None) -> bool:
        return t is not None and peers.now - t <= window

    live = sorted(n for n, t in peers.seen.items() if n != node and recent(t))
    if not live:
        return Verdict(False, "NoLivePeers",
                       "the API server cannot be reached and no peer is alive to say it is down for all")
    writers = sorted(n for n, t in peers.api_writes.items() if n != node and recent(t))
    if writers:
        shown = ", ".join(writers[:3]) + (f" and {len(writers) - 3} more" if len(writers) > 3 else "")
        return Verdict(False, "PeersReachApiServer",
                       f"the API server cannot be reached from here but {shown} wrote to it within {window:g}s")
    return Verdict(True, "ControlPlaneOutage",
                   f"no peer of {len(live)} alive wrote to the API server within {window:g}s: a control-plane outage")
