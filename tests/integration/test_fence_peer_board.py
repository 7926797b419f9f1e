"""The peers' board in a real Redis (worker/peers.py): one round records this node and reads
everyone with Redis's clock, and entries of nodes gone for good are pruned past their bound."""

from __future__ import annotations

import redis as redis_py

from mikrom.settings import Settings
from mikrom.worker import peers

DB = 11
"""A database of this file's own: the board's keys are global."""


def test_a_round_records_this_node_reads_its_peers_and_prunes_nodes_gone_for_good(redis):
    settings = Settings(broker_url=redis.url(db=DB), fence_peer_window_seconds=20)
    raw = redis_py.Redis.from_url(redis.url(db=DB), socket_timeout=5)
    raw.delete(peers.SEEN_KEY, peers.API_WRITE_KEY)
    now = float(raw.time()[0])
    bound = peers.prune_after(settings)
    assert bound == peers.PRUNE_AFTER_MIN
    raw.hset(peers.SEEN_KEY, mapping={"live": now - 5, "gone": now - bound - 10, "junk": "not a time",
                                      "old-but-kept": now - bound + 60})
    raw.hset(peers.API_WRITE_KEY, mapping={"live": now - 5, "gone": now - bound - 10})
    board = peers.PeerBoard(settings, "me")
    try:
        view = board.exchange(api_ok=True)
    finally:
        board.close()
    assert view is not None and abs(view.now - now) < 5
    assert set(view.seen) == {"me", "live", "old-but-kept"}
    assert set(view.api_writes) == {"me", "live"}
    assert set(k.decode() for k in raw.hkeys(peers.SEEN_KEY)) == {"me", "live", "old-but-kept"}
    assert set(k.decode() for k in raw.hkeys(peers.API_WRITE_KEY)) == {"me", "live"}
    assert peers.prune_after(Settings(fence_peer_window_seconds=600)) == 6000
    raw.delete(peers.SEEN_KEY, peers.API_WRITE_KEY)
    raw.close()
