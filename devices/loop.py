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
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from support.errors import ManagerError
from support.proc import CommandTimeout, ErrorTable

T = TypeVar("T")

LOSETUP_TIMEOUT = 30.0
MAX_RECORDS = 2**24 - 1  # the loop index's device ids: dm-thin's 24 bits, as the backends use
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


class _KernelCaller:
    """A daemon thread that makes kernel calls handed to it, one at a time. Starting a
    thread per call cost more than the call (0.15 ms against LOOP_CONFIGURE's 0.07 here),
    so callers are kept; one whose call overran its deadline is left to the kernel and
    never handed another call."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], _Outcome]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="loop-ioctl", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, outcome = self._calls.get()
            try:
                outcome.value = call()
            except BaseException as exc:  # noqa: BLE001 (carried to the caller's thread)
                outcome.error = exc
            outcome.done.set()

    def make(self, call: Callable[[], object], timeout: float) -> _Outcome:
        """Hand `call` over; the outcome, whose `done` is unset if the deadline passed first."""
        outcome = _Outcome()
        self._calls.put((call, outcome))
        outcome.done.wait(timeout)
        return outcome


@dataclass
class _Outcome:
    done: threading.Event = field(default_factory=threading.Event)
    value: object = None
    error: BaseException | None = None


_idle_callers: list[_KernelCaller] = []
_idle_lock = threading.Lock()


def _forget_callers() -> None:
    """In a forked child: none of the callers' threads exist there, and the lock may have
    been held by a thread that does not either."""
    global _idle_lock
    _idle_callers.clear()
    _idle_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_callers)


def in_kernel(call: Callable[[], T], timeout: float, what: str) -> T:
    """Run a kernel call on another thread with a deadline: past it, CommandTimeout (the
    thread is left to the kernel, as a subprocess stuck in D state would be)."""
    with _idle_lock:
        caller = _idle_callers.pop() if _idle_callers else None
    caller = caller or _KernelCaller()
    outcome = caller.make(call, timeout)
    if not outcome.done.is_set():
        raise CommandTimeout([what], timeout, "")
    with _idle_lock:
        _idle_callers.append(caller)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]


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
    """Which loop device backs each device file of one pool, kept in `directory/slots`: one
    sparse file with a fixed-width record per device id (`loopN`, or `attaching`), written
    in place when the backend attaches and zeroed when it detaches, and checked against the
    kernel (LOOP_GET_STATUS64) on every read, so a stale record is never believed. An
    attach writes its intent first; a record still saying so (a crash in between) is
    settled by one full listing, and so is one that does not parse (a read that overlapped
    a write). A `boot_id` file ties the index to this boot: after a reboot (or on a host
    that had no index) it is rebuilt from one `losetup --list`, so a loop bound before is
    always found.

    Records, not a file per device: creating a file costs an inode, 0.02-0.4 ms on this
    host's ext4 depending on its state, twice per attach; a record costs one pwrite."""

    ATTACHING = "attaching"
    RECORD = 16  # bytes: "loop1048575" fits with room; a power of two, so no record spans a page
    SLOTS = "slots"

    def __init__(self, directory: Path, files: Callable[[], dict[int, Path]]) -> None:
        """`files()`: the pool's device files by device id (for a rebuild)."""
        self.directory = directory
        self.slots = directory / self.SLOTS
        self.files = files
        self._boot_checked = False
        self._boot_lock = threading.Lock()  # one rebuild, however many threads ask first

    def lookup(self, device_id: int, path: Path) -> list[str]:
        """The loop devices backing `path` (normally zero or one)."""
        self.check_boot()
        entry = self._read(device_id)
        if entry is None:
            return []
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        if entry != self.ATTACHING and backs(entry, st):
            return [entry]
        found = find_backing(path) if entry == self.ATTACHING else []
        self._write(device_id, found[0]) if found else self.forget(device_id)
        return found

    def attaching(self, device_id: int) -> None:
        self.check_boot()
        self._write(device_id, self.ATTACHING)

    def attached(self, device_id: int, device: str) -> None:
        self._write(device_id, device)

    def forget(self, device_id: int) -> None:
        self._pwrite(device_id, bytes(self.RECORD))

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
        if known != boot or not self.slots.exists():  # no slots: an index of an older layout
            self._rebuild()
            marker.write_text(boot + "\n")
        self._boot_checked = True

    def _rebuild(self) -> None:
        """Every record from one listing of the host's loop devices."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.iterdir():
            if stale.name != self.SLOTS:
                stale.unlink()
        # Emptied in place, not replaced: a reader holding the file sees the same inode.
        fd = os.open(self.slots, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        by_identity: dict[tuple[int, tuple[int, int] | None], str] = {}
        for device in loop_devices():
            if not device.backing_deleted:
                by_identity.setdefault((device.backing_inode, device.backing_dev), device.device)
        for device_id, path in self.files().items():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            device = by_identity.get((st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))))
            if device is not None:
                self._write(device_id, device)

    def _read(self, device_id: int) -> str | None:
        """The record's device (`/dev/loopN`), ATTACHING, or None when empty."""
        try:
            fd = os.open(self.slots, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            raw = os.pread(fd, self.RECORD, device_id * self.RECORD)
        finally:
            os.close(fd)
        text = raw.rstrip(b"\0\n ").decode("ascii", "replace")
        if not text:
            return None
        if text.startswith("loop") and text[4:].isdigit():
            return f"/dev/{text}"
        return self.ATTACHING  # the intent, or a record read while it was being written

    def _write(self, device_id: int, value: str) -> None:
        record = value.removeprefix("/dev/").encode()
        if len(record) >= self.RECORD:
            raise ManagerError(f"loop index: {value!r} does not fit a record")
        self._pwrite(device_id, record.ljust(self.RECORD - 1) + b"\n")

    def _pwrite(self, device_id: int, record: bytes) -> None:
        # No fsync: the index is checked against the kernel on every read, and a reboot
        # (the only way to lose it) empties the kernel's side too.
        if not 0 <= device_id <= MAX_RECORDS:
            raise ManagerError(f"loop index: device id {device_id} is out of range")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.slots, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, record, device_id * self.RECORD)
        finally:
            os.close(fd)
