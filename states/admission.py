"""Admission: before a job creates a layer's device (or a VM's snapshot), the space it
will take is compared with the pool's free space. A device that would take data usage to
or past the high watermark first evicts least recently used images (services.evict:
catalog/eviction.py, in the daemon and the CLI alike), and if that is not enough the job
waits (PoolFullWait, a NotReadyError, the reason recorded) instead of running the pool
out; dm-thin's `queue_if_no_space` would otherwise stall every writer of the pool. The
daemon waits (the runner backs off and tries again: others can free space meanwhile); a
CLI command leaves the job waiting at once and exits, since it holds the manager lock
that `gc --images --force` and `setup-pool --grow` need. A high watermark of 100%
(FLYIO_POOL_HIGH_PERCENT=100) turns admission off."""

from __future__ import annotations

from devices.base import PoolStatus
from states.services import ImageServices
from support.errors import NotReadyError
from support.log import get_logger

log = get_logger("states.admission")

MIB = 1024**2
# What mkfs and the unpack write beyond the layer's own bytes: inode tables, bitmaps and
# directories, and the first snapshot's 8 MiB journal (measured: docs/performance.md).
BASE_DEVICE_OVERHEAD = 16 * MIB
CONTENT_OVERHEAD = 0.10


class PoolFullWait(NotReadyError):
    """The layer's device would take the pool past its high watermark."""


def snapshot_bytes() -> int:
    """Pool space a VM's snapshot is expected to take when made: the journal it gets
    (states/snapshotting.py) and a block of metadata; its writes come later, the VM's."""
    from devices.filesystem import VM_JOURNAL_MIB

    return VM_JOURNAL_MIB * MIB + MIB


def estimated_bytes(tar_bytes: int, base: bool) -> int:
    """Pool space a layer of `tar_bytes` (decompressed tar) is expected to take."""
    return int(tar_bytes * (1 + CONTENT_OVERHEAD)) + (BASE_DEVICE_OVERHEAD if base else MIB)


def _would_cross(status: PoolStatus, need: int, high: float) -> bool:
    total = status.total_data_blocks * status.data_block_bytes
    used = status.used_data_blocks * status.data_block_bytes
    return bool(total) and (used + need) / total >= high


def admit(services: ImageServices, *, tar_bytes: int, base: bool, job_id: int) -> None:
    """Return when the layer fits below the high watermark (after evicting); else raise
    PoolFullWait naming the sizes."""
    admit_bytes(services, estimated_bytes(tar_bytes, base), job_id=job_id, what="this layer")


def admit_bytes(services: ImageServices, need: int, *, job_id: int, what: str) -> None:
    """Return when `need` bytes fit below the high watermark (after evicting); else raise
    PoolFullWait naming the sizes and, outside the daemon, leaving the job waiting."""
    high = services.policy.high
    if high >= 1.0:
        return  # a high watermark of 100% is none: the operator turned admission off
    status = services.pool.get_pool_status()
    if not status.exists or not _would_cross(status, need, high):
        return
    if services.evict is not None:
        log.warning("pool would cross the high watermark; evicting images first", job_id=job_id, need_bytes=need,
                    free_bytes=status.free_data_bytes, high_watermark=f"{high:.0%}")
        services.evict(need)
        status = services.pool.get_pool_status()
        if not _would_cross(status, need, high):
            return
    then = "" if services.wait_for_room else ", then fsm resume"
    raise PoolFullWait(f"pool has no room below its high watermark ({high:.0%}) for {what}: needs about "
                       f"{need / MIB:.1f} MiB, {status.free_data_bytes / MIB:.1f} MiB free "
                       f"({status.data_used_fraction:.1%} used); free space (gc --images --force) or grow the pool "
                       f"(setup-pool --grow SIZE){then}", leave_waiting=not services.wait_for_room)
