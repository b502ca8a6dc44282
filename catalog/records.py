"""Reads and writes of catalog rows, always inside a caller's transaction (a Session),
so a device row and the job's own state commit together."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from catalog.models import (DeviceIdCounter, Image, ImageLayer, Layer, OrphanedDevice, Snapshot,
                            UnpackedImage)
from devices.base import device_name

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


def begin_layer_device(session: Session, *, chain_id: str, layer_digest: str, parent_chain_id: str | None,
                       size_bytes: int, job_id: int) -> UnpackedImage:
    """The row of a device about to be created (state `creating`): intent first."""
    device_id = allocate_device_id(session)
    now = utcnow()
    row = UnpackedImage(chain_id=chain_id, layer_digest=layer_digest, parent_chain_id=parent_chain_id,
                        device_id=device_id, device_name=device_name(device_id), size_bytes=size_bytes,
                        state="creating", job_id=job_id, created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    return row


def set_layer_device_state(session: Session, device_id: int, state: str) -> None:
    row = session.scalars(select(UnpackedImage).where(UnpackedImage.device_id == device_id)).one()
    row.state = state
    row.updated_at = utcnow()


def orphan_device(session: Session, *, device_id: int, reason: str, job_id: int | None) -> OrphanedDevice:
    """Move a device from its live row to orphaned_devices: recorded, not touched."""
    session.execute(delete(UnpackedImage).where(UnpackedImage.device_id == device_id))
    session.execute(delete(Snapshot).where(Snapshot.device_id == device_id))
    row = OrphanedDevice(device_id=device_id, device_name=device_name(device_id), reason=reason, job_id=job_id,
                         detected_at=utcnow())
    session.add(row)
    return row


def unfinished_devices_of_job(session: Session, job_id: int) -> list[int]:
    """Device ids this job recorded but did not finish (layer devices and snapshots)."""
    layers = session.scalars(select(UnpackedImage.device_id).where(UnpackedImage.job_id == job_id,
                                                                   UnpackedImage.state != "ready"))
    snaps = session.scalars(select(Snapshot.device_id).where(Snapshot.job_id == job_id, Snapshot.state != "ready"))
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
    session.execute(delete(ImageLayer).where(ImageLayer.image_id == image.id))
    for position, (digest, chain_id) in enumerate(chain):
        session.add(ImageLayer(image_id=image.id, position=position, digest=digest, chain_id=chain_id))
    session.flush()
    return image


def begin_snapshot(session: Session, *, image_id: int, origin_device_id: int, job_id: int) -> Snapshot:
    device_id = allocate_device_id(session)
    row = Snapshot(image_id=image_id, origin_device_id=origin_device_id, device_id=device_id,
                   device_name=device_name(device_id), state="creating", job_id=job_id, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


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


def image_has_ready_snapshot(session: Session, source: str) -> bool:
    """Whether the image from `source` still has a ready snapshot row (a reset or a manual
    cleanup of the database removes them)."""
    image = session.scalars(select(Image).where(Image.source == source)).first()
    if image is None:
        return False
    return session.scalars(select(Snapshot.id).where(Snapshot.image_id == image.id,
                                                     Snapshot.state == "ready")).first() is not None
