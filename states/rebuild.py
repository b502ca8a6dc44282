"""The catalog rebuilt from the pool: images.db lost, corrupt, or restored from an older
backup is given back what the pool's devices and their records say (catalog/device_records.py).

What is rebuilt, and only from devices the pool holds whose record says ready:
images (name, source, layers in order, pin), layers, layer chain devices, snapshots with their
VM ids and sizes, and one complete job per image and per VM snapshot (the same idempotency
key and context as the job that made it, so a repeat `process-image` or `snapshot` is a
no-op; its history says `rebuilt`). The id counter goes past every device in the pool and
every record, so a new device never collides with one that is there.

Job ids are never carried over from the records: they name jobs of the lost database, and
a new job with the same id must not find another job's snapshot as its own (a device row
names the rebuilt job that answers for it, or none).

What is not: a device with no record, or whose record is an unfinished intent, is one of
the guide's orphans, left for gc; a ready record whose device the pool no longer holds is
moved aside (`records/gone/`), not deleted; an unreadable record is reported and left.

`merge` keeps everything the catalog has and adds only what it lacks (idempotent).
The check that a catalog is behind its pool is catalog/behind.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from catalog.device_records import DeviceKind, DeviceRecord, ImageRecord, RecordStore, UnreadableRecord
from catalog.models import DeviceIdCounter, DeviceState, Image, ImageLayer, Layer, Snapshot, UnpackedImage
from catalog.records import FIRST_DEVICE_ID, utcnow
from devices.base import DeviceInfo, ThinPool
from fsm.definition import COMPLETE
from fsm.models import Job
from fsm.store import JobStore
from states.names import IMAGE_WORKFLOW, REBUILT_EVENT, SNAPSHOT_WORKFLOW
from support.durable import fsync_dir
from support.errors import ManagerError
from support.log import get_logger

log = get_logger("catalog.rebuild")


@dataclass
class RebuildReport:
    """What a rebuild found in the pool and its records, and what it wrote."""

    merge: bool
    devices_in_pool: int = 0
    records: int = 0
    images: list[str] = field(default_factory=list)       # image names added
    layers: list[str] = field(default_factory=list)       # layer chain devices added
    snapshots: list[str] = field(default_factory=list)    # snapshot devices added
    jobs: int = 0
    kept: int = 0                                         # devices the catalog already named (merge)
    orphans: dict[str, str] = field(default_factory=dict)  # device -> why it could not be named (left for gc)
    gone: list[str] = field(default_factory=list)         # ready records of devices the pool lacks (moved aside)
    unplaced: dict[str, str] = field(default_factory=dict)  # ready devices with no image to hang on (kept)
    unreadable: list[str] = field(default_factory=list)
    next_device_id: int = FIRST_DEVICE_ID

    @property
    def added(self) -> int:
        return len(self.images) + len(self.layers) + len(self.snapshots)


# -- the rebuild -----------------------------------------------------------------------------

def rebuild_catalog(engine: Engine, pool: ThinPool, records: RecordStore, *, merge: bool) -> RebuildReport:
    """Add to the catalog on `engine` every image, device and job the pool and its records
    describe and it lacks (`merge`: an existing catalog; else a new, empty one). The pool
    must be attached. Ready snapshots are activated, as after a reboot."""
    report = RebuildReport(merge=merge)
    in_pool = {device.device_id: device for device in pool.list_devices()}
    device_records = records.devices()
    image_records, bad_images = records.images()
    report.devices_in_pool = len(in_pool)
    report.records = len(device_records)
    report.unreadable = [f"{r.name}: {r.error}" for r in device_records.values() if isinstance(r, UnreadableRecord)]
    report.unreadable += bad_images
    ready = {i: r for i, r in device_records.items() if isinstance(r, DeviceRecord) and r.ready and i in in_pool}
    gone = [r for i, r in device_records.items() if isinstance(r, DeviceRecord) and r.ready and i not in in_pool]

    with Session(engine) as session, session.begin():
        named = (set(session.scalars(select(UnpackedImage.device_id)))
                 | set(session.scalars(select(Snapshot.device_id))))
        for device_id, device in sorted(in_pool.items()):
            record = device_records.get(device_id)
            if device_id in named:
                report.kept += 1
            elif record is None:
                report.orphans[device.name] = "no record"
            elif isinstance(record, DeviceRecord) and not record.ready:
                report.orphans[device.name] = f"unfinished intent ({record.state})"
        images = _add_images(session, image_records, report)
        _add_layer_devices(session, [r for r in ready.values() if r.kind == DeviceKind.LAYER], named, report)
        snapshots = _add_snapshots(session, [r for r in ready.values() if r.kind == DeviceKind.SNAPSHOT], named,
                                   images, report)
        _set_activation(session, images)
        report.next_device_id = _advance_counter(session, set(in_pool) | set(device_records))
        store = JobStore(engine)
        report.jobs = _add_jobs(session, store, images, snapshots)
    _move_aside(records, gone, report)
    _hand_out_snapshots(engine, pool, records, in_pool)
    log.info("catalog rebuilt from the pool" if not merge else "catalog merged with the pool",
             devices=report.devices_in_pool, records=report.records, images=len(report.images),
             layers=len(report.layers), snapshots=len(report.snapshots), jobs=report.jobs, kept=report.kept,
             orphans=len(report.orphans), gone=len(report.gone), next_device_id=report.next_device_id)
    return report


def _add_images(session: Session, image_records: list[ImageRecord], report: RebuildReport) -> dict[str, tuple[Image, ImageRecord | None]]:
    """Every image by source: the catalog's own (merge keeps them) and the records' it lacks."""
    images: dict[str, tuple[Image, ImageRecord | None]] = {
        image.source: (image, None) for image in session.scalars(select(Image))}
    for record in sorted(image_records, key=lambda r: r.image_id):
        if record.source in images:
            continue
        for layer in record.layers:
            if session.get(Layer, layer.digest) is None:
                session.add(Layer(digest=layer.digest, size_bytes=layer.size_bytes, format=layer.format,
                                  source=layer.source, etag=layer.etag, verified_at=utcnow(),
                                  created_at=_time(record.created_at)))
        free_id = session.get(Image, record.image_id) is None
        image = Image(id=record.image_id if free_id else None, name=record.name, source=record.source,
                      top_chain_id=record.layers[-1].chain_id if record.layers else None,
                      layer_count=len(record.layers), activation_status="inactive", job_id=None,
                      created_at=_time(record.created_at), updated_at=utcnow(),
                      last_used_at=_time(record.updated_at), pinned=record.pinned,
                      config=_config(record))
        session.add(image)
        session.flush()
        for position, layer in enumerate(record.layers):
            session.add(ImageLayer(image_id=image.id, position=position, digest=layer.digest, chain_id=layer.chain_id))
        images[record.source] = (image, record)
        report.images.append(record.name)
    session.flush()
    return images


def _add_layer_devices(session: Session, ready_layers: list[DeviceRecord], named: set[int], report: RebuildReport) -> None:
    chains = set(session.scalars(select(UnpackedImage.chain_id)))
    for record in sorted(ready_layers, key=lambda r: r.device_id):
        if record.device_id in named:
            continue
        if record.chain_id is None or record.chain_id in chains:
            # Two ready devices of one chain: the catalog's (or the first) names it; the other stays, kept.
            report.unplaced[record.name] = f"chain {record.chain_id} already has a device"
            continue
        session.add(UnpackedImage(chain_id=record.chain_id, layer_digest=record.layer_digest or record.chain_id,
                                  parent_chain_id=record.parent_chain_id, device_id=record.device_id,
                                  device_name=record.name, size_bytes=record.size_bytes, state=DeviceState.READY,
                                  job_id=None, created_at=_time(record.created_at),
                                  updated_at=_time(record.updated_at)))
        chains.add(record.chain_id)
        report.layers.append(record.name)


def _add_snapshots(session: Session, ready_snapshots: list[DeviceRecord], named: set[int],
                   images: dict[str, tuple[Image, ImageRecord | None]], report: RebuildReport) -> list[Snapshot]:
    added: list[Snapshot] = []
    taken = set(session.execute(select(Snapshot.image_id, Snapshot.vm_id)).tuples())
    for record in sorted(ready_snapshots, key=lambda r: r.device_id):
        if record.device_id in named:
            continue
        image = images.get(record.image_source or "", (None, None))[0]
        if image is None:
            report.unplaced[record.name] = f"its image {record.image_source} has no record"
            continue
        if (image.id, record.vm_id) in taken:
            report.unplaced[record.name] = f"image {image.name} already has a snapshot for VM {record.vm_id}"
            continue
        row = Snapshot(image_id=image.id, origin_device_id=record.origin_device_id or 0, device_id=record.device_id,
                       device_name=record.name, state=DeviceState.READY, vm_id=record.vm_id,
                       size_bytes=record.size_bytes, job_id=None, created_at=_time(record.created_at),
                       updated_at=_time(record.updated_at))
        session.add(row)
        taken.add((image.id, record.vm_id))
        added.append(row)
        report.snapshots.append(record.name)
    session.flush()
    return added


def _set_activation(session: Session, images: dict[str, tuple[Image, ImageRecord | None]]) -> None:
    """A rebuilt image is active with a ready snapshot, inactive with its top chain's device
    only, evicted without it (processing it again re-creates its devices)."""
    for image, record in images.values():
        if record is None:
            continue
        has_snapshot = session.scalars(select(Snapshot.id).where(Snapshot.image_id == image.id)).first() is not None
        has_top = session.scalars(select(UnpackedImage.id).where(UnpackedImage.chain_id == image.top_chain_id)).first()
        image.activation_status = "active" if has_snapshot else "inactive" if has_top is not None else "evicted"
        last_snapshot = session.scalars(select(Snapshot.created_at).where(Snapshot.image_id == image.id)
                                        .order_by(Snapshot.created_at.desc())).first()
        if last_snapshot is not None and (image.last_used_at is None or last_snapshot > image.last_used_at):
            image.last_used_at = last_snapshot


def _advance_counter(session: Session, device_ids: set[int]) -> int:
    """The next thin id, past every device in the pool and every record."""
    counter = session.get(DeviceIdCounter, 1)
    if counter is None:
        counter = DeviceIdCounter(id=1, next_device_id=FIRST_DEVICE_ID)
        session.add(counter)
    counter.next_device_id = max([counter.next_device_id, *(i + 1 for i in device_ids)])
    return counter.next_device_id


def _add_jobs(session: Session, store: JobStore, images: dict[str, tuple[Image, ImageRecord | None]],
              snapshots: list[Snapshot]) -> int:
    """One complete job per rebuilt image and per rebuilt VM snapshot, keyed as the jobs that
    made them, so asking again is answered from the catalog."""
    count = 0
    detail = {"why": "catalog rebuilt from the pool's device records"}
    for image, record in images.values():
        if record is None:
            continue
        existing = session.scalars(select(Job).where(Job.workflow == IMAGE_WORKFLOW,
                                                     Job.idempotency_key == record.idempotency_key)).first()
        if existing is not None:
            image.job_id = existing.id
            continue
        context = {**record.job_context, "image_id": image.id}
        first = session.scalars(select(Snapshot).where(Snapshot.image_id == image.id, Snapshot.vm_id.is_(None))).first()
        if first is not None:
            context["snapshot_device_id"] = first.device_id
        job = store.add_finished(session, IMAGE_WORKFLOW, record.idempotency_key, COMPLETE, context,
                                 event=REBUILT_EVENT, detail=detail)
        image.job_id = job.id
        if first is not None and first.job_id is None:
            first.job_id = job.id
        count += 1
    for snapshot in snapshots:
        if snapshot.vm_id is None:
            continue
        image = session.get(Image, snapshot.image_id)
        key = f"image:{image.id}/vm:{snapshot.vm_id}"
        existing = session.scalars(select(Job).where(Job.workflow == SNAPSHOT_WORKFLOW,
                                                     Job.idempotency_key == key)).first()
        if existing is not None:  # a job the catalog kept answers for it (resumed, it finds its snapshot ready)
            snapshot.job_id = existing.id
            continue
        context: dict[str, Any] = {"image_id": image.id, "image": {"name": image.name}, "vm_id": snapshot.vm_id,
                                   "snapshot_size_bytes": snapshot.size_bytes,
                                   "snapshot_device_id": snapshot.device_id}
        job = store.add_finished(session, SNAPSHOT_WORKFLOW, key, COMPLETE, context, event=REBUILT_EVENT,
                                 detail=detail)
        snapshot.job_id = job.id
        count += 1
    return count


def _move_aside(records: RecordStore, gone: list[DeviceRecord], report: RebuildReport) -> None:
    """Ready records of devices the pool no longer holds go to records/gone/, kept for a
    person to read: the device is gone (a reset pool), the record no longer describes it."""
    if not gone:
        return
    aside = records.root / "gone"
    aside.mkdir(parents=True, exist_ok=True)
    for record in gone:
        source = records.devices_dir / f"{record.name}.json"
        os.replace(source, aside / f"{record.name}.{utcnow():%Y%m%dT%H%M%S}.json")
        report.gone.append(record.name)
    fsync_dir(records.devices_dir)
    fsync_dir(aside)


def _hand_out_snapshots(engine: Engine, pool: ThinPool, records: RecordStore, in_pool: dict[int, DeviceInfo]) -> None:
    """Activate ready snapshots (as a reboot's reconciliation does) and put each path in the
    context of the job that answers for it, as that job left it."""
    import json

    from catalog.ledger import DeviceLedger, engine_transactions

    ledger = DeviceLedger(pool, engine_transactions(engine), records)
    active = {device_id: device.path for device_id, device in in_pool.items() if device.active and device.path}
    with Session(engine) as session:
        pending = [(job.id, int(json.loads(job.context or "{}")["snapshot_device_id"]))
                   for job in session.scalars(select(Job).where(Job.state == COMPLETE))
                   if "snapshot_device_id" in json.loads(job.context or "{}")
                   and "snapshot_device" not in json.loads(job.context or "{}")]
    for job_id, device_id in pending:
        try:
            # VMs may be running on them (a database lost, not a reboot): active ones keep their path.
            path = active.get(device_id) or ledger.activate(device_id)
        except (ManagerError, LookupError) as exc:
            log.error("could not activate rebuilt snapshot", device_id=device_id, error=str(exc))
            continue
        with Session(engine) as session, session.begin():
            job = session.get(Job, job_id)
            job.context = json.dumps({**json.loads(job.context or "{}"), "snapshot_device": path}, sort_keys=True)


def _config(record: ImageRecord) -> str | None:
    """A registry image's runtime config, as its job's context kept it (None: an S3 image)."""
    import json

    config = (record.job_context.get("image") or {}).get("config")
    return json.dumps(config, sort_keys=True) if config is not None else None


def _time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return utcnow()




def describe_existing_catalog(engine: Engine, pool: ThinPool, records: RecordStore) -> None:
    """Once, on a host upgraded from before devices described themselves: a record for every
    device row and every image a complete job made, so that a later loss of images.db loses
    nothing. A no-op (one stat) once the records directory exists."""
    import json

    from catalog.ledger import DeviceLedger, engine_transactions
    from catalog.records import describe_image

    if records.root.exists():
        return
    devices = DeviceLedger(pool, engine_transactions(engine), records).describe_existing_devices()
    images = 0
    with Session(engine) as session:
        for image in session.scalars(select(Image)):
            job = session.get(Job, image.job_id) if image.job_id is not None else None
            if job is None or job.state != COMPLETE:
                continue
            records.write_image(describe_image(session, image, idempotency_key=job.idempotency_key,
                                               job_context=json.loads(job.context or "{}")))
            images += 1
    records.root.mkdir(parents=True, exist_ok=True)
    if devices or images:
        log.info("catalog described beside the pool", devices=devices, images=images, path=str(records.root))
