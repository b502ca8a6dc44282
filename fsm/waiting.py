"""How a job waits: in slices, checking for an abort request and for shutdown before each
one, so `fsm abort` reaches a waiting job within a slice; and each stretch of waiting
(an episode) becomes one history row when it ends.

    clock = RealClock(stop_event)
    pause(ctx, 16.0, clock)           # raises AbortRequested / StopRequested when asked
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from fsm.context import AbortRequested, StepContext, StopRequested
from fsm.models import JobNote, NoteKind, WaitOutcome
from fsm.store import LostOwnership, utcnow

# An abort or a shutdown is noticed within this; the bound is 1 s. Each slice costs
# one indexed read of the job's row.
INTERRUPT_SLICE_SECONDS = 0.25


class Clock(Protocol):
    """Time as the waits see it; tests inject one that counts and does not sleep."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class RealClock:
    """Wall time; a sleep returns early when `stop_event` is set (the next check raises)."""

    stop_event: threading.Event

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)


def pause(ctx: StepContext, seconds: float, clock: Clock) -> None:
    """Sleep `seconds` in slices of at most INTERRUPT_SLICE_SECONDS; before each slice (and
    once when there is nothing to sleep) raise what `ctx.check_interrupt` raises."""
    deadline = clock.monotonic() + seconds
    while True:
        ctx.check_interrupt()
        left = deadline - clock.monotonic()
        if left <= 0:
            return
        clock.sleep(min(left, INTERRUPT_SLICE_SECONDS))


@dataclass
class Episode:
    """One stretch of waiting on one thing (a guard, a step not ready, a retry back-off)."""

    kind: NoteKind
    state: str
    event: str | None = None
    started_at: datetime = field(default_factory=utcnow)
    reasons: list[str] = field(default_factory=list)
    waits: int = 0
    outcome: WaitOutcome | None = None  # set by the waiter when it ends the wait itself

    def saw(self, reason: str) -> None:
        """Count one more wait, for `reason` (kept once, in the order first seen)."""
        self.waits += 1
        if reason not in self.reasons:
            self.reasons.append(reason)

    def ended_by(self, exc: BaseException | None) -> WaitOutcome | None:
        """How the episode ended; None when it must not be written (no waits, or the job
        is no longer ours to write for)."""
        if self.waits == 0 or isinstance(exc, LostOwnership):
            return None
        if self.outcome is not None:
            return self.outcome
        if exc is None:
            return WaitOutcome.PASSED
        if isinstance(exc, AbortRequested):
            return WaitOutcome.ABORTED
        if isinstance(exc, StopRequested):
            return WaitOutcome.STOPPED
        return WaitOutcome.FAILED

    def note(self, job_id: int, outcome: WaitOutcome) -> JobNote:
        """The history row of this episode, ending now."""
        return JobNote(job_id=job_id, kind=self.kind.value, state=self.state, event=self.event,
                       started_at=self.started_at, finished_at=utcnow(), reasons=json.dumps(self.reasons),
                       waits=self.waits, outcome=outcome.value)
