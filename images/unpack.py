"""The safe layer unpacker: applies one untrusted tar layer onto a root directory.

    stats = unpack_layer(tar_stream, Path("/mnt/layer"), limits=UnpackLimits())

images/tardecoder.py parses the stream (one pass, nothing held in memory; the same decoder
the download-time check ran over these bytes, so both read every header the same way; no
tarfile extract function is ever used). Every filesystem operation is done here, relative to directory file descriptors
that images/resolve.py resolved *inside the root* (openat2 RESOLVE_IN_ROOT, or the same
walk by hand), so no path can resolve outside it. Policy, in short (docs/unpacker.md has
it all):

* names are root-relative: a leading `/` and `..` components are clamped at the root,
  lexically, as containerd does; NUL bytes and over-long names reject the layer;
* symlinks in an entry's parent directories are followed inside the root (a lower layer's
  `bin -> usr/bin` or `lib -> /usr/lib`); an entry's own leaf is never followed;
* symlinks are created verbatim (absolute targets are contents, resolved inside the VM);
* hardlinks to anything but a directory already under the root (a symlink is linked
  itself, never what it points to), the target's parents resolved inside the root;
* OCI whiteouts `.wh.<name>` remove lower-layer entries; `.wh..wh..opq` hides the lower
  contents of its directory wherever it appears in the tar; a later duplicate wins;
* char/block device nodes and fifos are made with mknod, as containerd does (the unpack
  mount is nodev on the host); FLYIO_UNPACK_DEVICES=skip skips and counts device nodes;
* sparse members are written segment by segment, their holes kept;
* owners, modes (setuid included, applied after chown), xattrs (user.*, trusted.* but
  not trusted.overlay.*, security.capability), mtimes kept; directory modes and mtimes
  are set last.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from images.formats import Limits
from images.resolve import DIR_FLAGS, MAX_HOPS, Resolved, open_resolver, resolver_name
from images.tardecoder import Member, TarCorrupt, TarLimits, TarReader, TarRefused
from images.writers import WriteFailed, WriterPool, pwrite_all
from support.errors import ManagerError, PermanentError
from support.log import get_logger

log = get_logger("images.unpack", component="unpacker")

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
ALLOWED_XATTRS = ("user.", "trusted.", "security.capability")
REFUSED_XATTRS = ("trusted.overlay.",)  # overlayfs internals would change how the tree reads
MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown: never a real owner
# ext4 (256-byte inodes) stores seconds from 1901-12-13 to 2446-05-10; clamp to that.
MIN_TIME = -(2**31)
MAX_TIME = 15_032_385_535
MIN_TIME_NS, MAX_TIME_NS = MIN_TIME * 10**9, MAX_TIME * 10**9
# Char/block device nodes: "create" (mknod, as containerd does; the unpack mount is nodev on
# the host, so only the VM uses them) or "skip" (counted in stats.skipped["device node"]).
DEVICES_ENV = "FLYIO_UNPACK_DEVICES"
DEVICE_POLICIES = ("create", "skip")
WARNINGS_PER_REASON = 10
PARENT_CACHE = 64  # resolved parent directories kept open (tar members come grouped by directory)
# File data and its metadata calls on writer threads beside the reading one; 0 writes
# inline. On this 2-core host (shared) the threads were slower: docs/performance.md.
WRITERS_ENV = "FLYIO_UNPACK_WRITERS"
DEFAULT_WRITER_THREADS = 0
MAX_QUEUED_BYTES = 16 << 20  # file data read but not yet written: bounds the peak RSS
PIECE_BYTES = 1 << 20  # a large file goes to the writers in pieces of about this much
READ_BYTES = 1 << 20  # one read of the (decompressed) stream


class UnsafeArchive(PermanentError):
    """The layer tried something this unpacker refuses; names the entry and the reason."""


class UnpackFailed(PermanentError):
    """The filesystem refused an operation (ENOSPC, EMLINK, ...); names the entry. The
    OSError is the __cause__."""


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what one layer may make the unpacker do; exceeding one is UnsafeArchive."""

    max_total_bytes: int = 8 << 30  # sum of regular file sizes in the layer
    max_file_bytes: int = 8 << 30  # one regular file
    max_entries: int = 1_000_000
    max_path_bytes: int = 4096
    max_name_bytes: int = 255  # one path component
    max_depth: int = 256  # path components; bounds the fds and stack of tree walks
    max_symlink_target_bytes: int = 4096
    max_metadata_bytes: int = 1 << 20  # one pax header or GNU long-name record
    allow_devices: bool | None = None  # char/block nodes: None follows $FLYIO_UNPACK_DEVICES (default create)

    @classmethod
    def from_format_limits(cls, limits: Limits) -> UnpackLimits:
        """The unpack bounds implied by the blob-level Limits the job carries."""
        return cls(max_total_bytes=limits.max_uncompressed_bytes, max_file_bytes=limits.max_entry_bytes,
                   max_entries=limits.max_entries, max_path_bytes=limits.max_path_bytes,
                   max_symlink_target_bytes=limits.max_path_bytes, max_metadata_bytes=limits.max_metadata_bytes)


@dataclass
class UnpackStats:
    """What one unpack did. `skipped` maps a reason to how many entries (or attributes) it hit."""

    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    devices: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def skip(self, reason: str, entry: str) -> None:
        with self._lock:  # writer threads skip xattrs too
            count = self.skipped.get(reason, 0) + 1
            self.skipped[reason] = count
        if count <= WARNINGS_PER_REASON:
            log.warning("entry skipped", reason=reason, entry=entry)


def _show(name: str) -> str:
    """An entry name for a one-line message: quoted, escaped, and cut when long."""
    return repr(name if len(name) <= 120 else name[:120] + "...")


def normalize(name: str, limits: UnpackLimits, *, entry: str | None = None, what: str = "path") -> tuple[str, ...]:
    """The components of `name` relative to the root (() for the root itself).

    The name is root-relative whatever it says: a leading "/" is dropped, empty and "."
    components too, and a ".." removes the component before it, never climbing above the
    root (containerd's filepath.Clean then Join("/", name): `/etc/x` and `a/../../x` land
    at `etc/x` and `x` under the root). This is lexical: the name's own components are
    never resolved here. NUL bytes and names over the limits raise UnsafeArchive naming
    `entry` (default: `name`)."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if (0 < size <= limits.max_name_bytes and "\0" not in name and not name.startswith((".", "/"))
            and "//" not in name and "/." not in name):
        # The common case, quickly: nothing to drop or clamp, no component can be too long.
        parts = name.rstrip("/").split("/")
        if len(parts) <= limits.max_depth:
            return tuple(parts)
    prefix = f"entry {_show(entry if entry is not None else name)}: " + ("" if what == "path" else f"{what} ")
    if "\0" in name:
        raise UnsafeArchive(f"{prefix}NUL byte in {what}")
    if size > limits.max_path_bytes:
        raise UnsafeArchive(f"{prefix}{what} longer than max_path_bytes={limits.max_path_bytes}")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        if len(part.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
            raise UnsafeArchive(f"{prefix}component longer than max_name_bytes={limits.max_name_bytes}")
        parts.append(part)
    if len(parts) > limits.max_depth:
        raise UnsafeArchive(f"{prefix}deeper than max_depth={limits.max_depth} components")
    return tuple(parts)


def _clamped_time(value: int, stats: UnpackStats, entry: str) -> int:
    """A mtime in nanoseconds, clamped to what ext4 stores (counted when it had to be)."""
    if MIN_TIME_NS <= value <= MAX_TIME_NS:  # the common case
        return value
    stats.skip("mtime out of range (clamped)", entry)
    return min(max(value, MIN_TIME_NS), MAX_TIME_NS)


@dataclass
class _DirMeta:
    """A directory's mode and mtime, applied after every entry (writes inside change mtime)."""

    mode: int
    mtime: int  # nanoseconds


class _Layer:
    """The state of one unpack: the root fd, what this layer wrote, dirs to finish.

    Paths this layer keeps (written, opaque, dirs) are *canonical*: where the entry landed
    once its parent's symlinks were resolved (`bin/x` under `bin -> usr/bin` is `usr/bin/x`),
    so a whiteout or an opaque marker reached through another name still finds them."""

    def __init__(self, root: Path, limits: UnpackLimits, resolver: str | None = None) -> None:
        resolver = resolver_name(resolver)  # bad settings fail here, before anything is open
        threads = _writer_threads()
        devices = limits.allow_devices if limits.allow_devices is not None else _devices_policy() == "create"
        self.root_fd = os.open(root, DIR_FLAGS)
        self.resolver = open_resolver(self.root_fd, resolver)
        self.limits = limits
        self.stats = UnpackStats()
        self.written: set[str] = set()  # paths this layer made (and their ancestors)
        self.opaque: set[str] = set()  # canonical directories whose lower contents go
        self.opaque_markers: dict[tuple[str, ...], str] = {}  # marker's directory (as named) -> entry
        self.dirs: dict[str, _DirMeta] = {}
        self.dir_tree: dict[str, set[str]] = {}  # path -> children leading to entries of self.dirs
        self.is_root = os.geteuid() == 0
        self.devices = devices
        self.umask = _umask_if_plain(self.root_fd)
        # Resolved parents by the name the entry gave them. Removing a directory or a
        # symlink may change what a name resolves to, so it marks the cache stale; it is
        # emptied at the next lookup, as the entry being applied may still use its fd.
        self._parents: dict[tuple[str, ...], tuple[Resolved, str]] = {}  # and the canonical path joined
        # The owner a new file gets in a cached parent, as seen on the first one made there
        # (the kernel's rule: our fsuid, and the directory's group if it is setgid or the
        # mount says grpid): files already owned as the tar says need no fchown.
        self._new_owner: dict[int, tuple[int, int]] = {}
        self._cache_stale = False
        self.writers = WriterPool(threads, MAX_QUEUED_BYTES) if threads else None

    def close(self) -> None:
        if self.writers is not None:
            self.writers.close()
        self._drop_cache()
        os.close(self.root_fd)

    # -- resolving inside the root ------------------------------------------------------

    def resolve(self, parts: tuple[str, ...], *, create: bool, entry: str) -> Resolved:
        """The directory `parts` names, symlinks followed inside the root (images/resolve.py);
        missing ones made 0755 when `create` (FileNotFoundError otherwise). Too many symlinks,
        or a component that is not a directory: UnsafeArchive naming `entry`."""
        try:
            found = self.resolver.open_dir(parts, create=create)
        except OSError as exc:
            where = _show("/".join(parts))
            if exc.errno == errno.ELOOP:
                raise UnsafeArchive(f"entry {_show(entry)}: more than {MAX_HOPS} symlinks resolving {where}") from None
            if exc.errno == errno.ENOTDIR:
                raise UnsafeArchive(f"entry {_show(entry)}: parent {where} is not a directory") from None
            raise
        for made in found.created:
            self.mark_written("/".join(made))
        return found

    def parent_dir(self, parts: tuple[str, ...], entry: str) -> tuple[int, str]:
        """The (cached) fd of an entry's parent directory, created if missing, and its
        canonical path ("" for the root). The fd is not to be closed."""
        if self._cache_stale:
            self._drop_cache()
        cached = self._parents.get(parts)
        if cached is None:
            found = self.resolve(parts, create=True, entry=entry)
            if len(self._parents) >= PARENT_CACHE:
                self._drop_cache()
            cached = self._parents[parts] = (found, "/".join(found.parts))
        return cached[0].fd, cached[1]

    def _drop_cache(self) -> None:
        for found, _ in self._parents.values():
            os.close(found.fd)
        self._parents.clear()
        self._new_owner.clear()
        self._cache_stale = False

    def mark_written(self, rel: str) -> None:
        while rel and rel not in self.written:
            self.written.add(rel)
            rel = rel.rpartition("/")[0]

    # -- removing (whiteouts, replacements) without following links ---------------------

    def unlink(self, parent_fd: int, name: str, mode: int) -> None:
        """Unlink a non-directory; a symlink gone may change what a cached name resolves to."""
        if not stat.S_ISREG(mode):
            self._cache_stale = True
        os.unlink(name, dir_fd=parent_fd)

    def remove(self, parent_fd: int, name: str) -> None:
        """Remove `name` (a whole tree if a directory) from `parent_fd`, never following a
        link. Iterative, with one directory fd open at a time."""
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.unlink(parent_fd, name, st.st_mode)
            return
        self._cache_stale = True
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        path = [name]  # names from parent_fd down to fd
        try:
            while True:
                subdir = None
                for child in os.listdir(fd):
                    if stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                        subdir = child
                        break
                    os.unlink(child, dir_fd=fd)
                if subdir is not None:
                    child_fd = os.open(subdir, DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd, path = child_fd, path + [subdir]
                    continue
                if len(path) == 1:
                    break
                # ".." of a directory we walked down into: still inside, never a link.
                up = os.open("..", DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = up
                os.rmdir(path.pop(), dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)

    def opaque_target(self, parts: tuple[str, ...], entry: str) -> str | None:
        """The canonical directory an opaque marker in `parts` hides the lower contents of,
        resolved once the layer is applied (so the marker works wherever it is in the tar);
        None when there is nothing to hide: the directory is missing, or the layer made it
        a file or a symlink of its own (walking into the layer's own symlink would prune
        some other directory). A lower layer's symlink there is followed, like any parent."""
        if parts:
            try:
                parent = self.resolve(parts[:-1], create=False, entry=entry)
            except FileNotFoundError:
                return None
            try:
                mode = os.lstat(parts[-1], dir_fd=parent.fd).st_mode
            except FileNotFoundError:
                return None
            finally:
                os.close(parent.fd)
            if not stat.S_ISDIR(mode) and "/".join((*parent.parts, parts[-1])) in self.written:
                return None
        try:
            found = self.resolve(parts, create=False, entry=entry)
        except FileNotFoundError:
            return None  # a dangling link: no lower contents to hide
        os.close(found.fd)
        return "/".join(found.parts)

    def prune_lower(self, parts: tuple[str, ...]) -> None:
        """Hide the lower contents of the canonical directory `parts`: remove what this
        layer did not write. A component this layer since replaced (by a file, or a symlink
        of its own) ends it: open_exact follows no link."""
        pending = [parts]
        while pending:
            current = pending.pop()
            fd = self.resolver.open_exact(current)
            if fd is None:
                continue
            try:
                for child in os.listdir(fd):
                    path = current + (child,)
                    if "/".join(path) not in self.written:
                        self.remove(fd, child)
                    elif stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                        pending.append(path)
            finally:
                os.close(fd)

    # -- entries ------------------------------------------------------------------------

    def apply(self, tar: TarReader, member: Member) -> None:
        """Apply one tar member."""
        name = member.name
        parts = normalize(name, self.limits)
        if not (0 <= member.uid <= MAX_ID and 0 <= member.gid <= MAX_ID):
            label, value = ("uid", member.uid) if not 0 <= member.uid <= MAX_ID else ("gid", member.gid)
            raise UnsafeArchive(f"entry {_show(name)}: {label} {value} out of range")
        if not parts:
            self.apply_root(member)
            return
        leaf = parts[-1]
        if leaf.startswith(WHITEOUT):
            self.whiteout(parts, name)
            return
        parent_fd, where = self.parent_dir(parts[:-1], name)
        rel = f"{where}/{leaf}" if where else leaf
        if member.isdir():
            self.make_dir(member, parent_fd, leaf, rel)
        elif member.isreg():
            self.check_file_size(member)
            self.write_file(tar, member, parent_fd, leaf, rel)
        elif member.issym():
            self.check_symlink_target(member)
            self.replace(parent_fd, leaf, rel)
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            self.set_metadata_at(parent_fd, leaf, member, symlink=True)
            self.stats.symlinks += 1
        elif member.islnk():
            self.hardlink(member, parent_fd, leaf, rel)
        elif member.isfifo():
            self.replace(parent_fd, leaf, rel)
            os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            self.set_metadata_at(parent_fd, leaf, member, symlink=False)
        elif member.ischr() or member.isblk():
            if not self.devices:
                self.stats.skip("device node", name)
                return
            self.replace(parent_fd, leaf, rel)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            # Made 0600, never opened; owner then mode (with setuid/setgid bits) by name.
            os.mknod(leaf, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent_fd)
            self.set_metadata_at(parent_fd, leaf, member, symlink=False)
            self.stats.devices += 1
        else:
            self.stats.skip(f"unsupported tar type {member.type!r}", name)
            return
        self.mark_written(rel)

    def apply_root(self, member: Member) -> None:
        """An entry naming the root (`./`, `/`, `..`, `a/..`): a directory gives the root its
        owner, xattrs, mode and mtime; anything else cannot replace the root and is skipped
        (containerd ignores every entry that resolves to the root)."""
        if not member.isdir():
            self.stats.skip("not a directory, names the root", member.name)
            return
        self.set_owner_xattrs(self.root_fd, member)
        self._cache_stale = True  # the root's group may have changed (see _new_owner)
        self.dirs[""] = _DirMeta(member.mode & 0o7777, _clamped_time(member.mtime_ns, self.stats, member.name))

    def replace(self, parent_fd: int, leaf: str, rel: str) -> None:
        """Make room for a non-directory: a later duplicate wins, a directory tree goes."""
        try:
            st = os.lstat(leaf, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget_dirs(rel)
        self.remove(parent_fd, leaf)

    def remember_dir(self, rel: str, meta: _DirMeta) -> None:
        """Keep a directory's metadata for the end, and index it under its ancestors so
        forget_dirs finds it without scanning every directory of the layer."""
        self.dirs[rel] = meta
        child = rel
        while child:
            parent = child.rpartition("/")[0]
            siblings = self.dir_tree.setdefault(parent, set())
            if child in siblings:
                break  # the rest of the chain is already indexed
            siblings.add(child)
            child = parent

    def forget_dirs(self, rel: str) -> None:
        """Drop the pending metadata of directories under `rel`, which is being replaced.
        Costs the size of that subtree: a scan of all directories per replacement made a
        layer of N directories replaced by N files take O(N^2) (8000: 7 s)."""
        self.dir_tree.get(rel.rpartition("/")[0], set()).discard(rel)
        pending = [rel]
        while pending:
            path = pending.pop()
            self.dirs.pop(path, None)
            pending.extend(self.dir_tree.pop(path, ()))

    def make_dir(self, member: Member, parent_fd: int, leaf: str, rel: str) -> None:
        try:
            existing: os.stat_result | None = os.lstat(leaf, dir_fd=parent_fd)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            self.unlink(parent_fd, leaf, existing.st_mode)  # a symlink included: never walked into
            existing = None
        if existing is None:
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
        elif existing.st_gid != member.gid:
            self._cache_stale = True  # a new file's group there may follow the directory's
        fd = os.open(leaf, DIR_FLAGS, dir_fd=parent_fd)
        try:
            self.set_owner_xattrs(fd, member)
        finally:
            os.close(fd)
        self.remember_dir(rel, _DirMeta(member.mode & 0o7777, _clamped_time(member.mtime_ns, self.stats, member.name)))
        self.mark_written(rel)
        self.stats.dirs += 1

    def whiteout(self, parts: tuple[str, ...], entry: str) -> None:
        """`.wh.<name>` removes the lower layers' <name>; `.wh..wh..opq` hides the lower
        contents of its directory (at the end). The directory is resolved inside the root
        like any parent; the victim itself is never followed."""
        self.stats.whiteouts += 1
        parent, leaf = parts[:-1], parts[-1]
        if leaf == OPAQUE:
            self.opaque_markers.setdefault(parent, entry)
            return
        target = leaf[len(WHITEOUT):]
        if target in ("", ".", "..") or target.startswith(WHITEOUT):
            raise UnsafeArchive(f"entry {_show(entry)}: invalid whiteout")
        try:
            found = self.resolve(parent, create=False, entry=entry)
        except FileNotFoundError:
            return  # nothing below to hide
        victim = "/".join((*found.parts, target))
        try:
            if victim not in self.written:
                self.remove(found.fd, target)
                return
            # A whiteout hides lower layers only: this layer's own entry stays, but the
            # lower contents of a directory it merged into go.
            try:
                is_dir = stat.S_ISDIR(os.lstat(target, dir_fd=found.fd).st_mode)
            except FileNotFoundError:
                is_dir = False
        finally:
            os.close(found.fd)
        if is_dir:
            # Like an opaque marker, applied once at the end: pruning here would list the
            # directory again for every repeated whiteout of it (O(N^2) for a hostile layer).
            self.opaque.add(victim)

    def check_file_size(self, member: Member) -> None:
        if member.size > self.limits.max_file_bytes:
            raise UnsafeArchive(f"entry {_show(member.name)}: {member.size} bytes is over "
                                f"max_file_bytes={self.limits.max_file_bytes}")
        if self.stats.bytes_written + member.size > self.limits.max_total_bytes:
            raise UnsafeArchive(f"entry {_show(member.name)}: the layer would write more than "
                                f"max_total_bytes={self.limits.max_total_bytes}")

    def check_symlink_target(self, member: Member) -> None:
        target = member.linkname
        if not target:
            raise UnsafeArchive(f"entry {_show(member.name)}: empty symlink target")
        if "\0" in target:
            raise UnsafeArchive(f"entry {_show(member.name)}: NUL byte in symlink target")
        if len(target.encode("utf-8", "surrogateescape")) > self.limits.max_symlink_target_bytes:
            raise UnsafeArchive(f"entry {_show(member.name)}: symlink target longer than "
                                f"max_symlink_target_bytes={self.limits.max_symlink_target_bytes}")

    def write_file(self, tar: TarReader, member: Member, parent_fd: int, leaf: str, rel: str) -> None:
        """Create the file here (every name is touched by this thread alone, in tar order);
        its data and then its metadata are written by the writer pool."""
        mode = member.mode & 0o7777
        # Created with its final mode when open(2) gives exactly that (no setuid/setgid/sticky
        # bit, which must follow the chown; nothing the umask takes away): one fchmod less.
        exact = self.umask is not None and not mode & (0o7000 | self.umask)
        fd = self.create_file(parent_fd, leaf, rel, mode if exact else 0o600)
        mode_to_set = None if exact else mode
        chown = self.is_root and (member.uid, member.gid) != self.new_owner(parent_fd, fd)
        mtime = _clamped_time(member.mtime_ns, self.stats, member.name)
        if self.writers is None:
            try:
                if member.sparse is not None:
                    for offset, views in tar.pieces(member, PIECE_BYTES):
                        pwrite_all(fd, views, offset)
                elif member.size <= PIECE_BYTES:
                    views = tar.small(member)
                    if len(views) == 1 and os.pwrite(fd, views[0], 0) == member.size:
                        pass  # the common case: one read held it all, one pwrite wrote it all
                    else:
                        pwrite_all(fd, views, 0)
                else:
                    for offset, views in tar.pieces(member, PIECE_BYTES):
                        pwrite_all(fd, views, offset)
                self.finish_file(fd, member, chown, mode_to_set, mtime)
            finally:
                os.close(fd)
        else:
            handle = self.writers.open_file(fd, lambda fd: self.finish_file(fd, member, chown, mode_to_set, mtime),
                                            member.name)
            for offset, views in tar.pieces(member, PIECE_BYTES):
                self.writers.write(handle, views, offset)
            self.writers.seal(handle)
        self.stats.bytes_written += member.data_size
        self.stats.files += 1

    def finish_file(self, fd: int, member: Member, chown: bool, mode: int | None, mtime: int) -> None:
        """After the data (a write clears security.capability and sets the mtime): owner
        (unless it is already right), mode (None: created with it), xattrs, mtime. May run
        on a writer thread."""
        if member.sparse is not None:
            os.ftruncate(fd, member.size)  # the holes after the last segment (kept as holes)
        if chown:
            os.fchown(fd, member.uid, member.gid)
        if mode is not None:
            os.fchmod(fd, mode)
        if member.xattrs:
            self.set_xattrs(fd, member)
        os.utime(fd, ns=(mtime, mtime))

    def new_owner(self, parent_fd: int, fd: int) -> tuple[int, int]:
        """The owner files get when made in `parent_fd` (a cached parent), from the first."""
        owner = self._new_owner.get(parent_fd)
        if owner is None:
            st = os.fstat(fd)
            owner = self._new_owner[parent_fd] = (st.st_uid, st.st_gid)
        return owner

    def create_file(self, parent_fd: int, leaf: str, rel: str, mode: int) -> int:
        """A new, empty file at `leaf` (O_EXCL, O_NOFOLLOW): whatever was there is replaced.
        Trying the create first saves an lstat per file; a name in use is the rare case."""
        try:
            return os.open(leaf, FILE_FLAGS, mode, dir_fd=parent_fd)
        except FileExistsError:
            self.replace(parent_fd, leaf, rel)
            return os.open(leaf, FILE_FLAGS, mode, dir_fd=parent_fd)

    def hardlink(self, member: Member, parent_fd: int, leaf: str, rel: str) -> None:
        """Link to what is already at the target (this or a lower layer), anything but a
        directory: the target's parents resolved inside the root, the target itself never
        followed (a symlink is linked itself). The link gets no metadata of its own."""
        name = member.name
        target = normalize(member.linkname, self.limits, entry=name, what="hardlink target")
        shown = _show(member.linkname)
        if not target:
            raise UnsafeArchive(f"entry {_show(name)}: hardlink to the root")
        try:
            source = self.resolve(target[:-1], create=False, entry=name)
        except FileNotFoundError:
            raise UnsafeArchive(f"entry {_show(name)}: hardlink target {shown} does not exist") from None
        try:
            try:
                st = os.lstat(target[-1], dir_fd=source.fd)
            except FileNotFoundError:
                raise UnsafeArchive(f"entry {_show(name)}: hardlink target {shown} does not exist") from None
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeArchive(f"entry {_show(name)}: hardlink target {shown} is a directory")
            try:
                existing = os.lstat(leaf, dir_fd=parent_fd)
                if (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
                    self.stats.hardlinks += 1  # already that very file (a link to itself)
                    return
            except FileNotFoundError:
                pass
            self.replace(parent_fd, leaf, rel)
            os.link(target[-1], leaf, src_dir_fd=source.fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(source.fd)
        self.stats.hardlinks += 1

    # -- metadata -----------------------------------------------------------------------

    def set_owner_xattrs(self, fd: int, member: Member, mode: int | None = None, chown: bool = True) -> None:
        """Owner, then mode (chown clears setuid/setgid), then xattrs (chown also clears
        security.capability), on an open fd."""
        if self.is_root and chown:
            os.fchown(fd, member.uid, member.gid)
        if mode is not None:
            os.fchmod(fd, mode)
        if member.xattrs:
            self.set_xattrs(fd, member)

    def set_xattrs(self, fd: int, member: Member) -> None:
        """The xattrs a member's pax records carry (SCHILY.xattr.*), on an open fd."""
        for key, value in member.xattrs.items():
            self.set_xattr(fd, key, value, member.name)

    def set_metadata_at(self, parent_fd: int, leaf: str, member: Member, *, symlink: bool) -> None:
        """Owner, mode, xattrs and mtime of a symlink, fifo or device node, by name, never
        following (nor opening: opening a device node can have side effects)."""
        if self.is_root:
            os.chown(leaf, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        if not symlink:
            os.chmod(leaf, member.mode & 0o7777, dir_fd=parent_fd, follow_symlinks=False)
        for key, value in member.xattrs.items():
            # /proc/self/fd/N is the parent directory itself; lsetxattr does not follow `leaf`.
            self.set_xattr(f"/proc/self/fd/{parent_fd}/{leaf}", key, value, member.name)
        mtime = _clamped_time(member.mtime_ns, self.stats, member.name)
        os.utime(leaf, ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)

    def set_xattr(self, where: int | str, name: str, data: bytes, entry: str) -> None:
        if not name.startswith(ALLOWED_XATTRS) or name.startswith(REFUSED_XATTRS):
            self.stats.skip(f"xattr {name.split('.')[0]}.* not kept", entry)
            return
        try:
            if isinstance(where, int):
                os.setxattr(where, name, data)  # an fd: nothing to follow (and the flag is refused)
            else:
                os.setxattr(where, name, data, follow_symlinks=False)
        except OSError as exc:
            self.stats.skip(f"xattr {name}: {exc.strerror}", entry)

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """Opaque directories lose their lower contents; then directory modes and mtimes,
        deepest first, so nothing written afterwards changes them."""
        self._drop_cache()
        for parts, entry in self.opaque_markers.items():
            where = self.opaque_target(parts, entry)
            if where is not None:
                self.opaque.add(where)
        for rel in sorted(self.opaque):
            self.prune_lower(_split(rel))
        for rel in sorted(self.dirs, key=lambda p: p.count("/") + bool(p), reverse=True):
            meta = self.dirs[rel]
            fd = self.resolver.open_exact(_split(rel))
            if fd is None:
                continue  # replaced by something else later in the layer
            try:
                os.fchmod(fd, meta.mode)
                os.utime(fd, ns=(meta.mtime, meta.mtime))
            finally:
                os.close(fd)


def _umask_if_plain(root_fd: int) -> int | None:
    """The process's umask, read without changing it (/proc/self/status), when open(2)'s
    mode is then exactly `mode & ~umask` under the root: None when unknown, or when the root
    has a default ACL (which replaces the umask; a layer cannot set one: system.* xattrs are
    not kept, so no directory below gets one either)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return None
    try:
        os.getxattr(root_fd, "system.posix_acl_default")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return umask
        return None
    return None


def check_settings() -> None:
    """The operator's unpack settings (FLYIO_UNPACK_RESOLVER, FLYIO_UNPACK_WRITERS,
    FLYIO_UNPACK_DEVICES), checked where the services are built: a bad value is one
    `error:` line before any job runs, not a layer aborted half-way."""
    try:
        resolver_name(None)
        _writer_threads()
        _devices_policy()
    except (ValueError, RuntimeError) as exc:
        raise ManagerError(str(exc)) from None


def _devices_policy() -> str:
    value = os.environ.get(DEVICES_ENV, "") or "create"
    if value not in DEVICE_POLICIES:
        raise ValueError(f"{DEVICES_ENV}={value!r}: expected one of {', '.join(DEVICE_POLICIES)}")
    return value


def _writer_threads() -> int:
    value = os.environ.get(WRITERS_ENV, "")
    if not value:
        return DEFAULT_WRITER_THREADS
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"{WRITERS_ENV}={value!r}: expected a number of threads") from None
    return max(0, min(threads, 8))


def _split(rel: str) -> tuple[str, ...]:
    return tuple(rel.split("/")) if rel else ()


def _as_unpack_limits(limits: UnpackLimits | Limits) -> UnpackLimits:
    return limits if isinstance(limits, UnpackLimits) else UnpackLimits.from_format_limits(limits)


def unpack_layer(tar_stream: BinaryIO, root: Path, *, limits: UnpackLimits | Limits = UnpackLimits(),
                 on_progress: Callable[[int], None] | None = None, resolver: str | None = None) -> UnpackStats:
    """Apply the (decompressed) tar stream onto `root`, a layer over what root holds.

    Raises UnsafeArchive (a PermanentError, one line naming the entry and the reason) on
    anything refused, including truncated or corrupt tars and exceeded limits, and
    UnpackFailed when the filesystem refuses a write. On error nothing outside `root`
    has been touched; what is inside is not to be trusted (the caller throws it away).
    `on_progress` gets the number of tar bytes read so far, after each entry. `resolver`
    ("openat2" or "walk"; default $FLYIO_UNPACK_RESOLVER, else openat2 where the kernel has
    it) picks how paths are resolved inside the root: both give the same result."""
    started = time.monotonic()
    bounds = _as_unpack_limits(limits)
    # One pass, one parser: the decoder the download-time check ran over these bytes;
    # entry counts and sizes are checked here, per member, so the messages name the limit.
    tar = TarReader(tar_stream, READ_BYTES, TarLimits(max_metadata_bytes=bounds.max_metadata_bytes,
                                                      max_path_bytes=bounds.max_path_bytes))
    layer = _Layer(Path(root), bounds, resolver)
    current = ""
    try:
        for member in tar.members():
            current = member.name
            layer.stats.entries += 1
            if layer.stats.entries > bounds.max_entries:
                raise UnsafeArchive(f"entry {_show(member.name)}: more than max_entries={bounds.max_entries} entries")
            layer.apply(tar, member)
            if on_progress is not None:
                on_progress(tar.position)
        current = ""
        if layer.writers is not None:
            layer.writers.drain()
        tar.finish()
        layer.finish()
    except UnsafeArchive:
        raise
    except WriteFailed as exc:
        raise UnpackFailed(f"unpacking entry {_show(exc.entry)}: {exc.error.strerror or exc.error}") from exc.error
    except (TarRefused, TarCorrupt) as exc:
        raise UnsafeArchive(str(exc)) from None
    except ValueError as exc:  # a name or value the kernel interface refuses (an embedded NUL)
        raise UnsafeArchive(f"entry {_show(current)}: {exc}") from None
    except OSError as exc:
        where = f"entry {_show(current)}" if current else "finishing the layer"
        raise UnpackFailed(f"unpacking {where}: {exc.strerror or exc}") from exc
    finally:
        layer.close()
    layer.stats.seconds = time.monotonic() - started
    if layer.stats.skipped:
        log.info("layer unpacked with skips", skipped=layer.stats.skipped)
    return layer.stats
