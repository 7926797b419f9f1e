"""The fence's pure decisions: whether a worker may renew its node's lease (fence.decide, the
table in docs/protocol.md), and how a supervisor reads the lease (consolecap.lease_verdict)."""

from __future__ import annotations

import pytest

from mikrom.worker.fence import PeerView, decide
from mikrom.worker.vmm.consolecap import lease_verdict

NOW = 1_000_000.0
WINDOW = 6.0


def view(seen: dict, writes: dict) -> PeerView:
    return PeerView(now=NOW, seen={n: NOW - age for n, age in seen.items()},
                    api_writes={n: NOW - age for n, age in writes.items()})


@pytest.mark.parametrize("api_ok, peers, renew, reason", [
    # the heartbeat reached the API server: renew, whatever Redis says
    (True, None, True, "ApiReachable"),
    (True, view({"b": 1}, {"b": 1}), True, "ApiReachable"),
    # neither the API server nor Redis: assume we are the isolated one
    (False, None, False, "PeersUnreachable"),
    # Redis but nobody else alive (a lone node, or peers that stopped checking in)
    (False, view({}, {}), False, "NoLivePeers"),
    (False, view({"a": 0, "b": 30}, {"b": 30}), False, "NoLivePeers"),
    # a live peer still writes to the API server: we are cut off, the operator may move our VMs
    (False, view({"a": 0, "b": 1}, {"a": 40, "b": 1}), False, "PeersReachApiServer"),
    # live peers, none wrote recently: a control-plane outage, keep running
    (False, view({"a": 0, "b": 1, "c": 2}, {"a": 1, "b": 20, "c": 7}), True, "ControlPlaneOutage"),
], ids=["api-ok", "api-ok-with-peers", "all-unreachable", "no-peers", "stale-peers", "peer-writes",
        "outage"])
def test_a_worker_renews_its_lease_only_when_it_reaches_the_api_server_or_nobody_does(api_ok, peers, renew,
                                                                                       reason):
    verdict = decide(api_ok, "a", peers, WINDOW)
    assert (verdict.renew, verdict.reason) == (renew, reason)
    assert verdict.message


@pytest.mark.parametrize("api_ok, peers", [
    (True, None),
    (True, view({"b": 1}, {"b": 1})),
    (False, view({"a": 0, "b": 1}, {"b": 20})),  # an outage would renew a settled worker
], ids=["api-ok", "api-ok-with-peers", "outage"])
def test_the_first_round_of_a_new_worker_process_renews_nothing(api_ok, peers):
    # a worker that dies within a heartbeat period of each start must not keep its VMs alive
    verdict = decide(api_ok, "a", peers, WINDOW, settled=False)
    assert (verdict.renew, verdict.reason) == (False, "Starting")
    assert decide(api_ok, "a", peers, WINDOW, settled=True).renew


def test_a_node_s_own_entries_never_count_as_a_peer():
    # only "a" itself is alive and wrote just now (its previous round): no one vouches for an outage
    assert decide(False, "a", view({"a": 0}, {"a": 0}), WINDOW).reason == "NoLivePeers"


def test_a_peer_that_wrote_just_inside_the_window_still_counts_as_reaching_the_api_server():
    assert decide(False, "a", view({"b": 0}, {"b": WINDOW}), WINDOW).reason == "PeersReachApiServer"
    assert decide(False, "a", view({"b": 0}, {"b": WINDOW + 0.1}), WINDOW).reason == "ControlPlaneOutage"


@pytest.mark.parametrize("lease, armed, verdict", [
    (None, False, "unarmed"),          # no worker ever leased this node: a bare driver
    (None, True, "expired"),           # the lease file was removed after it was seen
    ({}, False, "expired"),            # unreadable
    ({"expires_boottime": "soon"}, False, "expired"),
    ({"expires_boottime": True}, False, "expired"),
    ({"expires_boottime": NOW - 0.1}, True, "expired"),
    ({"expires_boottime": NOW}, True, "expired"),
    ({"expires_boottime": NOW + 5}, False, "valid"),
], ids=["none", "removed", "unreadable", "string", "bool", "past", "now", "future"])
def test_a_supervisor_treats_anything_but_a_future_deadline_as_an_expired_lease_once_armed(lease, armed, verdict):
    assert lease_verdict(lease, NOW, armed)[0] == verdict


class _Board:
    def __init__(self, view):
        self.view, self.calls = view, []

    def exchange(self, api_ok):
        self.calls.append(api_ok)
        return self.view


def agent_with(tmp_path, view, fence_after=10.0):
    from types import SimpleNamespace

    from mikrom.settings import Settings
    from mikrom.worker.node import NodeAgent

    settings = Settings(self_fence_after_seconds=fence_after, fence_peer_window_seconds=WINDOW,
                        fence_kill_after_seconds=2.0, node_name="a")
    ctx = SimpleNamespace(settings=settings, node="a", runtime=SimpleNamespace(vms_dir=tmp_path / "vms"))
    agent = NodeAgent(ctx)
    agent.peers = _Board(view)
    return agent


def test_the_worker_renews_from_the_round_s_start_only_when_the_decision_allows(tmp_path):
    from mikrom.worker import lease

    agent = agent_with(tmp_path, None)
    agent._renew_lease(api_ok=False, sent=lease.boottime())  # Redis and the API server both gone
    assert lease.remaining(tmp_path / "vms") is None and agent.verdict.reason == "PeersUnreachable"

    sent = lease.boottime() - 3  # the heartbeat took 3 s: the lease still counts from its start
    agent._renew_lease(api_ok=True, sent=sent)
    assert agent.peers.calls == [False, True]
    assert 6.5 < lease.remaining(tmp_path / "vms") <= 7.0

    agent.peers.view = PeerView(now=NOW, seen={"b": NOW}, api_writes={"b": NOW - 1})
    agent._renew_lease(api_ok=False, sent=lease.boottime())
    assert lease.remaining(tmp_path / "vms") <= 7.0 and agent.verdict.reason == "PeersReachApiServer"

    agent.peers.view = PeerView(now=NOW, seen={"b": NOW}, api_writes={"b": NOW - 60})
    agent._renew_lease(api_ok=False, sent=lease.boottime())
    assert lease.remaining(tmp_path / "vms") > 9.5 and agent.verdict.reason == "ControlPlaneOutage"


def test_with_fencing_off_the_lease_never_runs_out(tmp_path):
    from mikrom.worker import lease

    agent = agent_with(tmp_path, None, fence_after=0)
    agent._renew_lease(api_ok=False, sent=lease.boottime())
    assert lease.remaining(tmp_path / "vms") > 365 * 86400
