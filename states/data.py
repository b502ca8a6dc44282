"""Typed views of the jobs' context data. The engine stores a job's context as a JSON dict
(`StepContext.data`); a view reads and writes that same dict through properties, so what is
stored stays exactly as it was, and no step spells a key. Light to import: the CLI builds
its result line from a view on its fast path (cli/app.py result_line).

    image job:     image {name, source, endpoint_url, device_size_bytes[, manifest_digest,
                   config, registry]}, objects, blobs, layers, layer_index, devices
                   {chain id: thin id}, image_id, snapshot_device_id, snapshot_device
    snapshot job:  image_id, image {name}, vm_id, snapshot_size_bytes, snapshot_device_id,
                   snapshot_device
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from devices.base import device_name

if TYPE_CHECKING:
    from catalog.eviction import JobUses


T = TypeVar("T")
_REQUIRED: Any = object()


class Key(Generic[T]):
    """One key of the context dict as a typed attribute of a view: read as `data[key]` (or
    `data.get(key, default)` when a default is given: the key may not be there yet) and
    written into the dict in place."""

    def __init__(self, key: str, default: Any = _REQUIRED) -> None:
        self.key = key
        self.default = default

    def __get__(self, view: JobData, owner: type | None = None) -> T:
        return view.data[self.key] if self.default is _REQUIRED else view.data.get(self.key, self.default)

    def __set__(self, view: JobData, value: T) -> None:
        assert isinstance(view.data, dict), "a read-only view"
        view.data[self.key] = value


class JobData:
    """What both workflows' contexts hold: the image, and the snapshot the job handed out."""

    image: Key[dict[str, Any]] = Key("image")
    image_id: Key[int] = Key("image_id")
    vm_id: Key[str | None] = Key("vm_id", None)  # a VM's snapshot (the image job's first has none)
    snapshot_size_bytes: Key[int | None] = Key("snapshot_size_bytes", None)  # asked for; None: the origin's
    snapshot_device_id: Key[int | None] = Key("snapshot_device_id", None)
    snapshot_device: Key[str | None] = Key("snapshot_device", None)  # the device path a VM is given

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    @classmethod
    def of(cls, context: str | None) -> Self:
        """A view of a stored context (a job row's JSON text; None or empty: nothing yet)."""
        return cls(json.loads(context or "{}"))

    @property
    def image_name(self) -> str | None:
        return (self.data.get("image") or {}).get("name")

    @property
    def snapshot_name(self) -> str | None:
        """The snapshot's device name (`thin-N`), once the job has made it."""
        return device_name(self.snapshot_device_id) if self.snapshot_device_id is not None else None


def job_uses(data: Mapping[str, Any]) -> JobUses:
    """What an unfinished job of either workflow may still use, for eviction: its image and
    the layer chains it has listed so far (catalog/eviction.py keeps them)."""
    from catalog.eviction import JobUses  # the catalog's type; importing it here keeps this module light

    view = ImageJobData(data)  # a snapshot job's context has the image keys and no layers
    image = view.data.get("image") or {}
    return JobUses(image_id=view.data.get("image_id"), source=image.get("source"),
                   chain_ids=tuple(layer["chain_id"] for layer in view.known_layers if layer.get("chain_id")))


class ImageJobData(JobData):
    """The image job's context: its objects, then its blobs, then its layers in order with
    the device of each chain (thin id by chain id, updated in place), and the index of the
    layer the device loop is on."""

    blobs: Key[list[dict[str, Any]]] = Key("blobs")
    layers: Key[list[dict[str, Any]]] = Key("layers")
    layer_index: Key[int] = Key("layer_index", 0)
    devices: Key[dict[str, int]] = Key("devices")

    @property
    def objects(self) -> list[dict[str, Any]]:
        return self.data.get("objects") or []

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint the image's objects come from (None: the default)."""
        return self.image.get("endpoint_url")

    @property
    def registry(self) -> dict[str, Any] | None:
        """How to reach a registry image's registry (images.registry.RegistryOptions as a dict)."""
        return self.image.get("registry")

    @property
    def device_size_bytes(self) -> int | None:
        """The size asked for the image's new base devices (None: the process's default)."""
        return self.image.get("device_size_bytes")

    @property
    def known_layers(self) -> list[dict[str, Any]]:
        """The layers so far ([] before the job listed them)."""
        return self.data.get("layers") or []

    @property
    def known_devices(self) -> dict[str, int]:
        """The thin id of each chain the job has a device for so far ({} before any)."""
        return self.data.get("devices") or {}

    @property
    def top_device_name(self) -> str | None:
        """The device of the image's top layer chain (`thin-N`), once the job has made it."""
        layers = self.known_layers
        devices = self.known_devices
        if not layers or layers[-1]["chain_id"] not in devices:
            return None
        return device_name(devices[layers[-1]["chain_id"]])

    def result(self, job_id: int | None, state: str | None, error: str | None,
               image_name: str | None = None) -> dict[str, Any]:
        """What `process-image` (and `submit --wait`) report of the job, in order."""
        return {"job_id": job_id, "state": state, "image": image_name or self.image_name,
                "device": self.top_device_name, "snapshot": self.snapshot_name,
                "snapshot_device": self.snapshot_device, "error": error}


class SnapshotJobData(JobData):
    """The snapshot job's context: the image, the VM and the size it asked for."""

    vm_id: Key[str] = Key("vm_id")  # type: ignore[assignment]  # always there in this workflow

    def result(self, job_id: int | None, state: str | None, error: str | None) -> dict[str, Any]:
        """What `snapshot` (and `submit --snapshot --wait`) report of the job, in order."""
        return {"job_id": job_id, "state": state, "image": self.image_name, "vm": self.data.get("vm_id"),
                "snapshot": self.snapshot_name, "snapshot_device": self.snapshot_device,
                "size": self.snapshot_size_bytes, "error": error}
