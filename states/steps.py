"""What every workflow of the product builds its states from: a step bound to the services,
the health guard of device states, and the retry policy of kernel-facing steps. One builder
for the image job and the snapshot job, so an abort or a shutdown reaches either the same way."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from fsm.context import StepContext
from fsm.definition import RetryPolicy
from safeguards.guard import interruptible
from states.aborting import record_orphans
from states.services import ImageServices

# Kernel-facing steps are not retried: a failure there is a hazard, handled by abort.
NO_RETRY = RetryPolicy(max_attempts=1)

Step = Callable[[StepContext], str]


def bound_step(services: ImageServices | None, module_run: Callable[[StepContext, ImageServices], str]) -> Step:
    """`module_run` with the services bound; a step queued on the Operation Guard gives up
    the wait on `fsm abort` or shutdown (the job's check_interrupt runs while it waits)."""
    bound = partial(module_run, services=services)

    def run(ctx: StepContext) -> str:
        with interruptible(ctx.check_interrupt):
            return bound(ctx)

    return run


def health_guard(services: ImageServices | None) -> Callable[[StepContext], str | None]:
    """The guard of every transition into a state that touches devices: None when healthy,
    else why the job waits (None for a workflow built only to be drawn)."""

    def healthy(ctx: StepContext) -> str | None:
        return services.health_guard() if services is not None else None

    return healthy


def abort_hook(services: ImageServices | None) -> Callable[[StepContext, str], None]:
    """What an abort does in either workflow: every device the job recorded but did not
    finish becomes an orphan for gc (its record says so too); nothing is touched. The image
    job's layers still downloading in the background are not wanted any more."""

    def on_abort(ctx: StepContext, reason: str) -> None:
        if services is None:
            return
        record_orphans(ctx, reason, services.records)
        services.prefetch.cancel(ctx.job_id)

    return on_abort
