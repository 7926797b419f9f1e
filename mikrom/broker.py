"""Redis broker access with timeouts, and a check that turns connection problems into one clear
error (which host, what went wrong, never the password)."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis


class BrokerUnavailable(RuntimeError):
    """Redis cannot be used right now; callers retry with backoff."""

    reason = "BrokerUnavailable"


def redacted(url: str) -> str:
    """The URL without its password, safe for logs and events."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def client(url: str, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def check(url: str, timeout: float = 5.0) -> None:
    """Connect, authenticate and PING; raise BrokerUnavailable saying what failed."""
    where = redacted(url)
    try:
        with client(url, timeout) as r:
            r.ping()
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(f"Redis at {where}: authentication failed (wrong or missing password): {exc}") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise BrokerUnavailable(f"Redis at {where}: authentication failed (wrong or missing password): {exc}") from None
        raise BrokerUnavailable(f"Redis at {where}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"Redis at {where}: cannot connect: {exc}") from None
