"""The one retry module (support/retry.py): its waits and its bounds. Pure logic: no
sleeping (the loops are given a sleep that records)."""

from __future__ import annotations

import pytest
from tenacity import retry_if_exception_type

from support.errors import PermanentError, TransientError
from support.retry import Backoff, WaitBudget, retrying


def test_without_jitter_the_waits_double_and_are_capped() -> None:
    budget = WaitBudget(Backoff(initial=1.0, max_wait=8.0), give_up_after=1e9)
    assert [budget.next_wait() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


def test_the_budget_is_the_sum_of_the_waits_asked_for() -> None:
    # Checked before each wait: the last wait may end past give_up_after (as the guard waits always did).
    budget = WaitBudget(Backoff(initial=1.0, max_wait=2.0), give_up_after=5)
    assert [budget.next_wait() for _ in range(4)] == [1.0, 2.0, 2.0, None]
    assert budget.waited == 5.0


def test_jitter_adds_at_most_its_bound_and_never_passes_max_wait() -> None:
    backoff = Backoff(initial=0.5, max_wait=4.0, jitter=0.25)
    for _ in range(50):
        budget = WaitBudget(backoff, give_up_after=1e9)
        waits = [budget.next_wait() for _ in range(6)]
        for n, wait in enumerate(waits, start=1):
            exact = min(0.5 * 2 ** (n - 1), 4.0)
            assert wait is not None and exact <= wait <= min(exact + 0.25, 4.0)


def test_retrying_retries_what_it_is_told_then_raises_the_last_error_itself() -> None:
    slept: list[float] = []
    calls = 0
    with pytest.raises(TransientError, match="busy 3"):
        for attempt in retrying(Backoff(initial=0.5, max_wait=1.0), attempts=3,
                                retry=retry_if_exception_type(TransientError), sleep=slept.append):
            with attempt:
                calls += 1
                raise TransientError(f"busy {calls}")
    assert (calls, slept) == (3, [0.5, 1.0])


def test_retrying_does_not_retry_other_errors() -> None:
    calls = 0
    with pytest.raises(PermanentError):
        for attempt in retrying(Backoff(initial=0.5, max_wait=1.0), attempts=3,
                                retry=retry_if_exception_type(TransientError), sleep=lambda s: None):
            with attempt:
                calls += 1
                raise PermanentError("bad input")
    assert calls == 1
