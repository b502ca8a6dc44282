"""SQLAlchemy models of the catalog. Table and column names follow the operations guide,
so its sqlite3 queries (`SELECT device_name FROM unpacked_images;`) work as written.

A device row is written *before* the device is created (state `creating`), in the same
transaction that allocates its thin id, so a crash never leaves a device no row names.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from support.sqlnames import NAMING_CONVENTION

class DeviceState(StrEnum):
    """Where a device row stands (catalog/ledger.py owns every change; docs/devices.md)."""

    CREATING = "creating"    # row written, kernel call not yet known to have happened
    CREATED = "created"      # the device exists, nothing trusted written to it yet
    UNPACKING = "unpacking"  # a layer is being applied: contents untrusted until ready
    READY = "ready"
    DELETING = "deleting"    # deactivate + delete under way


class CatalogBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Layer(CatalogBase):
    """A downloaded, verified blob, identified by its content digest."""

    __tablename__ = "layers"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)  # "sha256:<hex>"
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))  # tar, tar+gzip, tar+zstd, oci, docker-save
    source: Mapped[str] = mapped_column(Text)  # s3://bucket/key or file:///path
    etag: Mapped[str | None] = mapped_column(String(128))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Image(CatalogBase):
    """An image: ordered layers; active once a VM snapshot of its top layer exists."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)  # family name ("node") or the single key
    source: Mapped[str] = mapped_column(Text, unique=True)  # s3://bucket/prefix-or-key
    top_chain_id: Mapped[str | None] = mapped_column(String(71))
    layer_count: Mapped[int] = mapped_column(Integer, default=0)
    activation_status: Mapped[str] = mapped_column(String(16), default="inactive")  # inactive|active|evicted
    job_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # The last process-image or snapshot that used it: eviction takes the oldest first.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # never evicted
    # A registry image's runtime config as JSON (Env, Entrypoint, Cmd, WorkingDir, User,
    # ExposedPorts): what a VM's init needs to start it. None for S3 images (no config).
    config: Mapped[str | None] = mapped_column(Text)


class ImageLayer(CatalogBase):
    """Position of a layer in an image, with the chain id it makes there."""

    __tablename__ = "image_layers"
    __table_args__ = (UniqueConstraint("image_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(ForeignKey("layers.digest"))
    chain_id: Mapped[str] = mapped_column(String(71))


class UnpackedImage(CatalogBase):
    """One thin device per layer chain: the base layer's own device, or a snapshot of the
    parent chain's device with this layer applied. Shared by every image with that chain."""

    __tablename__ = "unpacked_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chain_id: Mapped[str] = mapped_column(String(71), unique=True)
    layer_digest: Mapped[str] = mapped_column(String(71))
    parent_chain_id: Mapped[str | None] = mapped_column(String(71))
    device_id: Mapped[int] = mapped_column(Integer, unique=True)
    device_name: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))  # a DeviceState
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Snapshot(CatalogBase):
    """A writable copy-on-write snapshot of an image's top layer, one per VM. The image's
    first snapshot (made by process-image) has no VM id; `snapshot --vm` makes the others."""

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("image_id", "vm_id", name="uq_snapshots_image_id_vm_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    origin_device_id: Mapped[int] = mapped_column(Integer)
    device_id: Mapped[int] = mapped_column(Integer, unique=True)
    device_name: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16))  # a DeviceState
    vm_id: Mapped[str | None] = mapped_column(String(128), index=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)  # may exceed the origin's: the VM asked for more
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime)


class OrphanedDevice(CatalogBase):
    """A device a job gave up on; left as it was for `gc` to clean when the host is idle."""

    __tablename__ = "orphaned_devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(Integer)
    device_name: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(Integer)
    detected_at: Mapped[datetime] = mapped_column(DateTime)
    cleaned_at: Mapped[datetime | None] = mapped_column(DateTime)


class DeviceIdCounter(CatalogBase):
    """Thin ids are never reused: a monotonic counter, bumped in the transaction that
    writes the device's row."""

    __tablename__ = "device_id_counter"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_device_id: Mapped[int] = mapped_column(Integer)
