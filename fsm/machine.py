"""Builds a `transitions` machine from a Workflow: conditions and guards become the
machine's conditions, `abort` reaches `aborted` from every non-final state."""

from __future__ import annotations

from typing import Any

from transitions import EventData, Machine

from fsm.context import StepContext
from fsm.definition import ABORT_EVENT, ABORTED, FINAL_STATES, Guard, Condition, Workflow


class JobModel:
    """The machine's model: only `state` (attributes named like triggers would hide them)."""

    state: str
    guard_reason: str | None = None


def _condition(check: Condition) -> Any:
    def run(event: EventData) -> bool:
        return check(event.kwargs["ctx"])

    run.__name__ = getattr(check, "__name__", "condition")  # what the drawn graph shows
    return run


def _guard(check: Guard, model: JobModel) -> Any:
    def run(event: EventData) -> bool:
        reason = check(event.kwargs["ctx"])
        if reason is not None:
            model.guard_reason = reason
        return reason is None

    run.__name__ = getattr(check, "__name__", "guard")
    return run


def transition_table(workflow: Workflow, model: JobModel | None = None) -> list[dict[str, Any]]:
    """The workflow's transitions in `transitions`' dict form, abort edges included."""
    table: list[dict[str, Any]] = []
    for spec in workflow.transitions:
        conditions = [_condition(c) for c in spec.conditions]
        conditions += [_guard(g, model or JobModel()) for g in spec.guards]
        table.append({"trigger": spec.trigger, "source": spec.source, "dest": spec.dest, "conditions": conditions})
    for name in workflow.state_names:
        if name not in FINAL_STATES:
            table.append({"trigger": ABORT_EVENT, "source": name, "dest": ABORTED})
    return table


def build_machine(workflow: Workflow, state: str) -> tuple[JobModel, Machine]:
    """A machine whose model starts in `state` (restored, so no on_enter runs)."""
    model = JobModel()
    machine = Machine(
        model=None,
        states=workflow.state_names,
        transitions=transition_table(workflow, model),
        initial=workflow.initial,
        send_event=True,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )
    # add_model without `initial` would reset a restored job to the workflow's start.
    machine.add_model(model, initial=state)
    return model, machine


def fire(model: JobModel, event: str, ctx: StepContext) -> bool:
    """Fire `event`; True if a transition happened, False if conditions or guards held it."""
    model.guard_reason = None
    return bool(model.trigger(event, ctx=ctx))  # type: ignore[attr-defined]
