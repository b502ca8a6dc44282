"""Loop devices through losetup: attach, detach, find which loop backs a file.

Every call has a timeout: a losetup stuck in the kernel is a hazard (CommandTimeout),
never something to wait out. A file is matched to its loops by inode and device number,
not by path text, so renames, symlinks and odd characters in paths cannot confuse it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from support.errors import ManagerError
from support.proc import CommandFailed, run_command

LOSETUP_TIMEOUT = 30.0
DELETED_SUFFIX = " (deleted)"
# What losetup says when the loop device is already unbound (ENXIO) or its node is gone
# (ENOENT); "No such device" alone (ENODEV) means the path is not a loop device at all.
ALREADY_GONE = ("No such device or address", "No such file or directory")


@dataclass(frozen=True)
class LoopDevice:
    """One attached loop device as `losetup --list` reports it."""

    device: str
    backing_file: str
    backing_inode: int
    backing_dev: tuple[int, int] | None
    read_only: bool

    @property
    def backing_deleted(self) -> bool:
        """The backing file was unlinked while attached (the loop keeps it alive)."""
        return self.backing_file.endswith(DELETED_SUFFIX)


def attach(path: str | Path, *, read_only: bool = False) -> str:
    """A new loop device backed by `path`; returns /dev/loopN.

    Buffered I/O (--direct-io=off): the backing file's page cache is what a reflink
    clone and an fsync of the file see."""
    argv = ["losetup", "--find", "--show", "--direct-io=off"]
    if read_only:
        argv.append("--read-only")
    device = run_command([*argv, str(path)], timeout=LOSETUP_TIMEOUT).stdout.strip()
    if not device.startswith("/dev/"):
        raise ManagerError(f"losetup --find --show {path} printed no device: {device!r}")
    return device


def detach(device: str) -> None:
    """Detach `device`; a device that is already gone is fine."""
    try:
        run_command(["losetup", "--detach", device], timeout=LOSETUP_TIMEOUT)
    except CommandFailed as exc:
        if not any(reason in str(exc) for reason in ALREADY_GONE):
            raise


def loop_devices() -> list[LoopDevice]:
    """Every attached loop device, with its backing file's identity."""
    argv = ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO"]
    out = run_command(argv, timeout=LOSETUP_TIMEOUT).stdout
    if not out.strip():
        return []
    return [_loop_device(entry) for entry in json.loads(out).get("loopdevices", [])]


def _loop_device(entry: dict[str, object]) -> LoopDevice:
    majmin = str(entry.get("back-maj:min") or "").strip()
    major, _, minor = majmin.partition(":")
    backing_dev = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None
    inode = entry.get("back-ino")
    return LoopDevice(
        device=str(entry["name"]),
        backing_file=str(entry.get("back-file") or ""),
        backing_inode=int(inode) if isinstance(inode, int) or (isinstance(inode, str) and inode.isdigit()) else 0,
        backing_dev=backing_dev,
        read_only=entry.get("ro") in (True, "1", 1),
    )


def list_loops() -> dict[str, str]:
    """Every attached loop device and its backing file (a deleted file keeps its old path)."""
    return {d.device: d.backing_file.removesuffix(DELETED_SUFFIX) for d in loop_devices()}


def find_backing(path: str | Path) -> list[str]:
    """The loop devices backed by the file at `path` (normally zero or one); [] if it is absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    identity = (os.major(st.st_dev), os.minor(st.st_dev))
    return sorted(d.device for d in loop_devices()
                  if d.backing_inode == st.st_ino and d.backing_dev == identity and not d.backing_deleted)
