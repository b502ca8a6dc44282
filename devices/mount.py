"""Mounting by device path (never by UUID or label: a snapshot shares its origin's), and
reading /proc/self/mountinfo to know what is mounted where.

A mount or unmount that outlives its timeout raises CommandTimeout, a hazard: nothing
here retries it, because a second umount of a device stuck in the kernel only adds a
second stuck process."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.errors import HazardError, ManagerError
from support.proc import run_command

MOUNT_TIMEOUT = 60.0
DEFAULT_OPTIONS = ("nodev", "nosuid")
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, paths unescaped."""

    source: str
    target: str
    fstype: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as a backslash and three octal digits."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Entries of mountinfo: `id parent major:minor root target opts [tags...] - fstype source superopts`."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(" "), right.split(" ")
        if len(fields) < 6 or len(tail) < 2:
            continue
        entries.append(MountEntry(source=_unescape(tail[1]), target=_unescape(fields[4]), fstype=tail[0],
                                  options=tuple(fields[5].split(","))))
    return entries


class _MountTable:
    """This namespace's mount table, parsed again only when the kernel says it changed.

    An open /proc/self/mountinfo polls POLLPRI|POLLERR once after every mount or unmount in
    the namespace (proc(5)): a pool status per snapshot, or one per disk re-activated after a
    reboot, parses the table once between changes instead of every time. A change between
    the poll and the read is read now and polled again next time: never missed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._poll: select.poll | None = None
        self._entries: list[MountEntry] | None = None

    def entries(self) -> list[MountEntry]:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
                self._poll = select.poll()
                self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
            assert self._poll is not None
            if self._entries is None or self._poll.poll(0):
                self._entries = parse_mountinfo(self._read().decode("utf-8", "surrogateescape"))
            return self._entries

    def _read(self) -> bytes:
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)


_TABLE = _MountTable(MOUNTINFO)


def mounts() -> list[MountEntry]:
    """Everything mounted in this process's mount namespace (a list the caller must not change)."""
    return list(_TABLE.entries())


def mount_entry(target: str | Path) -> MountEntry | None:
    """The topmost mount at `target`, or None."""
    resolved = os.path.realpath(target)
    found = [m for m in mounts() if m.target == resolved]
    return found[-1] if found else None


def is_mounted(target: str | Path) -> bool:
    """Whether something is mounted at `target`."""
    return mount_entry(target) is not None


def mount_point_of(device: str) -> str | None:
    """Where `device` is mounted (the first place, if several), or None."""
    resolved = os.path.realpath(device)
    for entry in mounts():
        if entry.source in (device, resolved):
            return entry.target
    return None


def mount(device: str, target: str | Path, *, options: Sequence[str] = DEFAULT_OPTIONS, read_only: bool = False,
          fstype: str = "ext4", timeout: float = MOUNT_TIMEOUT) -> None:
    """Mount the block device at path `device` on `target`. Failure: CommandFailed with mount's stderr."""
    if not device.startswith("/"):
        raise ManagerError(f"refusing to mount {device!r}: mount by device path only (snapshots share UUIDs)")
    opts = ",".join((*options, "ro" if read_only else "rw"))
    run_command(["mount", "-t", fstype, "-o", opts, device, str(target)], timeout=timeout)


def unmount(target: str | Path, *, timeout: float = MOUNT_TIMEOUT) -> None:
    """Unmount `target`; not mounted is fine. A timeout is a hazard and is not retried."""
    if not is_mounted(target):
        return
    run_command(["umount", os.path.realpath(target)], timeout=timeout)


@contextmanager
def mounted(device: str, target: str | Path, *, options: Sequence[str] = DEFAULT_OPTIONS, read_only: bool = False,
            fstype: str = "ext4", timeout: float = MOUNT_TIMEOUT) -> Iterator[Path]:
    """Mount for the body, unmount after, also when the body raised an ordinary error.

    A HazardError from the body leaves the filesystem mounted (fail-dumb: an unmount of a
    device that just failed can hang in D state; gc unmounts it later). An unmount hazard
    propagates (and replaces the body's error, which stays chained)."""
    mount(device, target, options=options, read_only=read_only, fstype=fstype, timeout=timeout)
    try:
        yield Path(target)
    except HazardError:
        raise
    except BaseException:
        unmount(target, timeout=timeout)
        raise
    unmount(target, timeout=timeout)
