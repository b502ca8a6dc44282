"""A generic, durable state-machine engine on `transitions` + SQLAlchemy.

Knows nothing about images. See docs/engine.md for the API:
Workflow/StateSpec/TransitionSpec/RetryPolicy (definition), JobStore (persistence),
Runner (run, resume, abort, retry), StepContext (what a step sees).
"""

from fsm.context import StepContext, StopRequested
from fsm.definition import (
    ABORTED,
    COMPLETE,
    GuardPolicy,
    RetryPolicy,
    StateSpec,
    TransitionSpec,
    Workflow,
)
from fsm.runner import InvalidOperation, JobAborted, Runner, RunnerConfig
from fsm.store import JobBusy, JobNotFound, JobStore

__all__ = [
    "ABORTED", "COMPLETE", "GuardPolicy", "InvalidOperation", "JobAborted", "JobBusy", "JobNotFound",
    "JobStore", "RetryPolicy", "Runner", "RunnerConfig", "StateSpec", "StepContext", "StopRequested",
    "TransitionSpec", "Workflow",
]
