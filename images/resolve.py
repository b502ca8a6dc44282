"""Resolving a layer's paths inside the root, as the kernel would inside the VM.

    resolver = open_resolver(root_fd)                    # openat2, or the fd-relative walk
    found = resolver.open_dir(("bin",), create=True)
    found.fd, found.parts, found.created                 # an O_DIRECTORY fd, its canonical path

Every component of the path is followed when it is a symlink, but every step stays inside
the root: an absolute target restarts at the root, `..` at the root stays there, and after
MAX_HOPS symlinks resolution fails with ELOOP. This is openat2(2) with `RESOLVE_IN_ROOT |
RESOLVE_NO_MAGICLINKS` (Linux >= 5.6); `WalkResolver` does the same one component at a
time with `O_NOFOLLOW` opens, for kernels without openat2 (and, forced by
`FLYIO_UNPACK_RESOLVER=walk`, in tests). Only directories are resolved here: the unpacker
never follows an entry's own leaf, it works on it by name relative to the parent's fd.

Resolution is physical, like the kernel's: `..` in a symlink's target is the parent of the
directory reached so far, and a component that does not exist stops resolution (ENOENT)
unless `create` makes it. containerd's `fs.RootPath` cleans symlink targets lexically
instead; docs/unpacker.md says where that differs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from dataclasses import dataclass, field
from typing import Protocol

RESOLVER_ENV = "FLYIO_UNPACK_RESOLVER"  # "openat2", "walk", or unset/"auto"
MAX_HOPS = 40  # the kernel's MAXSYMLINKS: the 41st symlink of one resolution is ELOOP
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # openat2 follows the last component too

# <linux/openat2.h>; the syscall number is 437 on every architecture that has it.
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
BENEATH_NO_LINKS = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
EAGAIN_RETRIES = 3  # RESOLVE_IN_ROOT returns EAGAIN when a rename raced a ".."; nothing renames here
GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV)


@dataclass
class Resolved:
    """An open directory (close it), its path from the root without symlinks, and the
    directories that resolving it created (canonical paths, outermost first)."""

    fd: int
    parts: tuple[str, ...]
    created: list[tuple[str, ...]] = field(default_factory=list)


class Resolver(Protocol):
    name: str

    def open_dir(self, parts: tuple[str, ...], *, create: bool) -> Resolved:
        """The directory `parts` names, every symlink on the way followed inside the root.
        OSError: ENOENT (missing and not `create`), ENOTDIR, ELOOP (over MAX_HOPS)."""
        ...

    def open_exact(self, parts: tuple[str, ...]) -> int | None:
        """The directory at exactly `parts` (a canonical path), following no symlink at
        all; None when it is gone, or is now a symlink or not a directory."""
        ...


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """The raw openat2(2) (Python has no wrapper); OSError as os.open raises it."""
    number = SYS_OPENAT2.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, "openat2: unknown syscall number on this architecture")
    how = _OpenHow(flags, 0, resolve)
    encoded = os.fsencode(path)
    fd = _libc.syscall(ctypes.c_long(number), ctypes.c_int(dir_fd), ctypes.c_char_p(encoded), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def openat2_works() -> bool:
    """Whether this kernel (and seccomp policy) lets us use openat2 with RESOLVE_IN_ROOT."""
    top = os.open("/", DIR_FLAGS)
    try:
        os.close(openat2(top, ".", OPEN_DIR, IN_ROOT))
    except OSError:
        return False
    finally:
        os.close(top)
    return True


def _join(parts: tuple[str, ...]) -> str:
    return "/".join(parts) if parts else "."


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class WalkResolver:
    """RESOLVE_IN_ROOT by hand: one component at a time, each opened with O_NOFOLLOW and
    each symlink read and expanded here, one directory fd open at a time."""

    name = "walk"

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd

    def open_dir(self, parts: tuple[str, ...], *, create: bool) -> Resolved:
        root_fd = self.root_fd
        fd = os.dup(root_fd)
        names: list[str] = []  # the canonical path of fd
        created: list[tuple[str, ...]] = []
        pending = list(reversed(parts))
        hops = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if names:  # the physical parent of a directory we walked into: never a link
                        fd = _replace_fd(fd, os.open("..", DIR_FLAGS, dir_fd=fd))
                        names.pop()
                    continue
                mode = self._mode_or_create(fd, name, create, names, created)
                if stat.S_ISLNK(mode):
                    hops += 1
                    if hops > MAX_HOPS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
                    target = os.readlink(name, dir_fd=fd)
                    if not target:
                        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)
                    if target.startswith("/"):
                        fd, names = _replace_fd(fd, os.dup(root_fd)), []
                    pending.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
                fd = _replace_fd(fd, os.open(name, DIR_FLAGS, dir_fd=fd))
                names.append(name)
        except BaseException:
            os.close(fd)
            raise
        return Resolved(fd, tuple(names), created)

    @staticmethod
    def _mode_or_create(fd: int, name: str, create: bool, names: list[str],
                        created: list[tuple[str, ...]]) -> int:
        try:
            return os.lstat(name, dir_fd=fd).st_mode
        except FileNotFoundError:
            if not create:
                raise
        os.mkdir(name, 0o755, dir_fd=fd)
        created.append((*names, name))
        return os.lstat(name, dir_fd=fd).st_mode

    def open_exact(self, parts: tuple[str, ...]) -> int | None:
        fd = os.dup(self.root_fd)
        for part in parts:
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in GONE:
                    return None
                raise
            fd = _replace_fd(fd, child)
        return fd


def _replace_fd(old: int, new: int) -> int:
    os.close(old)
    return new


class Openat2Resolver:
    """One openat2(RESOLVE_IN_ROOT) per directory; a missing component is made by the walk
    (it knows which components it creates, the kernel does not say where it stopped)."""

    name = "openat2"

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._walk = WalkResolver(root_fd)
        self._root = _fd_path(root_fd)
        self._prefix = self._root.rstrip("/") + "/"

    def open_dir(self, parts: tuple[str, ...], *, create: bool) -> Resolved:
        if not parts:
            return Resolved(os.dup(self.root_fd), ())
        for _ in range(EAGAIN_RETRIES):
            try:
                fd = openat2(self.root_fd, _join(parts), OPEN_DIR, IN_ROOT)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                if exc.errno == errno.ENOENT and create:
                    return self._walk.open_dir(parts, create=True)
                raise
            try:
                return Resolved(fd, self._canonical(fd))
            except BaseException:
                os.close(fd)
                raise
        return self._walk.open_dir(parts, create=create)

    def _canonical(self, fd: int) -> tuple[str, ...]:
        """The path of `fd` below the root, from the kernel's own record of it (/proc/self/fd)."""
        path = _fd_path(fd)
        if path == self._root:
            return ()
        if not path.startswith(self._prefix):
            # RESOLVE_IN_ROOT cannot leave the root; a path elsewhere means we cannot trust it.
            raise OSError(errno.EXDEV, f"resolved outside the root: {path!r}")
        return tuple(path[len(self._prefix):].split("/"))

    def open_exact(self, parts: tuple[str, ...]) -> int | None:
        if not parts:
            return os.dup(self.root_fd)
        try:
            return openat2(self.root_fd, _join(parts), OPEN_DIR, BENEATH_NO_LINKS)
        except OSError as exc:
            if exc.errno in GONE:
                return None
            if exc.errno == errno.EAGAIN:
                return self._walk.open_exact(parts)
            raise


def resolver_name(preference: str | None = None) -> str:
    """Which resolver `preference` (or $FLYIO_UNPACK_RESOLVER) picks: by default openat2
    where the kernel has it, else the walk. Asking for openat2 where it is missing is an error."""
    wanted = (preference if preference is not None else os.environ.get(RESOLVER_ENV, "")) or "auto"
    if wanted == "auto":
        return "openat2" if _OPENAT2_WORKS else "walk"
    if wanted not in ("openat2", "walk"):
        raise ValueError(f"{RESOLVER_ENV}={wanted!r}: expected openat2, walk or auto")
    if wanted == "openat2" and not _OPENAT2_WORKS:
        raise RuntimeError("openat2 with RESOLVE_IN_ROOT is not available on this kernel")
    return wanted


def open_resolver(root_fd: int, preference: str | None = None) -> Resolver:
    """A resolver bound to `root_fd` (which must stay open while it is used)."""
    return Openat2Resolver(root_fd) if resolver_name(preference) == "openat2" else WalkResolver(root_fd)


_OPENAT2_WORKS = openat2_works()
