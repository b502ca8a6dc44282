"""The safe layer unpacker: applies one untrusted tar layer onto a root directory.

`tarfile` only parses the stream (mode "r|": one pass, nothing held in memory); every
filesystem operation is done here, relative to directory file descriptors opened with
O_NOFOLLOW, so no path can resolve outside the root (Python 3.11.7 predates the 2025
tarfile filter bypasses, so its extract functions are never used). Policy, in short
(docs/unpacker.md has it all):

* absolute paths, `..` components, NUL bytes, over-long names: the layer is rejected;
* a path whose parent component is a symlink is rejected (defeats symlink-then-write);
* symlinks are created verbatim (absolute targets are contents, resolved inside the VM);
* hardlinks only to regular files already under the root, found without following links;
* OCI whiteouts `.wh.<name>` remove lower-layer entries; `.wh..wh..opq` hides the lower
  contents of its directory wherever it appears in the tar; a later duplicate wins;
* char/block device nodes are skipped and counted; fifos are created; sockets skipped;
* owners, modes (setuid included, applied after chown), xattrs, mtimes kept; directory
  mtimes are set last.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from images.formats import DEFAULT_LIMITS, Limits
from images.verify import TarStreamGuard
from support.errors import PermanentError
from support.log import get_logger

log = get_logger("images.unpack", component="unpacker")

CHUNK = 1 << 20
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_NAME_BYTES = 255
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
XATTR_PREFIX = "SCHILY.xattr."
ALLOWED_XATTR = ("user.", "trusted.", "security.capability")


class UnsafeArchive(PermanentError):
    """The layer tried something this unpacker refuses; names the entry and the reason."""


@dataclass
class UnpackStats:
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def normalize(name: str, limits: Limits) -> str:
    """The entry's path relative to the root ("" for the root itself), or UnsafeArchive."""
    if "\0" in name:
        raise UnsafeArchive(f"entry {name!r}: NUL byte in name")
    if len(name.encode(errors="surrogateescape")) > limits.max_path_bytes:
        raise UnsafeArchive(f"entry {name[:64]!r}...: path longer than {limits.max_path_bytes} bytes")
    if name.startswith("/"):
        raise UnsafeArchive(f"entry {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise UnsafeArchive(f"entry {name!r}: '..' component")
        if len(part.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
            raise UnsafeArchive(f"entry {name[:64]!r}: component longer than {MAX_NAME_BYTES} bytes")
    return "/".join(parts)


class _Layer:
    """The state of one unpack: the root fd, what this layer wrote, dirs to finish."""

    def __init__(self, root: Path, limits: Limits) -> None:
        self.root_fd = os.open(root, DIR_FLAGS)
        self.limits = limits
        self.stats = UnpackStats()
        self.written: set[str] = set()  # paths this layer created (and their ancestors)
        self.opaque: set[str] = set()
        self.dir_times: dict[str, tuple[float, float]] = {}
        self.is_root = os.geteuid() == 0

    def close(self) -> None:
        os.close(self.root_fd)

    # -- walking without following links ----------------------------------------------

    def open_dir(self, rel: str, *, create: bool, entry: str) -> int:
        """An fd of directory `rel` under the root; missing parents made 0755 when `create`."""
        fd = os.dup(self.root_fd)
        walked: list[str] = []
        for part in [p for p in rel.split("/") if p]:
            walked.append(part)
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                self.mark_written("/".join(walked))
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeArchive(f"entry {entry!r}: parent {'/'.join(walked)!r} is a symlink or not a directory") from None
                raise
            os.close(fd)
            fd = child
        return fd

    def mark_written(self, rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            self.written.add("/".join(parts[:i]))

    # -- removing (whiteouts, replacements) without following links ---------------------

    def remove(self, parent_fd: int, name: str) -> None:
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            try:
                for child in os.listdir(fd):
                    self.remove(fd, child)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)

    def prune_lower(self, dir_fd: int, rel: str) -> None:
        """Hide the lower contents of `rel`: remove what this layer did not write."""
        for child in os.listdir(dir_fd):
            path = f"{rel}/{child}" if rel else child
            if path not in self.written:
                self.remove(dir_fd, child)
                continue
            if stat.S_ISDIR(os.lstat(child, dir_fd=dir_fd).st_mode):
                sub = os.open(child, DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self.prune_lower(sub, path)
                finally:
                    os.close(sub)

    # -- entries ------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = normalize(member.name, self.limits)
        if rel == "":
            if member.isdir():
                self.set_metadata(self.root_fd, None, member)
                self.dir_times[""] = (member.mtime, member.mtime)
            return
        parent_rel, _, leaf = rel.rpartition("/")
        if leaf.startswith(WHITEOUT):
            self.whiteout(parent_rel, leaf, rel)
            return
        parent_fd = self.open_dir(parent_rel, create=True, entry=member.name)
        try:
            self.create(tar, member, parent_fd, leaf, rel)
        finally:
            os.close(parent_fd)

    def whiteout(self, parent_rel: str, leaf: str, rel: str) -> None:
        self.stats.whiteouts += 1
        if leaf == OPAQUE:
            self.opaque.add(parent_rel)
            return
        target = leaf[len(WHITEOUT):]
        if target in ("", ".", "..") or target.startswith(WHITEOUT):
            raise UnsafeArchive(f"entry {rel!r}: invalid whiteout")
        victim = f"{parent_rel}/{target}" if parent_rel else target
        if victim in self.written:
            return  # a whiteout hides lower layers only
        try:
            parent_fd = self.open_dir(parent_rel, create=False, entry=rel)
        except FileNotFoundError:
            return
        try:
            self.remove(parent_fd, target)
        finally:
            os.close(parent_fd)

    def create(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, leaf: str, rel: str) -> None:
        try:
            existing = os.lstat(leaf, dir_fd=parent_fd)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self.remove(parent_fd, leaf)
                existing = None
            if existing is None:
                os.mkdir(leaf, 0o700, dir_fd=parent_fd)
            fd = os.open(leaf, DIR_FLAGS, dir_fd=parent_fd)
            try:
                self.set_metadata(fd, None, member)
            finally:
                os.close(fd)
            self.dir_times[rel] = (member.mtime, member.mtime)
            self.stats.dirs += 1
            self.mark_written(rel)
            return
        if member.ischr() or member.isblk():
            self.stats.skip("device node")
            log.warning("skipping device node", entry=rel)
            return
        if not (member.isreg() or member.issym() or member.islnk() or member.isfifo()):
            self.stats.skip(f"tar type {member.type!r}")
            return
        if existing is not None:
            self.remove(parent_fd, leaf)  # a later duplicate, or a non-dir replacing anything
        if member.isreg():
            self.write_file(tar, member, parent_fd, leaf)
        elif member.issym():
            if len(member.linkname.encode(errors="surrogateescape")) > self.limits.max_path_bytes:
                raise UnsafeArchive(f"entry {rel!r}: symlink target too long")
            if "\0" in member.linkname:
                raise UnsafeArchive(f"entry {rel!r}: NUL byte in symlink target")
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            self.set_metadata(None, (parent_fd, leaf), member)
            self.stats.symlinks += 1
        elif member.islnk():
            self.hardlink(member, parent_fd, leaf, rel)
        else:
            os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            self.set_metadata(None, (parent_fd, leaf), member)
        self.mark_written(rel)

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, leaf: str) -> None:
        if member.size > self.limits.max_entry_bytes:
            raise UnsafeArchive(f"entry {member.name!r}: {member.size} bytes is over the limit")
        if self.stats.bytes_written + member.size > self.limits.max_uncompressed_bytes:
            raise UnsafeArchive(f"layer writes more than {self.limits.max_uncompressed_bytes} bytes")
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent_fd)
        try:
            source = tar.extractfile(member)
            assert source is not None
            remaining = member.size
            while remaining:
                chunk = source.read(min(CHUNK, remaining))
                if not chunk:
                    raise UnsafeArchive(f"truncated or corrupt tar: {member.name!r} ends early")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                remaining -= len(chunk)
            self.stats.bytes_written += member.size
            self.set_metadata(fd, None, member)
        finally:
            os.close(fd)
        self.stats.files += 1

    def hardlink(self, member: tarfile.TarInfo, parent_fd: int, leaf: str, rel: str) -> None:
        target = normalize(member.linkname, self.limits)
        if not target:
            raise UnsafeArchive(f"entry {rel!r}: hardlink to the root")
        target_parent, _, target_leaf = target.rpartition("/")
        try:
            src_fd = self.open_dir(target_parent, create=False, entry=rel)
        except FileNotFoundError:
            raise UnsafeArchive(f"entry {rel!r}: hardlink target {target!r} does not exist") from None
        try:
            try:
                st = os.lstat(target_leaf, dir_fd=src_fd)
            except FileNotFoundError:
                raise UnsafeArchive(f"entry {rel!r}: hardlink target {target!r} does not exist") from None
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeArchive(f"entry {rel!r}: hardlink target {target!r} is not a regular file")
            os.link(target_leaf, leaf, src_dir_fd=src_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(src_fd)
        self.stats.hardlinks += 1

    def set_metadata(self, fd: int | None, at: tuple[int, str] | None, member: tarfile.TarInfo) -> None:
        """Owner, then mode (chown clears setuid), xattrs, mtime; symlinks never followed."""
        is_link = member.issym()
        if self.is_root:
            if fd is not None:
                os.fchown(fd, member.uid, member.gid)
            elif at is not None:
                os.chown(at[1], member.uid, member.gid, dir_fd=at[0], follow_symlinks=False)
        if not is_link:
            mode = member.mode & 0o7777
            if fd is not None:
                os.fchmod(fd, mode)
            elif at is not None:
                os.chmod(at[1], mode, dir_fd=at[0], follow_symlinks=False)
        if fd is not None:
            for key, value in member.pax_headers.items():
                if key.startswith(XATTR_PREFIX):
                    self.set_xattr(fd, key[len(XATTR_PREFIX):], value, member.name)
            if not member.isdir():
                os.utime(fd, (member.mtime, member.mtime))
        elif at is not None:
            os.utime(at[1], (member.mtime, member.mtime), dir_fd=at[0], follow_symlinks=False)

    def set_xattr(self, fd: int, name: str, value: str, entry: str) -> None:
        if not name.startswith(ALLOWED_XATTR):
            self.stats.skip(f"xattr {name.split('.')[0]}")
            return
        try:
            os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))
        except OSError as exc:
            self.stats.skip(f"xattr {name}: {exc.strerror}")

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        for rel in sorted(self.opaque):
            try:
                fd = self.open_dir(rel, create=False, entry=f"{rel}/{OPAQUE}")
            except FileNotFoundError:
                continue
            try:
                self.prune_lower(fd, rel)
            finally:
                os.close(fd)
        for rel in sorted(self.dir_times, key=lambda p: p.count("/"), reverse=True):
            try:
                fd = self.open_dir(rel, create=False, entry=rel)
            except (FileNotFoundError, UnsafeArchive):
                continue  # replaced by something else later in the layer
            try:
                os.utime(fd, self.dir_times[rel])
            finally:
                os.close(fd)


def unpack_layer(tar_stream: BinaryIO, root: Path, *, limits: Limits = DEFAULT_LIMITS,
                 on_progress: Callable[[int], None] | None = None) -> UnpackStats:
    """Apply the (decompressed) tar stream onto `root`; UnsafeArchive on anything refused.

    On error nothing outside `root` has been touched; what is inside is not to be trusted
    (the caller throws the filesystem away)."""
    started = time.monotonic()
    layer = _Layer(root, limits)
    guarded = TarStreamGuard(tar_stream, limits)
    try:
        with tarfile.open(fileobj=guarded, mode="r|") as tar:  # type: ignore[arg-type]
            for member in tar:
                layer.stats.entries += 1
                if layer.stats.entries > limits.max_entries:
                    raise UnsafeArchive(f"too many entries: more than {limits.max_entries}")
                if member.issparse():
                    raise UnsafeArchive(f"entry {member.name!r}: GNU sparse files are not supported")
                layer.apply(tar, member)
                if on_progress is not None:
                    on_progress(guarded.position)
        if not guarded.saw_end:
            raise UnsafeArchive("truncated or corrupt tar: no end-of-archive marker")
        layer.finish()
    except (tarfile.TarError, EOFError) as exc:
        raise UnsafeArchive(f"truncated or corrupt tar: {exc}") from None
    finally:
        layer.close()
    layer.stats.seconds = time.monotonic() - started
    return layer.stats
