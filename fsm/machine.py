"""Builds a `transitions` machine from a Workflow: conditions and guards become the
machine's conditions, and the operator events become edges like any other:

    abort   every unfinished state -> aborted
    resume  a state -> its resume point (only where the two differ)
    retry   aborted -> each resume point, on condition that the job was aborted in a state
            that resumes there (the runner passes `aborted_from`, read from history)
    reopen  complete -> the initial state

Every change of a job's state is a `fire` on this machine; the runner then persists the
edge the machine took (fsm/store.py, one compare-and-set transaction)."""

from __future__ import annotations

from typing import Any

from transitions import EventData, Machine

from fsm.context import StepContext
from fsm.definition import ABORTED, COMPLETE, Condition, Guard, OperatorEvent, Workflow


class JobModel:
    """The machine's model: only `state` (attributes named like triggers would hide them)."""

    state: str
    guard_reason: str | None = None
    # An operator's abort request as the job's row last said it (its claim, each transition):
    # read in the transactions the runner commits anyway, not once more per step.
    abort_requested: str | None = None


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


def _aborted_in(states: list[str]) -> Any:
    def run(event: EventData) -> bool:
        return event.kwargs.get("aborted_from") in states

    run.__name__ = "aborted_in_" + "_or_".join(states)  # what the drawn graph shows
    return run


def transition_table(workflow: Workflow, model: JobModel | None = None) -> list[dict[str, Any]]:
    """The workflow's transitions in `transitions`' dict form, operator events included."""
    table: list[dict[str, Any]] = []
    for spec in workflow.transitions:
        conditions = [_condition(c) for c in spec.conditions]
        conditions += [_guard(g, model or JobModel()) for g in spec.guards]
        table.append({"trigger": spec.trigger, "source": spec.source, "dest": spec.dest, "conditions": conditions})
    return table + operator_edges(workflow)


def operator_edges(workflow: Workflow) -> list[dict[str, Any]]:
    """abort, resume, retry and reopen as edges of the workflow's machine."""
    unfinished = [spec.name for spec in workflow.states]
    edges: list[dict[str, Any]] = [{"trigger": OperatorEvent.ABORT.value, "source": name, "dest": ABORTED}
                                   for name in unfinished]
    resumes_at: dict[str, list[str]] = {}
    for name in unfinished:
        point = workflow.resume_point(name)
        resumes_at.setdefault(point, []).append(name)
        if point != name:
            edges.append({"trigger": OperatorEvent.RESUME.value, "source": name, "dest": point})
    edges += [{"trigger": OperatorEvent.RETRY.value, "source": ABORTED, "dest": point, "conditions": [_aborted_in(states)]}
              for point, states in resumes_at.items()]
    edges.append({"trigger": OperatorEvent.REOPEN.value, "source": COMPLETE, "dest": workflow.initial})
    return edges


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


def can_fire(machine: Machine, state: str, event: str) -> bool:
    """True when the machine has an edge for `event` out of `state` (conditions aside)."""
    return event in machine.get_triggers(state)


def fire(model: JobModel, event: str, ctx: StepContext, **facts: Any) -> bool:
    """Fire `event`; True if a transition happened, False if conditions or guards held it.
    `facts` are what the operator events' conditions read (retry: `aborted_from`)."""
    model.guard_reason = None
    return bool(model.trigger(str(event), ctx=ctx, **facts))  # type: ignore[attr-defined]
