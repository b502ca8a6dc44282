"""The largest sizes this product accepts, checked before any job row exists: one line
naming the limit, nothing recorded (a size the engine cannot store or the kernel cannot
make would otherwise abort a job half-way and leave its row, or a device, behind).

A device's size is bounded by, whichever is smallest:

* SQLite: sizes are INTEGER columns, at most 2^63 - 1;
* the kernel: a block device's size is a loff_t of whole 512-byte sectors (dm-thin and
  loop devices alike; dm-thin's own virtual block numbers are 64-bit, no smaller bound);
* ext4: every device holds one (made by mkfs.ext4, grown by resize2fs), and e2fsprogs
  refuses 2^48 blocks or more (measured: `mke2fs: Size of device (0x1000000000000 blocks)
  too big to create a filesystem`); at 1 KiB, the smallest block a layer may have, that is
  just under 256 PiB;
* the blockfile backend: each device is a file in the pool's filesystem, so that
  filesystem's largest file (measured by truncating a sparse scratch file: XFS, the pool's,
  takes 2^63 - 1; a directory-mode pool on ext4 16 TiB - 4 KiB).

The pool's own files (setup-pool's sizes) are files in the state directory, bounded by
its filesystem and the kernel; dm-thin reads at most 15.9 GiB of metadata.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from support.errors import PermanentError
from support.sizes import SQLITE_INTEGER_MAX

if TYPE_CHECKING:
    from devices.base import ThinPool

SECTOR = 512
BLOCK_DEVICE_MAX = SQLITE_INTEGER_MAX // SECTOR * SECTOR
EXT4_MAX_BLOCKS = 2**48 - 1
EXT4_SMALLEST_BLOCK = 1024
EXT4_MAX_BYTES = EXT4_MAX_BLOCKS * EXT4_SMALLEST_BLOCK
# dm-thin's THIN_METADATA_MAX_SECTORS (255 * 2^14 * 8 sectors): space beyond it is ignored.
THIN_METADATA_MAX_BYTES = 255 * 2**14 * 8 * SECTOR


@dataclass(frozen=True)
class SizeLimit:
    """A maximum in bytes and what imposes it (said in the error line)."""

    max_bytes: int
    why: str


SQLITE_LIMIT = SizeLimit(SQLITE_INTEGER_MAX, "SQLite's largest INTEGER")
BLOCK_DEVICE_LIMIT = SizeLimit(BLOCK_DEVICE_MAX, "the kernel's largest block device")
EXT4_LIMIT = SizeLimit(EXT4_MAX_BYTES, "ext4's largest filesystem at 1 KiB blocks: 2^48 - 1 blocks")


def smallest(*limits: SizeLimit) -> SizeLimit:
    """The limit that binds (the first of equal ones)."""
    return min(limits, key=lambda limit: limit.max_bytes)


def human(size: int) -> str:
    """`256.0 PiB`: a size in the largest binary unit it reaches."""
    value, unit = float(size), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    return f"{value:.1f} {unit}" if unit != "bytes" else f"{size} bytes"


def check_size(what: str, size: int, limit: SizeLimit, thing: str) -> int:
    """`size` when it is at most `limit`; else a one-line PermanentError naming both."""
    if size > limit.max_bytes:
        raise PermanentError(f"{what} {size} bytes ({human(size)}) is larger than the largest {thing}: "
                             f"{limit.max_bytes} bytes ({human(limit.max_bytes)}, {limit.why})")
    return size


def check_device_size(what: str, size: int, pool: ThinPool) -> int:
    """`size` for a device of `pool`, checked against the smallest of the bounds above."""
    limit = smallest(SQLITE_LIMIT, BLOCK_DEVICE_LIMIT, EXT4_LIMIT, pool.max_device_bytes())
    return check_size(what, size, limit, f"device the {pool.backend_name} backend makes")


def max_file_bytes(directory: Path, ceiling: int = SQLITE_INTEGER_MAX) -> int:
    """The largest file `directory`'s filesystem holds, up to `ceiling`: a sparse scratch
    file is truncated to sizes (no data block is written) and the filesystem says EFBIG
    above its maximum; a binary search finds it exactly when `ceiling` does not fit."""
    fd, name = tempfile.mkstemp(prefix=".size-probe-", dir=directory)
    try:
        def fits(size: int) -> bool:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                if exc.errno in (errno.EFBIG, errno.EINVAL):
                    return False
                raise
            return True

        if fits(ceiling):
            return ceiling
        low, high = 0, ceiling  # low fits, high does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low
    finally:
        os.close(fd)
        os.unlink(name)


def file_limit(directory: Path) -> SizeLimit:
    """The largest file the filesystem of `directory` holds (probed), as a limit."""
    return SizeLimit(max_file_bytes(directory), f"the largest file the filesystem of {directory} holds")


def check_pool_size(what: str, size: int, state_dir: Path, backend: str) -> int:
    """A pool file's size (setup-pool --data-size, --grow, ...): a file in the state
    directory, attached to a loop device; dm-thin metadata beyond what dm-thin reads is refused."""
    limits = [SQLITE_LIMIT, BLOCK_DEVICE_LIMIT, file_limit(state_dir)]
    if backend == "devicemapper" and "metadata" in what:
        limits.append(SizeLimit(THIN_METADATA_MAX_BYTES, "what dm-thin reads of a metadata device"))
    return check_size(what, size, smallest(*limits), f"pool file ({backend})")
