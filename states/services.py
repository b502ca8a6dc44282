"""Everything the image job's steps use, built once per process and passed to each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.device_records import RecordStore
from catalog.ledger import DeviceLedger
from devices.base import ThinPool
from devices.policy import UsagePolicy
from fsm.context import StepContext
from images.blobstore import BlobStore
from images.formats import DEFAULT_LIMITS, Limits
from images.prefetch import Prefetcher
from support.progress import Progress, no_progress

DEFAULT_DEVICE_SIZE = 4 * 1024**3


def _registry_client(registry: str, options: dict[str, Any] | None) -> Any:
    from images.registry import RegistryOptions, client_for

    return client_for(registry, RegistryOptions.from_dict(options))


@dataclass
class ImageServices:
    """The job's collaborators. `health_guard` returns None when the host is healthy,
    else the reason the job must wait; `operation` serializes device-mapper work.
    `device_size_bytes` is the size of a new base device when the request names none."""

    state_dir: Path
    pool: ThinPool
    blobs: BlobStore
    s3_client: Callable[[str | None], Any]
    health_guard: Callable[[], str | None]
    operation: Callable[[str], Any]
    device_size_bytes: int = DEFAULT_DEVICE_SIZE
    limits: Limits = DEFAULT_LIMITS
    progress: Callable[[str, int | None], Progress] = field(default=no_progress)
    prefetch: Prefetcher = field(default_factory=Prefetcher)  # later blobs download while layers unpack
    # Admission (states/admission.py): the watermarks, the eviction a job runs before it
    # waits for room (None: none), and whether it then waits in this process (the daemon,
    # which others can talk to) or is left waiting at once (a CLI command: it holds the
    # manager lock that the remedies need).
    policy: UsagePolicy = field(default_factory=UsagePolicy)
    evict: Callable[[int], Any] | None = None  # called with the bytes to make room for
    wait_for_room: bool = False
    layer_block_size: int | None = None  # a new base layer's ext4 block size (None: mke2fs's 4 KiB)
    # oci:// layers: this thread's client of a registry, from the job's registry options.
    registry_client: Callable[[str, dict[str, Any] | None], Any] = _registry_client

    @property
    def mount_root(self) -> Path:
        return self.state_dir / "mnt"

    @property
    def records(self) -> RecordStore:
        """The records devices and images keep of themselves beside the pool."""
        return RecordStore(self.state_dir)

    def ledger(self, ctx: StepContext) -> DeviceLedger:
        """The device ledger for a step: its rows commit with the job's context."""
        return DeviceLedger(self.pool, ctx.transaction, self.records)
