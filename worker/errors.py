"""Which failures a task retries, and how long it waits: transient errors only, with exponential
backoff and jitter (so a fleet of retries does not hit the API server in lockstep).

Everything else either became a status (a refused image, a VM that would not boot: the reconciler
wrote phase Failed with its reason) or is a bug, which retrying would only repeat.
"""

from __future__ import annotations

import random

import urllib3.exceptions
from kubernetes.client.rest import ApiException

from . import images, ipalloc, netdev
from .locks import LockTimeout
from .status import ConflictStorm
from .vmm import StopFailed

RETRY_BASE_SECONDS = 2.0
RETRY_CAP_SECONDS = 60.0
MAX_RETRIES = 8

TRANSIENT_API_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
TRANSIENT_TYPES = (
    LockTimeout,                 # another operation on the VM is still running
    ConflictStorm,               # the object kept changing under our status write
    netdev.NetdevError,          # an `ip`/`iptables` call failed or timed out
    images.ImageDownloadFailed,  # the image server may answer next time
    images.RootfsCopyFailed,     # disk pressure may pass
    ipalloc.NoAddressBlock,      # the operator has not assigned the node's block yet
    StopFailed,                  # a VMM in uninterruptible sleep
    urllib3.exceptions.HTTPError,  # API server unreachable, timed out, connection reset
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status is None or exc.status == 0 or exc.status in TRANSIENT_API_STATUSES
    if isinstance(exc, TRANSIENT_TYPES):
        return True
    try:
        import redis
        import kombu.exceptions
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            kombu.exceptions.OperationalError))


def backoff(retries: int, base: float = RETRY_BASE_SECONDS, cap: float = RETRY_CAP_SECONDS,
            rand: random.Random | None = None) -> float:
    """Seconds before retry number `retries` + 1: exponential, capped, with "equal jitter" (a
    random point in the upper half, so the delay still grows but retries spread out)."""
    ceiling = min(cap, base * 2 ** max(0, retries))
    return ceiling / 2 + (rand or random).uniform(0, ceiling / 2)
