"""The peers' board in Redis: when each node last checked in and last wrote to the API server.

Two hashes, node name → Redis `TIME` (seconds, as a string): `mikrom:peerseen` (every heartbeat
round) and `mikrom:apiwrite` (rounds whose heartbeat reached the API server). One Lua script per
round writes this node's entries and reads everyone's with the server's own clock, so node clocks
never matter. The view feeds fence.decide(); a Redis failure gives None (the decision treats it
as "no one to ask").

Entries older than `prune_after(settings)` (an hour, or ten peer windows if that is longer) are
removed by the same script, so a node gone for good (never stopped cleanly, so it never left)
stays on the board at most that long after its last round. Only entries within the peer window
count in the decision, so pruning older ones changes no verdict. An entry that is not a number
(someone else's junk) is removed too.
"""

from __future__ import annotations

import logging

from mikrom import broker

from .fence import PeerView

log = logging.getLogger(__name__)

SEEN_KEY = "mikrom:peerseen"
API_WRITE_KEY = "mikrom:apiwrite"

PRUNE_AFTER_MIN = 3600.0
"""Seconds: the least age at which a node's entry is removed from the board."""

_SCRIPT = """
local t = redis.call('TIME')
local nowf = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now = string.format('%.6f', nowf)
redis.call('HSET', KEYS[1], ARGV[1], now)
if ARGV[2] == '1' then redis.call('HSET', KEYS[2], ARGV[1], now) end
local horizon = nowf - tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  local kept = {}
  for j = 1, #flat, 2 do
    local at = tonumber(flat[j + 1])
    if at == nil or at < horizon then
      redis.call('HDEL', key, flat[j])
    else
      kept[#kept + 1] = flat[j]
      kept[#kept + 1] = flat[j + 1]
    end
  end
  out[i] = kept
end
return {now, out[1], out[2]}
"""


def prune_after(settings) -> float:
    """How old a board entry may get before any node's round removes it."""
    return max(PRUNE_AFTER_MIN, 10 * settings.fence_peer_window_seconds)


def _floats(flat: list) -> dict[str, float]:
    out = {}
    for key, value in zip(flat[0::2], flat[1::2]):
        try:
            out[key.decode() if isinstance(key, bytes) else str(key)] = float(value)
        except (TypeError, ValueError):
            continue  # someone else's junk in the hash proves nothing
    return out


class PeerBoard:
    def __init__(self, settings, node: str):
        self.settings, self.node = settings, node
        self._client = None

    def _redis(self):
        if self._client is None:
            timeout = min(self.settings.redis_timeout_seconds, max(1.0, self.settings.heartbeat_seconds))
            self._client = broker.client(self.settings.broker, timeout=timeout, settings=self.settings)
        return self._client

    def exchange(self, api_ok: bool) -> PeerView | None:
        """Record this round (and, if `api_ok`, this node's API write); everyone's entries."""
        try:
            now, seen, writes = self._redis().eval(_SCRIPT, 2, SEEN_KEY, API_WRITE_KEY, self.node,
                                                   "1" if api_ok else "0", repr(prune_after(self.settings)))
            return PeerView(now=float(now), seen=_floats(seen), api_writes=_floats(writes))
        except Exception as exc:  # noqa: BLE001 - any failure means: no peer to ask
            log.debug("peer board unreachable: %s", exc)
            self.close()
            return None

    def forget(self) -> None:
        """Leave the board (a clean shutdown), so peers stop counting this node as alive."""
        try:
            self._redis().hdel(SEEN_KEY, self.node)
            self._redis().hdel(API_WRITE_KEY, self.node)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not leave the peer board: %s", exc)
        self.close()

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None
