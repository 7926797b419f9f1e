"""Events are bounded per object per minute: past the budget they are logged, not recorded."""

from __future__ import annotations

from mikrom.operator.status import EventBudget


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_object_gets_at_most_its_budget_of_events_in_a_minute():
    clock = Clock()
    budget = EventBudget(limit=3, window=60, clock=clock)
    assert [budget.allow("u1") for _ in range(5)] == [True, True, True, False, False]


def test_the_budget_returns_as_the_window_slides():
    clock = Clock()
    budget = EventBudget(limit=2, window=60, clock=clock)
    assert budget.allow("u1") and budget.allow("u1") and not budget.allow("u1")
    clock.t += 59
    assert not budget.allow("u1")
    clock.t += 1.5
    assert budget.allow("u1")


def test_one_noisy_object_does_not_use_up_another_ones_budget():
    budget = EventBudget(limit=1, window=60, clock=Clock())
    assert budget.allow("noisy") and not budget.allow("noisy")
    assert budget.allow("quiet")
