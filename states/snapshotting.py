"""snapshotting: a writable copy-on-write snapshot of the image's top layer, active, for a VM."""

from __future__ import annotations

from sqlalchemy import select

from catalog.models import Image, Snapshot
from catalog.records import begin_snapshot, orphan_device
from fsm.context import StepContext
from states.layers import top_device_id
from states.services import ImageServices
from support.log import get_logger

log = get_logger("states.snapshotting")


def run(ctx: StepContext, services: ImageServices) -> str:
    # The guard first, as in creating_device: no row before the health check has passed.
    with services.operation("snapshot"):
        return _snapshot(ctx, services)


def _snapshot(ctx: StepContext, services: ImageServices) -> str:
    origin = top_device_id(ctx)
    with ctx.transaction() as session:
        previous = ctx.data.get("snapshot_device_id")
        row = session.scalars(select(Snapshot).where(Snapshot.device_id == previous)).first() if previous else None
        if row is not None and row.state == "ready":
            return "snapshotted"  # done before an interruption; nothing left to do
        if row is not None:
            orphan_device(session, device_id=row.device_id, job_id=ctx.job_id,
                          reason="snapshot interrupted; contents untrusted")
        row = begin_snapshot(session, image_id=ctx.data["image_id"], origin_device_id=origin, job_id=ctx.job_id)
        ctx.data["snapshot_device_id"] = row.device_id
        snapshot_id, name = row.device_id, row.device_name
    services.pool.create_snapshot(snapshot_id, origin)
    path = services.pool.activate(snapshot_id, services.device_size_bytes)
    with ctx.transaction() as session:
        session.scalars(select(Snapshot).where(Snapshot.device_id == snapshot_id)).one().state = "ready"
        session.get(Image, ctx.data["image_id"]).activation_status = "active"
        ctx.data["snapshot_device"] = path
    log.info("snapshot ready", device_name=name, device=path, origin_device_id=origin)
    return "snapshotted"
