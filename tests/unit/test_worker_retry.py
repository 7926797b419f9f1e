"""Retries: transient errors only, with capped exponential backoff and jitter."""

import random

import pytest
import urllib3
from kubernetes.client.rest import ApiException

from mikrom.worker import errors, images, ipalloc, netdev
from mikrom.worker.locks import LockTimeout


@pytest.mark.parametrize("exc", [
    ApiException(status=503), ApiException(status=429), ApiException(status=409), ApiException(status=0),
    urllib3.exceptions.MaxRetryError(None, "/", "refused"), LockTimeout("busy"), netdev.NetdevError("ip failed"),
    images.ImageDownloadFailed("reset"), ipalloc.NoAddressBlock("none yet"), ConnectionResetError(),
])
def test_transient_errors_are_retried(exc):
    assert errors.is_transient(exc)


@pytest.mark.parametrize("exc", [
    ApiException(status=403), ApiException(status=422), images.ChecksumMismatch("x"), images.ImageRefused("x"),
    ValueError("bug"), KeyError("bug"),
])
def test_permanent_errors_and_bugs_are_not_retried(exc):
    assert not errors.is_transient(exc)


def test_backoff_grows_stays_within_its_cap_and_is_jittered():
    rand = random.Random(7)
    delays = [[errors.backoff(n, base=2, cap=60, rand=rand) for _ in range(50)] for n in range(8)]
    for n, ds in enumerate(delays):
        ceiling = min(60, 2 * 2 ** n)
        assert all(ceiling / 2 <= d <= ceiling for d in ds)
        assert len(set(ds)) > 40  # spread out, not in lockstep
    assert max(delays[-1]) <= 60
