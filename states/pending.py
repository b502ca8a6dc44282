"""pending: the job exists; say so if earlier jobs left orphans for gc."""

from __future__ import annotations

from catalog.records import ORPHAN_HINT, count_uncleaned_orphans
from fsm.context import StepContext
from states.data import ImageJobData
from states.names import ImageEvent
from states.services import ImageServices
from support.errors import PermanentError
from support.log import get_logger

log = get_logger("states.pending")


def run(ctx: StepContext, services: ImageServices) -> str:
    if not ImageJobData(ctx.data).objects:
        raise PermanentError("job has no objects to process")
    with ctx.transaction() as session:
        orphans = count_uncleaned_orphans(session)
    if orphans:
        log.warning(ORPHAN_HINT, orphaned=orphans, job_id=ctx.job_id)
    return ImageEvent.START
