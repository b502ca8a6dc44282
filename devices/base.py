"""The one interface every thin-pool backend implements, and the plain data it returns.

Modelled on containerd's devmapper snapshotter: the pool device, the metadata store
(catalog/, not here) and the command wrapper are kept apart. A backend never decides
*which* thin id to use: the caller allocates it and records it in the database first
(intent first), so a crash can never leave a device that no row names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from support.errors import ManagerError

if TYPE_CHECKING:
    from devices.limits import SizeLimit

DEVICE_PREFIX = "thin-"


def device_name(device_id: int) -> str:
    """The name the guide's `dmsetup ls | grep thin-` expects."""
    return f"{DEVICE_PREFIX}{device_id}"


def device_id_from_name(name: str) -> int | None:
    """The thin id in `thin-<id>`, or None for a name that is not ours."""
    if not name.startswith(DEVICE_PREFIX):
        return None
    tail = name[len(DEVICE_PREFIX):]
    return int(tail) if tail.isdigit() else None


class PoolUnhealthy(ManagerError):
    """The pool exists but must not be written to (needs_check, read-only, full, failed)."""


class DeviceExists(ManagerError):
    """create_thin / create_snap found the thin id already taken (EEXIST)."""


class OriginMissing(ManagerError):
    """create_snap's origin is not in the pool (ENODATA): nothing was created."""


@dataclass(frozen=True)
class PoolStatus:
    """What `dmsetup status pool` (or the blockfile equivalent) says about the pool."""

    backend: str
    exists: bool
    needs_check: bool = False
    read_only: bool = False
    error_state: bool = False
    out_of_data_space: bool = False
    transaction_id: int = 0
    used_data_blocks: int = 0
    total_data_blocks: int = 0
    used_metadata_blocks: int = 0
    total_metadata_blocks: int = 0
    data_block_bytes: int = 0
    raw: str = ""

    @property
    def healthy(self) -> bool:
        return self.exists and not (self.needs_check or self.read_only or self.error_state or self.out_of_data_space)

    @property
    def data_used_fraction(self) -> float:
        return self.used_data_blocks / self.total_data_blocks if self.total_data_blocks else 0.0

    @property
    def metadata_used_fraction(self) -> float:
        return self.used_metadata_blocks / self.total_metadata_blocks if self.total_metadata_blocks else 0.0

    @property
    def free_data_bytes(self) -> int:
        return (self.total_data_blocks - self.used_data_blocks) * self.data_block_bytes


@dataclass(frozen=True)
class DeviceInfo:
    """A thin device as the backend sees it (not as the database says it should be)."""

    device_id: int
    name: str
    active: bool
    path: str | None = None
    mounted_at: str | None = None


@dataclass(frozen=True)
class PoolConfig:
    """Where the pool lives and how big it is (the guide's defaults: 2 GB data + 1 MB metadata).
    `data_block_bytes` is dm-thin's, for a pool created now (None: the guide's 1 MiB); an
    existing pool keeps the one it was created with."""

    directory: str
    data_size_bytes: int = 2 * 1024**3
    metadata_size_bytes: int = 1024**2
    pool_name: str = "pool"
    data_block_bytes: int | None = None


def activate_each(activate: Callable[[int, int], str],
                  devices: Sequence[tuple[int, int]]) -> dict[int, str | ManagerError]:
    """`activate_all` one device after another: each device's path, or the ManagerError that
    refused it (one refusal does not stop the others)."""
    paths: dict[int, str | ManagerError] = {}
    for device_id, size_bytes in devices:
        try:
            paths[device_id] = activate(device_id, size_bytes)
        except ManagerError as exc:
            paths[device_id] = exc
    return paths


class ThinPool(Protocol):
    """A pool of thin devices with cheap snapshots. Every call has a timeout inside."""

    backend_name: str
    config: PoolConfig  # its directory is the state directory (device records live beside the pool)

    def ensure_pool_exists(self) -> PoolStatus:
        """Create the pool if missing (after a reboot: re-attach the existing files)."""
        ...

    def get_pool_status(self) -> PoolStatus:
        """Current status; `exists=False` when there is no pool."""
        ...

    def validate_pool_health(self) -> PoolStatus:
        """Status, or PoolUnhealthy naming the problem."""
        ...

    def create_thin(self, device_id: int, size_bytes: int) -> None:
        """A new, empty thin device `thin-<device_id>`, not yet active."""
        ...

    def create_snapshot(self, device_id: int, origin_id: int) -> None:
        """A copy-on-write snapshot of origin (suspended or inactive around the call)."""
        ...

    def activate(self, device_id: int, size_bytes: int) -> str:
        """Make the device usable; return its block device path. Idempotent."""
        ...

    def active_path(self, device_id: int) -> str | None:
        """The device's block device path if it is active now, else None (one lookup of
        that device, no listing; nothing is changed)."""
        ...

    def activate_all(self, devices: Sequence[tuple[int, int]]) -> dict[int, str | ManagerError]:
        """Activate each (device_id, size_bytes): its path, or the error that refused it
        (a reboot's re-activation of every VM's disk: one refusal does not stop the rest)."""
        ...

    def deactivate(self, device_id: int) -> None:
        """Remove the device's mapping; its data stays in the pool. Idempotent."""
        ...

    def delete(self, device_id: int) -> None:
        """Free the device's blocks in the pool. Idempotent (absent is fine)."""
        ...

    def list_devices(self) -> list[DeviceInfo]:
        """Every thin device the pool holds, active or not."""
        ...

    def max_device_bytes(self) -> "SizeLimit":
        """The largest device this backend can make (devices/limits.py adds the bounds
        every backend shares)."""
        ...

    def grow_pool(self, *, data_size_bytes: int | None = None, metadata_size_bytes: int | None = None) -> PoolStatus:
        """Enlarge the live pool (its devices untouched, active or mounted); a size below
        the current one is a ManagerError (shrinking is refused). A power cut part-way
        leaves a pool that re-attaches at the old or the new size."""
        ...


class PoolShrinkRefused(ManagerError):
    """--grow to a size below the pool's current one."""


def check_growth(what: str, current: int, wanted: int) -> bool:
    """Whether `wanted` grows `current` (equal: nothing to do); PoolShrinkRefused if it shrinks."""
    if wanted < current:
        raise PoolShrinkRefused(f"cannot shrink the pool's {what} from {current} to {wanted} bytes; "
                                "a pool only grows (shrinking would cut devices short)")
    return wanted > current
