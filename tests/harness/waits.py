"""Waiting on conditions: `wait_for` until something becomes true, `holds_for` that something stays
true through a quiet window. Every wait in the tests goes through these two, never a bare sleep."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """What was waited for did not happen in time (a test failure, and a TimeoutError for callers
    that catch that)."""


class WaitAborted(AssertionError):
    """The wait was given up early: what it waited for can no longer happen (a process exited, a
    VM reached a phase it must not)."""


class StoppedHolding(AssertionError):
    """Something that had to stay true for a window did not."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str = "the condition", interval: float = 0.2,
             abort: Callable[[], object] | None = None) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    `abort`, if given, is polled after each miss: whatever truthy it returns ends the wait at once
    as the failure's message. Fails (WaitTimeout) saying `what` did not happen and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if abort is not None:
            why = abort()
            if why:
                raise WaitAborted(f"gave up waiting for {what}: {why} (last: {last!r})")
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def holds_for(predicate: Callable[[], T], seconds: float, what: str = "the condition", interval: float = 0.2) -> T:
    """Poll `predicate` for `seconds` and fail (StoppedHolding) the first time it is falsy: a
    quiet window in which nothing may change (no duplicate message, no retry, no flapping).
    Returns its last value."""
    started = time.monotonic()
    deadline = started + seconds
    while True:
        value = predicate()
        if not value:
            raise StoppedHolding(f"{what} stopped holding after {time.monotonic() - started:.1f}s of {seconds}s "
                                 f"(got {value!r})")
        if time.monotonic() >= deadline:
            return value
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
