"""The peers' board in Redis: when each node last checked in and last wrote to the API server.

Two hashes, node name → Redis `TIME` (seconds, as a string): `mikrom:peerseen` (every heartbeat
round) and `mikrom:apiwrite` (rounds whose heartbeat reached the API server). One Lua script per
round writes this node's entries and reads everyone's with the server's own clock, so node clocks
never matter. The view feeds fence.decide(); a Redis failure gives None (the decision treats it
as "no one to ask").
"""

from __future__ import annotations

import logging

from mikrom import broker

from .fence import PeerView

log = logging.getLogger(__name__)

SEEN_KEY = "mikrom:peerseen"
API_WRITE_KEY = "mikrom:apiwrite"

_SCRIPT = """
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
redis.call('HSET', KEYS[1], ARGV[1], now)
if ARGV[2] == '1' then redis.call('HSET', KEYS[2], ARGV[1], now) end
return {now, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


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
                                                   "1" if api_ok else "0")
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
