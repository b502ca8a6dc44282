"""snapshotting: a writable copy-on-write snapshot of the image's top layer, active, for a
VM. Shared by the image job (its first snapshot, no VM id, the origin's size) and the
snapshot job (one per VM id, at the size asked, never below the origin's).

A snapshot larger than its origin is activated at its own size and its ext4 grown before
it is handed out. An interrupted run's unfinished snapshot is not trusted: recorded for
gc, and a new one is made."""

from __future__ import annotations

from sqlalchemy.orm import Session

from catalog.ledger import Device, DeviceLedger, device_of_row, engine_transactions
from catalog.models import DeviceState
from catalog.records import get_image, mark_image_active, snapshot_of_job, top_layer_device
from devices.base import OriginMissing
from devices.filesystem import add_journal, grow_filesystem
from fsm.context import StepContext
from fsm.definition import COMPLETE
from fsm.models import Job
from fsm.runner import Runner
from states.data import JobData
from states.names import ImageEvent
from states.services import ImageServices
from support.errors import ManagerError, PermanentError
from support.log import get_logger

log = get_logger("states.snapshotting")


def run(ctx: StepContext, services: ImageServices) -> str:
    # The guard first, as in creating_device: no row before the health check has passed.
    with services.operation("snapshot"):
        return _snapshot(ctx, services)


def _snapshot(ctx: StepContext, services: ImageServices) -> str:
    ledger = services.ledger(ctx)
    data = JobData(ctx.data)  # either workflow's: the image job's first snapshot, or a VM's
    image_id = data.image_id
    with ctx.reading() as session:
        origin = origin_device(session, image_id)
        previous = snapshot_of_job(session, ctx.job_id)
        previous_device = device_of_row(previous) if previous is not None else None
    if previous_device is not None and previous_device.state == DeviceState.READY:
        # Ready before an interruption: only the hand-out (activation, image active) may be missing.
        return _hand_out(ctx, previous_device, ledger.activate(previous_device.device_id), origin)
    if previous_device is not None:
        ledger.orphan(previous_device.device_id, job_id=ctx.job_id,
                      reason=f"snapshot interrupted in state {previous_device.state}; contents untrusted")
    size = int(data.snapshot_size_bytes or origin.size_bytes)
    try:
        snapshot = ledger.create_vm_snapshot(image_id=image_id, origin=origin, vm_id=data.vm_id,
                                             size_bytes=size, job_id=ctx.job_id)
    except OriginMissing:  # a reset pool, or a lost pool file: nothing was made
        raise PermanentError(f"image {data.image['name']!r}: its device {origin.name} is missing from the "
                             "pool; process the image again") from None
    # No save of the context here: the snapshot's row names this job (snapshot_of_job finds
    # it after a crash), and every commit is a WAL fsync on a VM's critical path.
    path = ledger.activate(snapshot)
    if snapshot.size_bytes > origin.size_bytes:
        grow_filesystem(path)
    journal_for_vm(path)
    with ctx.transaction():  # ready and handed out in one commit (the record first, as always)
        return _hand_out(ctx, ledger.mark_ready(snapshot.device_id), path, origin)


def hand_out_again(runner: Runner, job: Job, snapshot: Device, services: ImageServices) -> Job:
    """A complete job (either workflow's), its snapshot active and its context naming the
    path the kernel gives it now: after a reboot the disks are bound anew, to other loop
    numbers, and the path the job first gave may be another disk's. One index lookup when
    nothing changed; the context is amended when it did, so `fsm show` and a polling client
    agree with the answer."""
    path = DeviceLedger(services.pool, engine_transactions(runner.store.engine)).activate(snapshot)
    data = JobData.of(job.context)
    if data.snapshot_device == path and data.snapshot_device_id == snapshot.device_id:
        return job
    log.info("snapshot handed out at its current path", job_id=job.id, device_name=snapshot.name, device=path,
             was=data.snapshot_device)
    data.snapshot_device_id = snapshot.device_id
    data.snapshot_device = path
    return runner.store.amend_result(job.id, COMPLETE, dict(data.data))


def journal_for_vm(path: str) -> None:
    """Layers are journal-less (devices/filesystem.py); the VM's snapshot gets its journal
    here, before it is handed out (issue 12's space work)."""
    if add_journal(path):
        log.info("journal added to snapshot", device=path)


def origin_device(session: Session, image_id: int) -> Device:
    """The image's top layer device, which must be ready: what every VM snapshot copies."""
    image = get_image(session, image_id)
    row = top_layer_device(session, image) if image is not None else None
    if row is None or row.state != DeviceState.READY:
        raise ManagerError(f"image {image_id} has no ready top layer device to snapshot")
    return device_of_row(row)


def _hand_out(ctx: StepContext, snapshot: Device, path: str, origin: Device) -> str:
    data = JobData(ctx.data)
    with ctx.transaction() as session:
        mark_image_active(session, data.image_id)
        data.snapshot_device_id = snapshot.device_id
        data.snapshot_device = path
    log.info("snapshot ready", device_name=snapshot.name, device=path, origin_device_id=origin.device_id,
             vm_id=data.vm_id, size=snapshot.size_bytes, origin_size=origin.size_bytes)
    return ImageEvent.SNAPSHOTTED
