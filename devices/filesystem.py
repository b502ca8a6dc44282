"""mkfs.ext4 the way thin devices need it: no discard, inode tables and journal written now."""

from __future__ import annotations

from support.proc import run_command

MKFS_TIMEOUT = 120.0


def make_filesystem(device: str, *, timeout: float = MKFS_TIMEOUT, label: str | None = None) -> None:
    """An ext4 filesystem on `device`. A timeout raises CommandTimeout (a hazard).

    lazy_itable_init=0 so no background kernel thread keeps writing to a device we are
    about to snapshot; nodiscard because discards on dm-thin are slow and unneeded on a
    fresh thin device."""
    argv = ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
    if label:
        argv += ["-L", label]
    run_command([*argv, device], timeout=timeout)
