"""glibc's allocator told to give large blocks back once they are freed.

glibc serves a request above its mmap threshold (128 KiB at first) with a mapping of its own,
returned to the system on free, but raises that threshold to the size of each such block freed,
up to 32 MiB. The operator's large blocks come in bursts: each TLS connection's 256 KiB read buffer
(asyncio's SSL protocol), kopf's watch-stream chunks of up to 1 MiB, big API responses. After the
first burst the threshold has risen past them all, so the next burst takes them from the heap,
where a few small objects allocated around them keep the pages resident long after they are
freed (`malloc_trim` cannot return pages that still hold live chunks). Fixing the threshold keeps
every large block a mapping of its own, given back when freed. Elsewhere than glibc, nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""
MMAP_THRESHOLD = 128 * 1024
"""Bytes from which a block gets a mapping of its own: glibc's initial value, kept fixed."""


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (and so turn off its rising); False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("could not fix the allocator's mmap threshold")
        return False
    return True
