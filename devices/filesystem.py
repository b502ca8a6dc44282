"""mkfs.ext4 the way thin devices need it (no discard, inode tables and journal written now),
and the write-back check a layer passes before it is trusted."""

from __future__ import annotations

import os

from support.errors import HazardError, ManagerError
from support.proc import CommandFailed, run_command

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


def make_filesystem(device: str, *, timeout: float | None = None, label: str | None = None) -> None:
    """An ext4 filesystem on `device`. A timeout (default mkfs_timeout()) raises
    CommandTimeout (a hazard).

    lazy_itable_init=0 so no background kernel thread keeps writing to a device we are
    about to snapshot; nodiscard because discards on dm-thin are slow and unneeded on a
    fresh thin device."""
    argv = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
    if label:
        argv += ["-L", label]
    run_command([*argv, device], timeout=mkfs_timeout() if timeout is None else timeout)


SYNC_TIMEOUT = 120.0


def flush_filesystem(mount_point: str | os.PathLike[str], *, timeout: float = SYNC_TIMEOUT) -> None:
    """syncfs(2) on the filesystem mounted at `mount_point`, through `sync --file-system`.

    Writes that failed in writeback (EIO from a thin pool out of data space or a failing
    disk) are reported here; umount would drop them silently and a broken layer would be
    marked ready. A failure or a timeout raises HazardError: the device misbehaved."""
    try:
        run_command(["sync", "--file-system", os.fspath(mount_point)], timeout=timeout)
    except CommandFailed as exc:
        raise HazardError(f"writing back {os.fspath(mount_point)} failed: {exc}") from exc


GROW_TIMEOUT = 300.0
E2FSCK_CLEAN = (0, 1)  # clean, or errors corrected (a journal replayed)


def grow_filesystem(device: str, *, timeout: float = GROW_TIMEOUT) -> None:
    """Grow the (unmounted) ext4 on `device` to fill the device: `e2fsck -f` first, as
    resize2fs requires of an offline filesystem, then `resize2fs`. A failure or a timeout
    is a hazard: the snapshot is not handed out."""
    check = run_command(["e2fsck", "-f", "-p", device], timeout=timeout, check=False)
    if check.returncode not in E2FSCK_CLEAN:
        raise HazardError(f"growing the filesystem on {device} failed: {CommandFailed(check)}")
    try:
        run_command(["resize2fs", device], timeout=timeout)
    except CommandFailed as exc:
        raise HazardError(f"growing the filesystem on {device} failed: {exc}") from exc
