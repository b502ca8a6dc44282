"""The abort hook: every device this job recorded but did not finish becomes an orphan
row for gc. Runs inside the abort's transaction; touches no device (fail-dumb)."""

from __future__ import annotations

from catalog.device_records import RecordStore
from catalog.ledger import orphan_device
from catalog.records import ORPHAN_HINT, unfinished_devices_of_job
from devices.base import device_name
from fsm.context import StepContext
from support.log import get_logger

log = get_logger("states.aborting")


def record_orphans(ctx: StepContext, reason: str, records: RecordStore) -> None:
    with ctx.transaction() as session:
        for device_id in unfinished_devices_of_job(session, ctx.job_id):
            orphan_device(session, records, device_id=device_id, reason=reason, job_id=ctx.job_id)
            log.error(ORPHAN_HINT, device_id=device_id, device_name=device_name(device_id), job_id=ctx.job_id)
