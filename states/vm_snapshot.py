"""The snapshot job: one more VM's copy-on-write snapshot of a complete image.

    pending -> activating -> snapshotting -> complete       (any non-final --abort--> aborted)

One job per (image, VM id): a second request for the same pair returns the same job.
`pending` checks the image can be snapshotted at the size asked; `activating` makes sure
its top layer device is in the pool and marks the image used; `snapshotting` is the image
job's own step (states/snapshotting.py). Kill it anywhere and `fsm resume` finishes it:
an unfinished snapshot is recorded for gc and made again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from catalog.ledger import SnapshotTooSmall, catalog_reading, catalog_transaction, device_of_row
from catalog.models import DeviceState, Image, UnpackedImage
from catalog.records import (find_image, get_image, image_job_state, snapshot_of_job, snapshot_of_vm, top_layer_device,
                             touch_image)
from fsm.context import StepContext
from fsm.definition import COMPLETE, StateSpec, TransitionSpec, Workflow
from fsm.models import Job
from fsm.runner import Runner
from states import snapshotting
from states.admission import admit_bytes, snapshot_bytes
from states.data import SnapshotJobData
from states.names import SNAPSHOT_WORKFLOW, SnapshotEvent, SnapshotState, check_vm_id
from states.services import ImageServices
from states.steps import NO_RETRY, abort_hook, bound_step, health_guard
from support.errors import PermanentError
from support.log import get_logger

log = get_logger("states.vm_snapshot")



class ImageNotReady(PermanentError):
    """The image named has no complete, ready top layer to snapshot."""


@dataclass(frozen=True)
class SnapshotRequest:
    """A VM's snapshot of one image, checked against the catalog."""

    image_id: int
    image_name: str
    vm_id: str
    size_bytes: int  # the snapshot's size: the origin's unless more was asked
    origin_size_bytes: int

    @property
    def idempotency_key(self) -> str:
        return f"image:{self.image_id}/vm:{self.vm_id}"

    def job_context(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "image": {"name": self.image_name}, "vm_id": self.vm_id,
                "snapshot_size_bytes": self.size_bytes}


def resolve_snapshot_request(session: Session, image: str, vm_id: str, size_bytes: int | None) -> SnapshotRequest:
    """The request for `image` (name or id, as `images` lists it), or a one-line
    PermanentError: unknown or incomplete image, bad VM id, a size below the origin's."""
    check_vm_id(vm_id)
    row = find_image(session, image)
    if row is None:
        raise ImageNotReady(f"image {image!r} not found; `images` lists them")
    origin = _ready_origin(session, row)
    size = size_bytes if size_bytes is not None else origin.size_bytes
    if size < origin.size_bytes:
        raise SnapshotTooSmall(f"--size {size} bytes is below image {row.name!r}'s device size "
                               f"{origin.size_bytes} bytes; a snapshot can only be the same size or larger")
    return SnapshotRequest(image_id=row.id, image_name=row.name, vm_id=vm_id, size_bytes=size,
                           origin_size_bytes=int(origin.size_bytes))


def resolve_snapshot(engine: Engine, image: str, vm_id: str, size_bytes: int | None) -> SnapshotRequest:
    """resolve_snapshot_request in a catalog session of its own that only reads, before any
    job (the daemon's request; the `snapshot` command's)."""
    with catalog_reading(engine) as session:
        return resolve_snapshot_request(session, image, vm_id, size_bytes)


def _ready_origin(session: Session, image: Image) -> UnpackedImage:
    """The image's top layer device, when the image is complete (its job complete, the
    device ready); else ImageNotReady."""
    origin = top_layer_device(session, image)
    if image.activation_status == "evicted":
        raise ImageNotReady(f"image {image.name!r} (id {image.id}) was evicted; process it again to re-create it")
    if origin is None or origin.state != DeviceState.READY or image_job_state(session, image) != COMPLETE:
        raise ImageNotReady(f"image {image.name!r} (id {image.id}) is not complete; "
                            f"`fsm show {image.job_id}` says where its job stands")
    return origin


def process_snapshot_request(runner: Runner, request: SnapshotRequest, services: ImageServices) -> Job:
    """Run the VM's snapshot job; a complete one returns at once, unless its snapshot was
    deleted since: then it is reopened and a new snapshot made. A complete one's snapshot is
    handed out again as it is now: active, at its current path (after a reboot the disks are
    bound anew, to other loop numbers: the path the job first gave may be another disk's)."""
    job = runner.store.find(SNAPSHOT_WORKFLOW, request.idempotency_key)
    if job is not None and job.state == COMPLETE:
        with catalog_transaction(runner.store.engine) as session:
            existing = snapshot_of_vm(session, request.image_id, request.vm_id)
            ready = device_of_row(existing) if existing is not None and existing.state == DeviceState.READY else None
        if existing is None:
            runner.reopen(job.id, f"VM {request.vm_id}'s snapshot was deleted")
        elif ready is not None:
            return snapshotting.hand_out_again(runner, job, ready, services)
    return runner.start(SNAPSHOT_WORKFLOW, request.idempotency_key, request.job_context())


# -- the steps -----------------------------------------------------------------------------

def check_request(ctx: StepContext, services: ImageServices) -> str:
    """pending: the image is still complete and the size still fits (checked again: the
    job may run long after it was asked for)."""
    data = SnapshotJobData(ctx.data)
    with ctx.reading() as session:
        image = get_image(session, data.image_id)
        if image is None:
            raise ImageNotReady(f"image {data.image_id} no longer exists")
        resolve_snapshot_request(session, str(image.id), data.vm_id, data.snapshot_size_bytes)
        existing = snapshot_of_vm(session, image.id, data.vm_id)
        if existing is not None and existing.job_id != ctx.job_id:
            raise PermanentError(f"VM {data.vm_id!r} already has snapshot {existing.id} of image "
                                 f"{image.name!r} (made by job {existing.job_id})")
    return SnapshotEvent.START


def activate_origin(ctx: StepContext, services: ImageServices) -> str:
    """activating: the image is still complete with a ready top layer, and is marked used now.
    Whether its device is in the pool is the kernel's answer to the snapshot itself (a
    missing origin makes nothing: states/snapshotting.py), not a listing of every device."""
    with ctx.transaction() as session:
        image = get_image(session, SnapshotJobData(ctx.data).image_id)
        _ready_origin(session, image)
        touch_image(session, image.id)  # used now: last in eviction's order
    return SnapshotEvent.ACTIVATED


def admitted_snapshot(ctx: StepContext, services: ImageServices) -> str:
    """snapshotting, once the snapshot fits below the high watermark (states/admission.py:
    evicting first; then the daemon waits, the CLI leaves the job waiting). A snapshot an
    interrupted run already made ready needs no room."""
    with ctx.reading() as session:
        made = snapshot_of_job(session, ctx.job_id)
        ready = made is not None and made.state == DeviceState.READY
    if not ready:
        admit_bytes(services, snapshot_bytes(), job_id=ctx.job_id, what="this snapshot")
    return snapshotting.run(ctx, services)


def build_snapshot_workflow(services: ImageServices | None) -> Workflow:
    """The snapshot workflow bound to `services` (None: for drawing the graph only)."""

    def step(module_run: Callable[[StepContext, ImageServices], str]) -> Callable[[StepContext], str]:
        return bound_step(services, module_run)

    healthy = health_guard(services)

    return Workflow(
        name=SNAPSHOT_WORKFLOW,
        initial=SnapshotState.PENDING,
        states=(
            StateSpec(SnapshotState.PENDING, step=step(check_request)),
            StateSpec(SnapshotState.ACTIVATING, step=step(activate_origin)),
            StateSpec(SnapshotState.SNAPSHOTTING, step=step(admitted_snapshot), retry=NO_RETRY),
        ),
        transitions=(
            TransitionSpec(SnapshotEvent.START, SnapshotState.PENDING, SnapshotState.ACTIVATING),
            TransitionSpec(SnapshotEvent.ACTIVATED, SnapshotState.ACTIVATING, SnapshotState.SNAPSHOTTING,
                           guards=(healthy,)),
            TransitionSpec(SnapshotEvent.SNAPSHOTTED, SnapshotState.SNAPSHOTTING, SnapshotState.COMPLETE),
        ),
        on_abort=abort_hook(services),
    )
