"""Redis broker access with timeouts, and a check that turns connection problems into one clear
error (which host, what went wrong, never the password).

Also what the broker's credentials must be before a component starts (`require_password`), and
the TLS (`rediss://`) and Sentinel (`sentinel://`) options that Celery and plain Redis clients
need, from the settings.
"""

from __future__ import annotations

import ssl
import sys
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import redis

from .settings import url_password

if TYPE_CHECKING:
    from .settings import Settings

REDIS_SCHEMES = ("redis", "rediss", "sentinel")
"""Schemes whose servers take a password; anything else (a unix socket, memory://) is not checked."""

CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
SENTINEL_PORT = 26379


class BrokerUnavailable(RuntimeError):
    """Redis cannot be used right now; callers retry with backoff."""

    reason = "BrokerUnavailable"


class InsecureBroker(RuntimeError):
    """The broker settings are refused (no password, or TLS settings that make no sense): the
    component does not start until they are fixed."""

    reason = "InsecureBroker"


def redacted(url: str) -> str:
    """The URL (or each of a `;`-joined list) without user, password or query: safe for logs and events."""
    out = []
    for part in url.split(";"):
        try:
            parts = urlsplit(part)
            host = parts.hostname or "localhost"
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            out.append("(unparsable URL)")
            continue
        out.append(f"{parts.scheme}://{host}{port}{parts.path}")
    return ";".join(out)


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


# ------------------------------------------------------------------------------ start-up rules

def require_password(settings: "Settings") -> None:
    """Raise InsecureBroker if the broker or the result backend is a Redis URL without a
    password, unless `broker_allow_no_password` is set. The message names the setting and the
    host, never a password."""
    if settings.broker_allow_no_password:
        return
    missing = []
    urls = [("MIKROM_BROKER_URL", settings.broker)]
    if settings.result_backend:  # empty: the broker's URL, checked already
        urls.append(("MIKROM_RESULT_BACKEND", settings.backend))
    for env, url in urls:
        parts = [p for p in url.split(";") if scheme(p) in REDIS_SCHEMES]
        if any(not url_password(p) for p in parts):
            missing.append(f"{env} ({redacted(url)})")
    if missing:
        raise InsecureBroker(
            f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no password: anyone who "
            "can reach that Redis could send tasks to every node. Put the password in the URL "
            "(redis://:PASSWORD@host:6379/0) or in MIKROM_REDIS_PASSWORD (from a Secret); "
            "MIKROM_BROKER_ALLOW_NO_PASSWORD=true starts anyway, for a Redis that nobody else can reach.")


def refuse_to_start(settings: "Settings", component: str) -> None:
    """For entry points: exit with status 2 and one line on stderr if the broker settings are
    refused (no password, see `require_password`; or TLS settings that make no sense). The line
    never holds the password."""
    try:
        require_password(settings)
        if "rediss" in (scheme(settings.broker), scheme(settings.backend)):
            tls_options(settings)
    except InsecureBroker as exc:
        sys.stderr.write(f"mikrom {component}: refusing to start: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None


def tls_options(settings: "Settings") -> dict:
    """The `ssl_*` options of a `rediss://` connection (Celery's `broker_use_ssl` and
    `redis_backend_use_ssl`, and redis-py's keyword arguments)."""
    reqs = (settings.broker_cert_reqs or "required").strip().lower()
    if reqs not in CERT_REQS:
        raise InsecureBroker(f"MIKROM_BROKER_CERT_REQS must be one of {', '.join(CERT_REQS)}, not {reqs!r}")
    if bool(settings.broker_cert_file) != bool(settings.broker_key_file):
        raise InsecureBroker("MIKROM_BROKER_CERT_FILE and MIKROM_BROKER_KEY_FILE go together: set both or neither")
    options = {"ssl_cert_reqs": CERT_REQS[reqs], "ssl_check_hostname": reqs == "required"}
    if settings.broker_ca_file:
        options["ssl_ca_certs"] = settings.broker_ca_file
    if settings.broker_cert_file:
        options["ssl_certfile"] = settings.broker_cert_file
        options["ssl_keyfile"] = settings.broker_key_file
    return options


# ------------------------------------------------------------------------------ clients

def client(url: str, timeout: float = 5.0, settings: "Settings | None" = None) -> redis.Redis:
    """A Redis client for `url` with timeouts; `settings` gives the TLS options of a `rediss://`
    URL and the master name of a `sentinel://` one."""
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme(url) == "sentinel":
        return _sentinel_master(url, settings.broker_sentinel_master if settings else "mymaster", timeouts)
    extra = tls_options(settings) if settings is not None and scheme(url) == "rediss" else {}
    return redis.Redis.from_url(url, **timeouts, **extra)


def _sentinel_master(url: str, master: str, timeouts: dict) -> redis.Redis:
    from redis.sentinel import Sentinel

    parts = [urlsplit(p) for p in url.split(";") if p]
    hosts = [(p.hostname or "localhost", p.port or SENTINEL_PORT) for p in parts]
    first = parts[0]
    db = int(first.path.strip("/") or 0)
    sentinels = Sentinel(hosts, sentinel_kwargs=dict(timeouts), password=url_password(url.split(";")[0]) or None,
                         username=unquote(first.username) if first.username else None, db=db, **timeouts)
    return sentinels.master_for(master, **timeouts)


def check(url: str, timeout: float = 5.0, settings: "Settings | None" = None) -> None:
    """Connect, authenticate and PING; raise BrokerUnavailable saying what failed."""
    where = redacted(url)
    try:
        with client(url, timeout, settings) as r:
            r.ping()
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(f"Redis at {where}: authentication failed (wrong or missing password): {exc}") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise BrokerUnavailable(f"Redis at {where}: authentication failed (wrong or missing password): {exc}") from None
        raise BrokerUnavailable(f"Redis at {where}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"Redis at {where}: cannot connect: {exc}") from None
