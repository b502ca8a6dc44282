"""Reads and writes of catalog rows other than a device's state, always inside a caller's
transaction (a Session), so a row and the job's own state commit together. Device rows
are written by catalog/ledger.py alone."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from catalog.device_records import ImageRecord, LayerRecord, RecordStore
from catalog.models import (DeviceIdCounter, DeviceState, Image, ImageLayer, Layer, OrphanedDevice, Snapshot,
                            UnpackedImage)

FIRST_DEVICE_ID = 1
# The guide's words for a device left for gc; logged wherever one is met.
ORPHAN_HINT = "orphaned device detected; run 'flyio-image-manager gc' to clean up"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def allocate_device_id(session: Session) -> int:
    """A thin id never handed out before (ids are not reused, even after delete)."""
    counter = session.get(DeviceIdCounter, 1)
    if counter is None:
        counter = DeviceIdCounter(id=1, next_device_id=FIRST_DEVICE_ID)
        session.add(counter)
    device_id = counter.next_device_id
    counter.next_device_id += 1
    session.flush()
    return device_id


def record_layer(session: Session, *, digest: str, size_bytes: int, fmt: str, source: str, etag: str | None) -> Layer:
    layer = session.get(Layer, digest)
    now = utcnow()
    if layer is None:
        layer = Layer(digest=digest, size_bytes=size_bytes, format=fmt, source=source, etag=etag,
                      verified_at=now, created_at=now)
        session.add(layer)
    else:
        layer.verified_at = now
    return layer


def find_verified_layer(session: Session, source: str, etag: str | None) -> Layer | None:
    """A layer already downloaded and verified from this exact object version."""
    if not etag:
        return None
    return session.scalars(select(Layer).where(Layer.source == source, Layer.etag == etag,
                                               Layer.verified_at.is_not(None))).first()


def find_chain(session: Session, chain_id: str) -> UnpackedImage | None:
    return session.scalars(select(UnpackedImage).where(UnpackedImage.chain_id == chain_id)).first()


def unfinished_devices_of_job(session: Session, job_id: int) -> list[int]:
    """Device ids this job recorded but did not finish (layer devices and snapshots)."""
    layers = session.scalars(select(UnpackedImage.device_id).where(UnpackedImage.job_id == job_id,
                                                                   UnpackedImage.state != DeviceState.READY))
    snaps = session.scalars(select(Snapshot.device_id).where(Snapshot.job_id == job_id, Snapshot.state != DeviceState.READY))
    return sorted(set(layers) | set(snaps))


def upsert_image(session: Session, *, name: str, source: str, chain: list[tuple[str, str]], job_id: int) -> Image:
    """The image row and its ordered (digest, chain_id) layers."""
    now = utcnow()
    image = session.scalars(select(Image).where(Image.source == source)).first()
    if image is None:
        image = Image(name=name, source=source, activation_status="inactive", created_at=now, updated_at=now,
                      layer_count=0)
        session.add(image)
        session.flush()
    image.top_chain_id = chain[-1][1] if chain else None
    image.layer_count = len(chain)
    image.job_id = job_id
    image.updated_at = now
    image.last_used_at = now
    session.execute(delete(ImageLayer).where(ImageLayer.image_id == image.id))
    for position, (digest, chain_id) in enumerate(chain):
        session.add(ImageLayer(image_id=image.id, position=position, digest=digest, chain_id=chain_id))
    session.flush()
    return image


def live_device_names(session: Session) -> set[str]:
    """Every device name a live row (unpacked layer or snapshot) names, as gc compares."""
    layers = session.scalars(select(UnpackedImage.device_name))
    snaps = session.scalars(select(Snapshot.device_name))
    return set(layers) | set(snaps)


def uncleaned_orphans(session: Session) -> list[OrphanedDevice]:
    return list(session.scalars(select(OrphanedDevice).where(OrphanedDevice.cleaned_at.is_(None))
                                .order_by(OrphanedDevice.id)))


def count_uncleaned_orphans(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(OrphanedDevice).where(OrphanedDevice.cleaned_at.is_(None))) or 0


def find_image(session: Session, name_or_id: str) -> Image | None:
    """The image `images` lists under this id or name (the newest of that name)."""
    if name_or_id.isdigit():
        image = session.get(Image, int(name_or_id))
        if image is not None:
            return image
    return session.scalars(select(Image).where(Image.name == name_or_id).order_by(Image.id.desc())).first()


def top_layer_device(session: Session, image: Image) -> UnpackedImage | None:
    """The device of the image's top layer chain, whatever its state."""
    if image.top_chain_id is None:
        return None
    return find_chain(session, image.top_chain_id)


def snapshot_of_vm(session: Session, image_id: int, vm_id: str) -> Snapshot | None:
    return session.scalars(select(Snapshot).where(Snapshot.image_id == image_id, Snapshot.vm_id == vm_id)).first()


def snapshots_of_vm(session: Session, vm_id: str) -> list[Snapshot]:
    return list(session.scalars(select(Snapshot).where(Snapshot.vm_id == vm_id).order_by(Snapshot.id)))


def snapshot_of_job(session: Session, job_id: int) -> Snapshot | None:
    """The snapshot a job made (or began): each job makes at most one."""
    return session.scalars(select(Snapshot).where(Snapshot.job_id == job_id)).first()


def get_image(session: Session, image_id: int) -> Image | None:
    return session.get(Image, image_id)


def mark_image_active(session: Session, image_id: int) -> None:
    """The image has a ready snapshot now (a VM can boot from it)."""
    image = session.get(Image, image_id)
    if image.activation_status != "active":  # a commit per VM on the critical path writes nothing new
        image.activation_status = "active"
        image.updated_at = utcnow()


def image_job_state(session: Session, image: Image) -> str | None:
    """The state of the job that last processed the image (None: no such job), as the
    engine tells it."""
    from fsm.store import job_state

    return job_state(session, image.job_id)
def touch_image(session: Session, image_id: int) -> None:
    """The image was used now (a process-image or snapshot of it): eviction's LRU order."""
    image = session.get(Image, image_id)
    if image is not None:
        image.last_used_at = utcnow()


def touch_image_by_source(session: Session, source: str) -> None:
    image = session.scalars(select(Image).where(Image.source == source)).first()
    if image is not None:
        image.last_used_at = utcnow()


def set_pinned(session: Session, name_or_id: str, pinned: bool) -> Image:
    """Pin (never evicted) or unpin the image `images` lists under this id or name."""
    from support.errors import ManagerError

    image = find_image(session, name_or_id)
    if image is None:
        raise ManagerError(f"image {name_or_id!r} not found; `images` lists them")
    image.pinned = pinned
    image.updated_at = utcnow()
    return image


def mark_evicted(session: Session, image_id: int) -> None:
    """Its devices are gone: processing it again re-creates them."""
    image = session.get(Image, image_id)
    if image is not None:
        image.activation_status = "evicted"
        image.updated_at = utcnow()


def describe_image(session: Session, image: Image, *, idempotency_key: str, job_context: dict[str, Any]) -> ImageRecord:
    """The record an image keeps of itself beside the pool (catalog/device_records.py): its
    row, its layers in order with their blobs' facts, and the job that made it."""
    layers = []
    for row in session.scalars(select(ImageLayer).where(ImageLayer.image_id == image.id).order_by(ImageLayer.position)):
        blob = session.get(Layer, row.digest)
        layers.append(LayerRecord(digest=row.digest, chain_id=row.chain_id, size_bytes=int(blob.size_bytes) if blob else 0,
                                  format=blob.format if blob else "tar", source=blob.source if blob else image.source,
                                  etag=blob.etag if blob else None))
    return ImageRecord(image_id=image.id, name=image.name, source=image.source, idempotency_key=idempotency_key,
                       layers=tuple(layers), pinned=bool(image.pinned), job_context=dict(job_context),
                       created_at=str(image.created_at), updated_at=str(image.updated_at))


def rewrite_image_record(records: RecordStore, image: Image) -> None:
    """Carry a change of the image row (its pin) into its record, when it has one."""
    from dataclasses import replace

    record = records.image(image.source)
    if record is not None:
        records.write_image(replace(record, pinned=bool(image.pinned), updated_at=str(image.updated_at)))
