"""A workflow is data: states with a step, a resume point and a retry policy, and
transitions between them with conditions. Nothing here runs anything.

    Workflow(
        name="image",
        initial="pending",
        states=[StateSpec("pending", step=start), StateSpec("unpacking", step=unpack,
                 resume_point="making_fs"), ...],
        transitions=[TransitionSpec("start", "pending", "downloading"), ...],
    )

`complete` and `aborted` are the final states of every workflow and are added for you,
together with the operator events (`OperatorEvent`): `abort` from every other state, `resume`
from a state to its resume point, `retry` from `aborted` and `reopen` from `complete`.
fsm/machine.py turns them into edges of the same machine as the workflow's own.

Names may be given as str-valued enums (the product's are in states/names.py); they are
kept as plain strings, so what is stored and printed is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from support.errors import TransientError

if TYPE_CHECKING:
    from fsm.context import StepContext
    from support.retry import Backoff


class FinalState(StrEnum):
    """The two final states every workflow has."""

    COMPLETE = "complete"
    ABORTED = "aborted"


class OperatorEvent(StrEnum):
    """The events the engine adds to every workflow; operators (`fsm abort|retry|resume`)
    and the runner itself fire them. Each is an edge of the job's machine."""

    ABORT = "abort"    # every unfinished state -> aborted
    RESUME = "resume"  # a state -> its resume point, when a job interrupted in it runs again
    RETRY = "retry"    # aborted -> the resume point of the state the job was aborted in
    REOPEN = "reopen"  # complete -> the initial state, when the job's results are gone


# The same names as plain strings: `transitions` treats enum members as enum states.
COMPLETE: str = FinalState.COMPLETE.value
ABORTED: str = FinalState.ABORTED.value
FINAL_STATES: tuple[str, ...] = (COMPLETE, ABORTED)
ABORT_EVENT: str = OperatorEvent.ABORT.value

Step = Callable[["StepContext"], str]
"""Does the state's work and returns the event to fire next."""

Condition = Callable[["StepContext"], bool]
"""Chooses between transitions of one event (e.g. base layer or not)."""

Guard = Callable[["StepContext"], "str | None"]
"""Returns None when the transition may happen, else the reason to wait (health checks)."""

AbortHook = Callable[["StepContext", str], None]
"""Called inside the abort's transaction: records what the job leaves behind, cleans nothing."""

# (state, data before the step, event, data after it or None) -> what the transition concerned
Describe = Callable[[str, Mapping[str, Any], "str | None", "Mapping[str, Any] | None"], "dict[str, Any] | None"]
"""(state, context data, event) -> what it concerns, as a flat JSON dict whose "text" is a
one-line summary (e.g. `layer 3/5 sha256:8297… unpacked`), or None. With an event: a
transition, given the data as it was when the step began (stored in history). With None:
what the job works on now (`fsm show`). Pure: it reads `data`, nothing else."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a state's step is retried: exponential backoff with jitter, bounded."""

    max_attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 30.0
    jitter: float = 0.5
    transient: tuple[type[BaseException], ...] = (TransientError,)

    @property
    def backoff(self) -> Backoff:
        from support.retry import Backoff  # loaded by the runner, not by a command's start-up

        return Backoff(initial=self.initial_wait, max_wait=self.max_wait, jitter=self.jitter)


@dataclass(frozen=True)
class GuardPolicy:
    """How long a job waits on failing guards before it is left waiting for `fsm resume`:
    waits doubling from `initial_wait`, capped at `max_wait`, no jitter (one job waits on
    its own condition; there is no herd to spread), until they add up to `give_up_after`."""

    initial_wait: float = 1.0
    max_wait: float = 30.0
    give_up_after: float = 600.0

    def __post_init__(self) -> None:
        if self.initial_wait <= 0 or self.max_wait < self.initial_wait:
            raise ValueError("GuardPolicy needs 0 < initial_wait <= max_wait")

    @property
    def backoff(self) -> Backoff:
        from support.retry import Backoff  # loaded by the runner, not by a command's start-up

        return Backoff(initial=self.initial_wait, max_wait=self.max_wait)


@dataclass(frozen=True)
class StateSpec:
    """One state: its step, where an interrupted step restarts, and its retry policy."""

    name: str
    step: Step | None = None
    resume_point: str | None = None  # None: the state itself
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    description: str = ""

    def __post_init__(self) -> None:
        _plain(self, "name", "resume_point")


@dataclass(frozen=True)
class TransitionSpec:
    """`trigger` moves `source` to `dest` when every condition holds and every guard passes."""

    trigger: str
    source: str
    dest: str
    conditions: tuple[Condition, ...] = ()
    guards: tuple[Guard, ...] = ()

    def __post_init__(self) -> None:
        _plain(self, "trigger", "source", "dest")


@dataclass(frozen=True)
class Workflow:
    """A named, versionless description of a job's life (the engine stores only its name)."""

    name: str
    initial: str
    states: tuple[StateSpec, ...]
    transitions: tuple[TransitionSpec, ...]
    on_abort: AbortHook | None = None
    guard_policy: GuardPolicy = field(default_factory=GuardPolicy)
    describe: Describe | None = None

    def __post_init__(self) -> None:
        _plain(self, "initial")
        names = [s.name for s in self.states]
        if len(set(names)) != len(names):
            raise ValueError(f"workflow {self.name}: duplicate state names")
        known = set(names) | set(FINAL_STATES)
        if self.initial not in known:
            raise ValueError(f"workflow {self.name}: unknown initial state {self.initial}")
        for spec in self.states:
            if spec.name in FINAL_STATES:
                raise ValueError(f"workflow {self.name}: {spec.name} is a final state, added for you")
            if spec.step is None:
                raise ValueError(f"workflow {self.name}: state {spec.name} has no step")
            if spec.resume_point is not None and spec.resume_point not in known:
                raise ValueError(f"workflow {self.name}: {spec.name} resumes at unknown {spec.resume_point}")
        for t in self.transitions:
            if t.source not in known or t.dest not in known:
                raise ValueError(f"workflow {self.name}: transition {t.trigger} {t.source}->{t.dest} names an unknown state")
            if t.source in FINAL_STATES:
                raise ValueError(f"workflow {self.name}: no transition may leave final state {t.source}")

    @property
    def state_names(self) -> list[str]:
        return [s.name for s in self.states] + list(FINAL_STATES)

    @property
    def triggers(self) -> list[str]:
        """The workflow's own events (the operator events come on top), in definition order."""
        return list(dict.fromkeys(t.trigger for t in self.transitions))

    def state(self, name: str) -> StateSpec:
        for spec in self.states:
            if spec.name == name:
                return spec
        raise KeyError(f"workflow {self.name} has no state {name}")

    def detail(self, state: str, data: Mapping[str, Any], event: str | None,
               after: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The describe hook's answer, None without a hook. `data` is what the step found,
        `after` what it left (a step may learn what it concerned: a layer's digest)."""
        return self.describe(state, data, event, after) if self.describe is not None else None

    def resume_point(self, name: str) -> str:
        """Where a job interrupted inside `name` restarts."""
        if name in FINAL_STATES:
            return name
        return self.state(name).resume_point or name


def _plain(spec: object, *names: str) -> None:
    """Store the named fields as plain `str` (an enum member becomes its value), so the
    machine, the database and every printout see exactly the string, never the enum."""
    for name in names:
        value = getattr(spec, name)
        if value is not None:
            object.__setattr__(spec, name, str(value))
