"""Loop devices: attach, detach, find which loop backs a file.

Attach and detach are the kernel's own calls (LOOP_CTL_GET_FREE, LOOP_CONFIGURE,
LOOP_CLR_FD: what losetup makes), made in-process on a thread with a deadline: a call
stuck in the kernel is a hazard (CommandTimeout), never something to wait out, and a VM's
disk costs no process start. `losetup --list` is still how every loop is listed. A file is
matched to its loops by inode and device number (LOOP_GET_STATUS64), never by path text,
so renames, symlinks and odd characters in paths cannot confuse it.

This module is the one that runs losetup (`--list`, and `-c` after a backing file grew);
its error output is mapped once, in LOSETUP_ERRORS, to the errno ToolFailed carries.

`LoopIndex` is what a backend keeps so that finding the loop of one device file is two
small reads and one ioctl, not a listing of every loop device on the host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from support.errors import ManagerError
from support.proc import CommandTimeout, ErrorTable

T = TypeVar("T")

LOSETUP_TIMEOUT = 30.0
DELETED_SUFFIX = " (deleted)"
# losetup prints the errno of the call that failed as its strerror text:
#   losetup: /dev/loop8: set capacity failed: No such device or address
LOSETUP_ERRORS = ErrorTable((
    ("No such device or address", errno.ENXIO),   # the loop device is not bound
    ("No such device", errno.ENODEV),             # the path is not a loop device, or no such node
))


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


LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_READ_ONLY = 1
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64 each),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32 each), file name, crypt
# name (64 bytes each), key (32 bytes), lo_init[2] (u64).
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s8Q")  # fd, block_size, info, reserved
BUSY_ATTEMPTS = 16  # another process took the free loop between GET_FREE and CONFIGURE


def attach(path: str | Path, *, read_only: bool = False, timeout: float = LOSETUP_TIMEOUT) -> str:
    """A new loop device backed by `path`; returns /dev/loopN.

    Buffered I/O (no LO_FLAGS_DIRECT_IO): the backing file's page cache is what a reflink
    clone and an fsync of the file see."""
    def configure() -> str:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        backing = os.open(path, flags | os.O_CLOEXEC)
        try:
            for _ in range(BUSY_ATTEMPTS):
                control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
                try:
                    number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                finally:
                    os.close(control)
                device = f"/dev/loop{number}"
                loop_fd = os.open(device, flags | os.O_CLOEXEC)
                try:
                    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY if read_only else 0,
                                            str(path).encode()[:63], b"", b"", 0, 0)
                    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, LOOP_CONFIG.pack(backing, 0, info, *([0] * 8)))
                    return device
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                finally:
                    os.close(loop_fd)
            raise ManagerError(f"no free loop device for {path}: {BUSY_ATTEMPTS} were taken before we could bind one")
        finally:
            os.close(backing)

    try:
        return in_kernel(configure, timeout, f"attach a loop device to {path}")
    except OSError as exc:
        raise ManagerError(f"cannot attach a loop device to {path}: {exc.strerror or exc}") from None


def detach(device: str, *, timeout: float = LOSETUP_TIMEOUT) -> None:
    """Detach `device`; a device that is already gone (unbound, or its node removed) is fine.
    A device still open elsewhere is detached when its last user closes it (as losetup -d)."""
    def clear() -> None:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # not bound: already gone
                raise
        finally:
            os.close(fd)

    try:
        in_kernel(clear, timeout, f"detach {device}")
    except OSError as exc:
        raise ManagerError(f"cannot detach {device}: {exc.strerror or exc}") from None


def backing_identity(device: str) -> tuple[int, int, int] | None:
    """(major, minor, inode) of the file bound to loop `device`, or None when it is unbound
    or gone (LOOP_GET_STATUS64: one ioctl, no listing)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:
        return None
    finally:
        os.close(fd)
    encoded, inode = LOOP_INFO64.unpack(raw)[:2]
    # The kernel's new_encode_dev(): 12-bit major above an 8-bit minor, the minor's high bits on top.
    return (encoded >> 8) & 0xFFF, (encoded & 0xFF) | ((encoded >> 12) & 0xFFF00), inode


def backs(device: str, st: os.stat_result) -> bool:
    """Whether loop `device` is bound to the file whose stat is `st`."""
    return backing_identity(device) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)


def in_kernel(call: Callable[[], T], timeout: float, what: str) -> T:
    """Run a kernel call on a thread with a deadline: past it, CommandTimeout (the thread
    is left to the kernel, as a subprocess stuck in D state would be)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (carried to the caller's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="loop-ioctl", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CommandTimeout([what], timeout, "")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def loop_devices() -> list[LoopDevice]:
    """Every attached loop device, with its backing file's identity."""
    argv = ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO"]
    out = LOSETUP_ERRORS.run(argv, timeout=LOSETUP_TIMEOUT).stdout
    if not out.strip():
        return []
    return [_loop_device(entry) for entry in json.loads(out).get("loopdevices", [])]


def refresh_capacity(device: str, *, timeout: float = LOSETUP_TIMEOUT) -> None:
    """`losetup -c`: loop `device` takes its backing file's new size."""
    LOSETUP_ERRORS.run(["losetup", "-c", device], timeout=timeout)


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


class LoopIndex:
    """Which loop device backs each device file of one pool, kept in `directory`: a file
    per device (`<key>`, holding `/dev/loopN`), written when the backend attaches and
    removed when it detaches, and checked against the kernel (LOOP_GET_STATUS64) on every
    read, so a stale entry is never believed. An attach writes its intent first; an entry
    still saying so (a crash in between) is settled by one full listing. A `boot_id` file
    ties the index to this boot: after a reboot (or on a host that had no index) it is
    rebuilt from one `losetup --list`, so a loop bound before is always found."""

    ATTACHING = "attaching"

    def __init__(self, directory: Path, files: Callable[[], dict[str, Path]]) -> None:
        """`files()`: the pool's device files by key (for a rebuild)."""
        self.directory = directory
        self.files = files
        self._boot_checked = False
        self._boot_lock = threading.Lock()  # one rebuild, however many threads ask first

    def lookup(self, key: str, path: Path) -> list[str]:
        """The loop devices backing `path` (normally zero or one)."""
        self.check_boot()
        entry = self._read(key)
        if entry is None:
            return []
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        if entry != self.ATTACHING and backs(entry, st):
            return [entry]
        found = find_backing(path) if entry == self.ATTACHING else []
        self._write(key, found[0]) if found else self.forget(key)
        return found

    def attaching(self, key: str) -> None:
        self.check_boot()
        self._write(key, self.ATTACHING)

    def attached(self, key: str, device: str) -> None:
        self._write(key, device)

    def forget(self, key: str) -> None:
        (self.directory / key).unlink(missing_ok=True)

    def check_boot(self) -> None:
        """Rebuild the index if it was written before this boot (once per process)."""
        if self._boot_checked:
            return
        with self._boot_lock:
            if not self._boot_checked:
                self._check_boot_once()

    def _check_boot_once(self) -> None:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        marker = self.directory / "boot_id"
        try:
            known = marker.read_text().strip()
        except FileNotFoundError:
            known = None
        if known != boot:
            self._rebuild()
            marker.write_text(boot + "\n")
        self._boot_checked = True

    def _rebuild(self) -> None:
        """Every entry from one listing of the host's loop devices."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.iterdir():
            stale.unlink()
        by_identity: dict[tuple[int, tuple[int, int] | None], str] = {}
        for device in loop_devices():
            if not device.backing_deleted:
                by_identity.setdefault((device.backing_inode, device.backing_dev), device.device)
        for key, path in self.files().items():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            device = by_identity.get((st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))))
            if device is not None:
                self._write(key, device)

    def _read(self, key: str) -> str | None:
        try:
            return (self.directory / key).read_text().strip() or None
        except FileNotFoundError:
            return None

    def _write(self, key: str, value: str) -> None:
        # No fsync: the index is checked against the kernel on every read, and a reboot
        # (the only way to lose it) empties the kernel's side too.
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{key}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(value + "\n")
        os.replace(tmp, self.directory / key)
