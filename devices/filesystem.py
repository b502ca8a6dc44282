"""mkfs.ext4 the way thin devices need it (no discard, nothing zeroed that reads as zeros
anyway, the VM's journal made but not used by the layers), and the write-back check a
layer passes before it is trusted.

This module is the one that runs the filesystem and block-device tools: e2fsprogs
(mkfs.ext4, tune2fs, e2fsck, resize2fs), xfsprogs (mkfs.xfs, xfs_growfs, for the
blockfile pool), blkid, blockdev and sync. Their error output is mapped once, in
FILESYSTEM_ERRORS, to the errno ToolFailed carries."""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

from devices.mount import DEFAULT_OPTIONS
from support.errors import HazardError, ManagerError
from support.proc import CommandFailed, ErrorTable
from support.sizes import parse_size

# The tools print strerror texts ("tune2fs: No such file or directory while trying to open
# /dev/x", "blockdev: cannot open /dev/x: ...") and a few refusals of their own.
FILESYSTEM_ERRORS = ErrorTable((
    ("No space left on device", errno.ENOSPC),
    ("Device or resource busy", errno.EBUSY),
    ("is mounted; will not make a filesystem here", errno.EBUSY),  # mkfs.ext4
    ("contains a mounted filesystem", errno.EBUSY),                 # mkfs.xfs
    ("No such file or directory", errno.ENOENT),
    ("does not exist and no size was specified", errno.ENOENT),     # mkfs.ext4 of a missing file
    ("Operation not permitted", errno.EPERM),                       # writing to a read-only device
    ("Inappropriate ioctl for device", errno.ENOTTY),               # blockdev on what is not a block device
    ("is not a mounted XFS filesystem", errno.EINVAL),              # xfs_growfs
))

MKFS_TIMEOUT = 120.0
# Operators on slow disks raise it; tests lower it to make a real mkfs time out.
MKFS_TIMEOUT_ENV = "FLYIO_MKFS_TIMEOUT"


def mkfs_timeout() -> float:
    """$FLYIO_MKFS_TIMEOUT (seconds) when set, else MKFS_TIMEOUT."""
    value = os.environ.get(MKFS_TIMEOUT_ENV)
    if not value:
        return MKFS_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ManagerError(f"{MKFS_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ManagerError(f"{MKFS_TIMEOUT_ENV}={value!r} must be positive")
    return seconds


# A base layer's ext4 block size, which every layer above it and the VM's root inherit.
# mke2fs's 4 KiB unless an operator packing many small-file images picks 1 or 2 KiB: each
# file's last block is then that much smaller (docs/performance.md measures it).
LAYER_BLOCK_SIZE_ENV = "FLYIO_LAYER_BLOCK_SIZE"
LAYER_BLOCK_SIZES = (1024, 2048, 4096)


def layer_block_size() -> int | None:
    """$FLYIO_LAYER_BLOCK_SIZE in bytes (1K, 2K or 4K), or None when unset (mke2fs's 4 KiB)."""
    value = os.environ.get(LAYER_BLOCK_SIZE_ENV)
    if not value:
        return None
    try:
        size = parse_size(value)
    except ManagerError:
        size = 0
    if size not in LAYER_BLOCK_SIZES:
        raise ManagerError(f"{LAYER_BLOCK_SIZE_ENV}={value!r} is not an ext4 block size: use 1K, 2K or 4K")
    return size


# Layer devices: inode tables, bitmaps and the journal left unwritten (thin devices and
# sparse files read zeros, so zeroing them buys nothing: a new thin device or a fresh
# sparse file has no stale blocks, and the pool zeroes a data block it provisions) and
# packed at the start of the device. `noinit_itable` in the superblock's mount options
# keeps the kernel's lazy-init thread from zeroing the tables later, on the host and in the
# VM alike. The journal is the VM's: made here, never loaded while a layer unpacks
# (LAYER_UNPACK_MOUNT_OPTIONS: a layer is written once, synced and immutable once ready,
# and a journal in use would give every upper layer its own rewritten copy of it), first
# written when the VM mounts its snapshot. 8 MiB is 2048 blocks, enough for a root
# filesystem's metadata traffic, and at most what a VM's snapshot writes of it.
# inline_data: a file or directory of up to ~150 bytes lives in its inode instead of a
# whole 4 KiB block (0.5% of the pool on a production-shaped image; docs/performance.md).
VM_JOURNAL_MIB = 8
# Below this size mke2fs's own journal (1-4 MiB, what fits the filesystem) is kept.
VM_JOURNAL_MIN_DEVICE_BYTES = 256 * 1024**2
LAYER_MKFS_OPTIONS = ("-O", "inline_data", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1,packed_meta_blocks=1")
LAYER_MOUNT_OPTS = "noinit_itable"
# noload: ext4 runs without its journal (the kernel logs "r/w without journal"). noexec with
# nodev and nosuid: the layer's device nodes (made with mknod, as containerd makes them) and
# its programs are the VM's, never usable on the host while it is being written.
LAYER_UNPACK_MOUNT_OPTIONS = (*DEFAULT_OPTIONS, "noexec", "noload")
TUNE2FS_TIMEOUT = 120.0


def make_filesystem(device: str, *, timeout: float | None = None, label: str | None = None,
                    block_size: int | None = None) -> None:
    """An ext4 filesystem for a layer device on `device` (LAYER_MKFS_OPTIONS: about 2 MiB
    written on a 4 GiB device, the journal included), in blocks of `block_size` (None:
    mke2fs's own). A timeout (default mkfs_timeout()) raises CommandTimeout (a hazard).
    nodiscard: discards on dm-thin are slow and a fresh thin device has nothing to discard."""
    argv = ["mkfs.ext4", "-q", "-F", *LAYER_MKFS_OPTIONS]
    if block_size:
        argv += ["-b", str(block_size)]
    if device_bytes(device) >= VM_JOURNAL_MIN_DEVICE_BYTES:
        argv += ["-J", f"size={VM_JOURNAL_MIB}"]
    if label:
        argv += ["-L", label]
    seconds = mkfs_timeout() if timeout is None else timeout
    FILESYSTEM_ERRORS.run([*argv, device], timeout=seconds)
    FILESYSTEM_ERRORS.run(["tune2fs", "-E", f"mount_opts={LAYER_MOUNT_OPTS}", device], timeout=seconds)


def device_bytes(device: str, *, timeout: float = TUNE2FS_TIMEOUT) -> int:
    """The size of the block device (`blockdev --getsize64`, with a timeout: a wedged
    device must not hang us) or regular file at `device`; 0 for anything else."""
    status = os.stat(device)
    if stat.S_ISREG(status.st_mode):
        return status.st_size
    if not stat.S_ISBLK(status.st_mode):
        return 0
    return int(FILESYSTEM_ERRORS.run(["blockdev", "--getsize64", device], timeout=timeout).stdout.strip())


def flush_buffers(device: str, *, timeout: float) -> None:
    """`blockdev --flushbufs`: the block device's dirty buffers written to what backs it."""
    FILESYSTEM_ERRORS.run(["blockdev", "--flushbufs", device], timeout=timeout)


@dataclass(frozen=True)
class Probe:
    """What `blkid -p` found on a device or file: its fields (TYPE=xfs, UUID=...), and
    whether it reported no signature at all (exit 2)."""

    fields: dict[str, str]
    nothing_found: bool


def probe(path: str | os.PathLike[str], *, timeout: float) -> Probe:
    """`blkid -p -o export`: the signature on `path`, read from the device itself (no cache)."""
    done = FILESYSTEM_ERRORS.run(["blkid", "-p", "-o", "export", os.fspath(path)], timeout=timeout, check=False)
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return Probe(fields=fields, nothing_found=done.returncode == 2)


def make_xfs(path: str | os.PathLike[str], *, timeout: float) -> None:
    """`mkfs.xfs -m reflink=1` on `path` (the blockfile pool's data file): reflink makes
    a snapshot a copy-on-write clone of its origin's file."""
    FILESYSTEM_ERRORS.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", os.fspath(path)], timeout=timeout)


def grow_xfs(mount_point: str | os.PathLike[str], *, timeout: float) -> None:
    """`xfs_growfs`: the XFS mounted at `mount_point` fills its (grown) device."""
    FILESYSTEM_ERRORS.run(["xfs_growfs", os.fspath(mount_point)], timeout=timeout)


SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
COMPAT_HAS_JOURNAL = 0x0004


def has_journal(device: str) -> bool:
    """Whether the ext4 on `device` has a journal: the has_journal bit of the superblock's
    compatible features, read in place (what `tune2fs -l` prints, without a process start
    on every VM's snapshot)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        block = os.pread(fd, 1024, SUPERBLOCK_OFFSET)
    finally:
        os.close(fd)
    if len(block) < 0x60 or struct.unpack_from("<H", block, 0x38)[0] != EXT4_MAGIC:
        raise ManagerError(f"{device} holds no ext4 filesystem (no superblock magic at byte {SUPERBLOCK_OFFSET})")
    return bool(struct.unpack_from("<I", block, 0x5C)[0] & COMPAT_HAS_JOURNAL)


def add_journal(device: str, *, size_mib: int = VM_JOURNAL_MIB, timeout: float = TUNE2FS_TIMEOUT) -> bool:
    """Give the (unmounted) ext4 on `device` a journal of `size_mib`, unless it has one (every
    layer made since layers carry the VM's unused journal has; a chain made in between,
    journal-less, gets it here). True when one was added. A failure is a hazard: the
    snapshot is not handed out."""
    if has_journal(device):
        return False
    try:
        FILESYSTEM_ERRORS.run(["tune2fs", "-O", "has_journal", "-J", f"size={size_mib}", device], timeout=timeout)
    except CommandFailed as exc:
        raise HazardError(f"adding a journal to {device} failed: {exc}") from exc
    return True


SYNC_TIMEOUT = 120.0


def flush_filesystem(mount_point: str | os.PathLike[str], *, timeout: float = SYNC_TIMEOUT) -> None:
    """syncfs(2) on the filesystem mounted at `mount_point`, through `sync --file-system`.

    Writes that failed in writeback (EIO from a thin pool out of data space or a failing
    disk) are reported here; umount would drop them silently and a broken layer would be
    marked ready. A failure or a timeout raises HazardError: the device misbehaved."""
    try:
        FILESYSTEM_ERRORS.run(["sync", "--file-system", os.fspath(mount_point)], timeout=timeout)
    except CommandFailed as exc:
        raise HazardError(f"writing back {os.fspath(mount_point)} failed: {exc}") from exc


GROW_TIMEOUT = 300.0
E2FSCK_CLEAN = (0, 1)  # clean, or errors corrected (a journal replayed)


def grow_filesystem(device: str, *, timeout: float = GROW_TIMEOUT) -> None:
    """Grow the (unmounted) ext4 on `device` to fill the device: `e2fsck -f` first, as
    resize2fs requires of an offline filesystem, then `resize2fs`. A failure or a timeout
    is a hazard: the snapshot is not handed out."""
    check = FILESYSTEM_ERRORS.run(["e2fsck", "-f", "-p", device], timeout=timeout, check=False)
    if check.returncode not in E2FSCK_CLEAN:
        raise HazardError(f"growing the filesystem on {device} failed: {FILESYSTEM_ERRORS.failure(check)}")
    try:
        FILESYSTEM_ERRORS.run(["resize2fs", device], timeout=timeout)
    except CommandFailed as exc:
        raise HazardError(f"growing the filesystem on {device} failed: {exc}") from exc
