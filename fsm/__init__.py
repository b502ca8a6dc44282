"""A generic, durable state-machine engine on `transitions` + SQLAlchemy.

Knows nothing about images. See docs/engine.md for the API:
Workflow/StateSpec/TransitionSpec/RetryPolicy (definition), JobStore (persistence),
Runner (run, resume, abort, retry), StepContext (what a step sees).

The names below load their module on first use: `import fsm.definition` (or a CLI
`--help`) does not pay for SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StepContext": "fsm.context", "StopRequested": "fsm.context",
    "ABORTED": "fsm.definition", "COMPLETE": "fsm.definition", "GuardPolicy": "fsm.definition",
    "RetryPolicy": "fsm.definition", "StateSpec": "fsm.definition", "TransitionSpec": "fsm.definition",
    "Workflow": "fsm.definition",
    "InvalidOperation": "fsm.runner", "JobAborted": "fsm.runner", "Runner": "fsm.runner", "RunnerConfig": "fsm.runner",
    "JobBusy": "fsm.store", "JobNotFound": "fsm.store", "JobStore": "fsm.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fsm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
