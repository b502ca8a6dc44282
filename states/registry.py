"""Every workflow the product runs, by name."""

from __future__ import annotations

from fsm.definition import Workflow


def all_workflows() -> dict[str, Workflow]:
    return {}
