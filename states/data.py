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
from typing import Any, Self

from devices.base import device_name


class JobData:
    """What both workflows' contexts hold: the image, and the snapshot the job handed out."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    @classmethod
    def of(cls, context: str | None) -> Self:
        """A view of a stored context (a job row's JSON text; None or empty: nothing yet)."""
        return cls(json.loads(context or "{}"))

    def _set(self, key: str, value: Any) -> None:
        assert isinstance(self.data, dict), "a read-only view"
        self.data[key] = value

    @property
    def image(self) -> dict[str, Any]:
        return self.data["image"]

    @property
    def image_name(self) -> str | None:
        return (self.data.get("image") or {}).get("name")

    @property
    def image_id(self) -> int:
        return int(self.data["image_id"])

    @image_id.setter
    def image_id(self, value: int) -> None:
        self._set("image_id", value)

    @property
    def vm_id(self) -> str | None:
        """The VM a snapshot job's snapshot is for (the image job's first snapshot has none)."""
        return self.data.get("vm_id")

    @property
    def snapshot_size_bytes(self) -> int | None:
        """The size a snapshot job asked for (None: the origin's)."""
        return self.data.get("snapshot_size_bytes")

    @property
    def snapshot_device_id(self) -> int | None:
        return self.data.get("snapshot_device_id")

    @snapshot_device_id.setter
    def snapshot_device_id(self, value: int) -> None:
        self._set("snapshot_device_id", value)

    @property
    def snapshot_device(self) -> str | None:
        """The snapshot's device path, as handed to a VM."""
        return self.data.get("snapshot_device")

    @snapshot_device.setter
    def snapshot_device(self, value: str) -> None:
        self._set("snapshot_device", value)

    @property
    def snapshot_name(self) -> str | None:
        """The snapshot's device name (`thin-N`), once the job has made it."""
        return device_name(self.snapshot_device_id) if self.snapshot_device_id is not None else None


class ImageJobData(JobData):
    """The image job's context: its objects, then its blobs, then its layers in order with
    the device of each chain, and the index of the layer the device loop is on."""

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
    def objects(self) -> list[dict[str, Any]]:
        return self.data.get("objects") or []

    @property
    def blobs(self) -> list[dict[str, Any]]:
        return self.data["blobs"]

    @blobs.setter
    def blobs(self, value: list[dict[str, Any]]) -> None:
        self._set("blobs", value)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.data["layers"]

    @layers.setter
    def layers(self, value: list[dict[str, Any]]) -> None:
        self._set("layers", value)

    @property
    def layer_index(self) -> int:
        return int(self.data.get("layer_index", 0))

    @layer_index.setter
    def layer_index(self, value: int) -> None:
        self._set("layer_index", value)

    @property
    def devices(self) -> dict[str, int]:
        """Thin id of each layer chain's device (chain id -> id), updated in place."""
        return self.data["devices"]

    @devices.setter
    def devices(self, value: dict[str, int]) -> None:
        self._set("devices", value)

    @property
    def top_device_name(self) -> str | None:
        """The device of the image's top layer chain (`thin-N`), once the job has made it."""
        layers = self.data.get("layers") or []
        devices = self.data.get("devices") or {}
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

    @property
    def vm_id(self) -> str:
        return self.data["vm_id"]

    def result(self, job_id: int | None, state: str | None, error: str | None) -> dict[str, Any]:
        """What `snapshot` (and `submit --snapshot --wait`) report of the job, in order."""
        return {"job_id": job_id, "state": state, "image": self.image_name, "vm": self.data.get("vm_id"),
                "snapshot": self.snapshot_name, "snapshot_device": self.snapshot_device,
                "size": self.snapshot_size_bytes, "error": error}

