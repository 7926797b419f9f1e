"""The harness's two waits: `wait_for` returns what it waited for or fails naming it, `holds_for`
fails the moment a quiet window is broken."""

import time

import pytest
from harness.waits import StoppedHolding, WaitAborted, WaitTimeout, holds_for, wait_for


def test_wait_for_returns_the_first_truthy_value():
    values = iter([None, 0, "", "ready"])
    assert wait_for(lambda: next(values), 5, "the value", interval=0.01) == "ready"


def test_wait_for_fails_after_its_timeout_naming_what_and_the_last_value():
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waiting for the answer \(last: \[\]\)") as err:
        wait_for(lambda: [], 0.3, "the answer", interval=0.05)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert isinstance(err.value, AssertionError) and isinstance(err.value, TimeoutError)


def test_wait_for_gives_up_at_once_when_abort_says_why():
    t0 = time.monotonic()
    with pytest.raises(WaitAborted, match="the process exited"):
        wait_for(lambda: None, 30, "a listener", interval=0.01, abort=lambda: "the process exited")
    assert time.monotonic() - t0 < 1


def test_holds_for_lasts_its_window_while_the_condition_stays_true():
    t0 = time.monotonic()
    assert holds_for(lambda: "quiet", 0.3, "the silence", interval=0.05) == "quiet"
    assert 0.3 <= time.monotonic() - t0 < 2


def test_holds_for_fails_as_soon_as_the_condition_breaks():
    calls = []

    def quiet_until_the_third_look():
        calls.append(1)
        return len(calls) < 3

    t0 = time.monotonic()
    with pytest.raises(StoppedHolding, match="no duplicate stopped holding"):
        holds_for(quiet_until_the_third_look, 30, "no duplicate", interval=0.01)
    assert time.monotonic() - t0 < 1 and len(calls) == 3
