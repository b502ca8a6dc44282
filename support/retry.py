"""The product's one way to retry and to wait again: tenacity, with bounded exponential
back-off and jitter. Every loop that tries something again takes its waits from here:

* a step's transient failures (fsm/runner.py: `retrying(...)`, attempts bounded);
* a job held by a failing guard or a step not ready (fsm/runner.py: `WaitBudget`, the
  waits bounded by a total, then the job is left waiting for `fsm resume`);
* `dmsetup remove` answering EBUSY (devices/devicemapper.py).

    policy = Backoff(initial=0.5, max_wait=30.0, jitter=0.5)
    for attempt in retrying(policy, attempts=3, retry=retry_if_exception_type(TransientError)):
        with attempt:
            do_it()

The n-th wait is `initial * 2**(n-1)` plus a uniform jitter in [0, jitter), capped at
`max_wait` (tenacity's `wait_exponential_jitter`). With `jitter=0` the waits are exact:
1, 2, 4, 8 ... capped, what the guard waits' tests count on.

tenacity loads only when a loop is built: the policies are plain data, so a definition
that holds one (fsm/definition.py) costs a command's start-up nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenacity import RetryCallState, Retrying
    from tenacity.retry import RetryBaseT
    from tenacity.wait import wait_base


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential back-off with jitter: the n-th wait is initial * 2**(n-1)
    + uniform(0, jitter), never more than max_wait."""

    initial: float
    max_wait: float
    jitter: float = 0.0

    def strategy(self) -> wait_base:
        """The tenacity wait strategy of this policy."""
        from tenacity import wait_exponential_jitter

        return wait_exponential_jitter(multiplier=self.initial, max=self.max_wait, jitter=self.jitter)


def retrying(backoff: Backoff, *, attempts: int, retry: RetryBaseT,
             sleep: Callable[[float], None] | None = None,
             before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """A tenacity loop: at most `attempts` attempts, retried while `retry` says so, waiting
    `backoff` between them; the last failure is raised as itself (not as RetryError).
    `sleep` replaces time.sleep (the engine's waits are interruptible)."""
    from tenacity import Retrying, stop_after_attempt

    extra: dict[str, Any] = {}
    if sleep is not None:
        extra["sleep"] = sleep
    if before_sleep is not None:
        extra["before_sleep"] = before_sleep
    return Retrying(stop=stop_after_attempt(attempts), wait=backoff.strategy(), retry=retry, reraise=True, **extra)


class WaitBudget:
    """The waits of one loop that checks a condition again and again (a guard, a health
    check): each wait from `backoff`, until their sum reaches `give_up_after`.

    Like tenacity's own stop on idle time, the budget counts the waits asked for, not the
    clock: a loop whose checks are slow still waits the same number of times."""

    def __init__(self, backoff: Backoff, give_up_after: float) -> None:
        from tenacity import RetryCallState

        self._strategy = backoff.strategy()
        self._state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        self._state.attempt_number = 0
        self.give_up_after = give_up_after
        self.waited = 0.0

    def next_wait(self) -> float | None:
        """Seconds to wait now, or None once the budget is spent."""
        if self.waited >= self.give_up_after:
            return None
        self._state.attempt_number += 1
        wait = self._strategy(self._state)
        self.waited += wait
        return wait
