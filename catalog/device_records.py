"""Devices and images that describe themselves: one small JSON record per thin device and
per image, kept beside the pool, outside images.db.

images.db is not the only record of what the pool holds. A record is written before the
kernel call it announces (intent) and rewritten when the device is ready or being deleted,
each write atomic on a power cut (support/durable.py). So a lost database is rebuilt from
the pool and its records (`rebuild-db`), a restored older backup is noticed (a record newer
than the catalog's id counter) instead of trusted, and gc tells a ready device (never
deleted) from a guide's orphan (no record, or an unfinished intent). Docker's devicemapper
driver kept one metadata file per device for the same reason.

This module only stores (containerd's `metadata.go` is the model): the device ledger
(catalog/ledger.py) is the one writer of device records; the image job's `activating` step
and pinning write image records.

    <state-dir>/records/devices/thin-<id>.json
    <state-dir>/records/images/<sha256 of the source, 32 hex>.json
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from devices.base import device_id_from_name, device_name
from support.durable import fsync_dir, remove_durably, write_atomically

RECORDS_DIR = "records"
RECORD_VERSION = 1
SUFFIX = ".json"


class RecordState(StrEnum):
    """What a device record says. Only `ready` protects a device from gc."""

    CREATING = "creating"  # intent: written before create_thin/create_snap; contents untrusted
    READY = "ready"        # a layer chain unpacked, or a VM's disk handed out
    DELETING = "deleting"  # written before deactivate + delete
    ORPHANED = "orphaned"  # given up on (a failed call, an aborted job): the guide's orphan, gc's


class DeviceKind(StrEnum):
    LAYER = "layer"        # one per layer chain (unpacked_images)
    SNAPSHOT = "snapshot"  # one per VM (snapshots)


@dataclass(frozen=True)
class DeviceRecord:
    """A device as it describes itself."""

    device_id: int
    kind: DeviceKind
    state: RecordState
    size_bytes: int
    job_id: int | None
    created_at: str
    updated_at: str
    chain_id: str | None = None          # a layer chain's device
    layer_digest: str | None = None
    parent_chain_id: str | None = None
    origin_device_id: int | None = None  # the device it is a snapshot of (upper layer or VM disk)
    image_source: str | None = None      # a VM snapshot: the image it copies
    vm_id: str | None = None             # None: the image's first snapshot (process-image's)

    @property
    def name(self) -> str:
        return device_name(self.device_id)

    @property
    def ready(self) -> bool:
        return self.state == RecordState.READY

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "name": self.name, **asdict(self)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> DeviceRecord:
        fields = {k: v for k, v in data.items() if k not in ("version", "name")}
        return DeviceRecord(**{**fields, "kind": DeviceKind(fields["kind"]), "state": RecordState(fields["state"])})


@dataclass(frozen=True)
class LayerRecord:
    """One layer of an image, in order, with what the layers table knows of its blob."""

    digest: str
    chain_id: str
    size_bytes: int
    format: str
    source: str
    etag: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    """An image as it describes itself: enough to give it back its row, its layers and a
    complete job whose idempotency key and context are the ones that made it."""

    image_id: int
    name: str
    source: str
    idempotency_key: str
    layers: tuple[LayerRecord, ...]
    pinned: bool
    job_context: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **asdict(self)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ImageRecord:
        fields = {k: v for k, v in data.items() if k != "version"}
        return ImageRecord(**{**fields, "layers": tuple(LayerRecord(**layer) for layer in fields["layers"])})


@dataclass(frozen=True)
class UnreadableRecord:
    """A record file that does not parse (a bad disk, a hand edit): its device is neither
    trusted as ready nor taken for an orphan; gc leaves it alone and says so."""

    device_id: int
    error: str

    @property
    def name(self) -> str:
        return device_name(self.device_id)


class RecordStore:
    """The record files of one state directory (the pool's directory)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / RECORDS_DIR
        self.devices_dir = self.root / "devices"
        self.images_dir = self.root / "images"

    # -- devices -------------------------------------------------------------------------

    def write_device(self, record: DeviceRecord) -> None:
        self._ensure(self.devices_dir)
        write_atomically(self._device_path(record.device_id), _encode(record.to_json()))

    def remove_device(self, device_id: int) -> None:
        remove_durably(self._device_path(device_id))

    def device(self, device_id: int) -> DeviceRecord | UnreadableRecord | None:
        return _read_device(self._device_path(device_id), device_id)

    def has_device(self, device_id: int) -> bool:
        return self._device_path(device_id).exists()

    def device_ids(self) -> list[int]:
        """Ids of every device record, from the directory listing alone (no file is read)."""
        try:
            names = os.listdir(self.devices_dir)
        except FileNotFoundError:
            return []
        ids = (device_id_from_name(name[:-len(SUFFIX)]) for name in names if name.endswith(SUFFIX))
        return sorted(i for i in ids if i is not None)

    def devices(self) -> dict[int, DeviceRecord | UnreadableRecord]:
        found: dict[int, DeviceRecord | UnreadableRecord] = {}
        for device_id in self.device_ids():
            record = _read_device(self._device_path(device_id), device_id)
            if record is not None:
                found[device_id] = record
        return found

    # -- images --------------------------------------------------------------------------

    def write_image(self, record: ImageRecord) -> None:
        self._ensure(self.images_dir)
        write_atomically(self._image_path(record.source), _encode(record.to_json()))

    def image(self, source: str) -> ImageRecord | None:
        try:
            return ImageRecord.from_json(json.loads(self._image_path(source).read_bytes()))
        except FileNotFoundError:
            return None

    def images(self) -> tuple[list[ImageRecord], list[str]]:
        """Every readable image record, and the names of those that do not parse."""
        records: list[ImageRecord] = []
        unreadable: list[str] = []
        try:
            names = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return records, unreadable
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            try:
                records.append(ImageRecord.from_json(json.loads((self.images_dir / name).read_bytes())))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                unreadable.append(f"{name}: {exc}")
        return records, unreadable

    # -- paths ---------------------------------------------------------------------------

    def _device_path(self, device_id: int) -> Path:
        return self.devices_dir / f"{device_name(device_id)}{SUFFIX}"

    def _image_path(self, source: str) -> Path:
        return self.images_dir / f"{hashlib.sha256(source.encode()).hexdigest()[:32]}{SUFFIX}"

    def _ensure(self, directory: Path) -> None:
        """The directory, made durable the first time (its own entry fsynced in its parent)."""
        if directory.is_dir():
            return
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
        fsync_dir(directory.parent.parent)


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _read_device(path: Path, device_id: int) -> DeviceRecord | UnreadableRecord | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return UnreadableRecord(device_id, str(exc))
    try:
        record = DeviceRecord.from_json(json.loads(raw))
    except (ValueError, TypeError, KeyError) as exc:
        return UnreadableRecord(device_id, f"{type(exc).__name__}: {exc}")
    if record.device_id != device_id:
        return UnreadableRecord(device_id, f"names device {record.device_id}")
    return record
