"""Mounting by device path (never by UUID: snapshots share their origin's), and reading
/proc/self/mountinfo to know what is mounted where."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.proc import run_command

MOUNT_TIMEOUT = 60.0


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Entries of /proc/self/mountinfo: `id parent major:minor root target opts [tags] - fstype source superopts`."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        entries.append(MountEntry(source=_unescape(tail[1]), target=_unescape(fields[4]), fstype=tail[0],
                                  options=tuple(fields[5].split(","))))
    return entries


def mounts() -> list[MountEntry]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def is_mounted(target: Path) -> bool:
    resolved = os.path.realpath(target)
    return any(m.target == resolved for m in mounts())


def mount_point_of(device: str) -> str | None:
    for entry in mounts():
        if entry.source == device:
            return entry.target
    return None


def mount(device: str, target: Path, *, options: tuple[str, ...] = ("nodev", "nosuid"), read_only: bool = False,
          fstype: str = "ext4", timeout: float = MOUNT_TIMEOUT) -> None:
    opts = ",".join((*options, "ro" if read_only else "rw"))
    run_command(["mount", "-t", fstype, "-o", opts, device, str(target)], timeout=timeout)


def unmount(target: Path, *, timeout: float = MOUNT_TIMEOUT) -> None:
    """Unmount `target`; not mounted is fine. A timeout is a hazard and is not retried."""
    if not is_mounted(target):
        return
    run_command(["umount", str(target)], timeout=timeout)


@contextmanager
def mounted(device: str, target: Path, **kwargs: object) -> Iterator[Path]:
    """Mount for the body, unmount after (an unmount hazard propagates; nothing retries it)."""
    mount(device, target, **kwargs)  # type: ignore[arg-type]
    try:
        yield target
    finally:
        unmount(target)
