"""The `blockfile` backend, for kernels without dm-thin: each thin device is a sparse file
`thin-<id>.img` in the pool, attached to a real loop device when active; a snapshot is a
reflink copy of its origin's file (a sparse-aware full copy where reflink is missing).

The pool itself is the guide's two files in the state directory: `pool_data`, a sparse
file formatted XFS with reflink=1 and loop-mounted (nodev,nosuid) at `<dir>/pool`, so
snapshots are copy-on-write whatever the host filesystem is; and `pool_meta`, a small
JSON record of the pool's configuration. After a reboot the existing files are
re-attached, never reformatted. Where XFS is unavailable the pool is a plain directory
`<dir>/pool` on the host filesystem (reflink if that filesystem has it, copies if not),
recorded as such in pool_meta and said in the logs and the status.

Kept honest for the devicemapper backend that implements the same interface: the caller
chooses thin ids, create never activates, delete refuses an active device and is
idempotent, deactivate refuses a mounted one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from devices import filesystem, loop
from devices.base import (DeviceExists, DeviceInfo, OriginMissing, PoolConfig, PoolStatus, PoolUnhealthy, activate_each,
                          check_growth, device_id_from_name, device_name)
from devices.limits import SizeLimit
from devices.mount import MountEntry, mount, mount_entry, mounts, unmount
from support.durable import fsync_dir
from support.errors import ManagerError
from support.log import get_logger
from support.proc import CommandFailed

log = get_logger("devices.blockfile", component="pool-manager")

F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
FICLONE = 0x40049409  # _IOW(0x94, 9, int): clone a whole file's extents
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
XFS_MAGIC = b"XFSB"
MODE_XFS = "xfs"
MODE_DIRECTORY = "directory"
MIN_FREE_FRACTION = 0.10  # refuse new devices below this share of free pool space
MAX_THIN_ID = 2**24 - 1  # dm-thin device ids are 24 bits; the same rule here keeps ids portable
COPY_CHUNK = 8 << 20
MKFS_XFS_TIMEOUT = 120.0
GROW_TIMEOUT = 120.0
PROBE_TIMEOUT = 30.0
FLUSH_TIMEOUT = 60.0
IMAGE_SUFFIX = ".img"
_LIBC = ctypes.CDLL(None, use_errno=True)


class BlockfilePool:
    """A ThinPool of sparse files on loop devices (see the module docstring)."""

    backend_name = "blockfile"

    def __init__(self, config: PoolConfig, *, use_xfs: bool = True,
                 min_free_fraction: float = MIN_FREE_FRACTION) -> None:
        """`use_xfs=False` makes a new pool a plain directory (as when XFS is unavailable)."""
        self.config = config
        self.use_xfs = use_xfs
        self.min_free_fraction = min_free_fraction
        self.directory = Path(config.directory)
        self.data_file = self.directory / "pool_data"
        self.meta_file = self.directory / "pool_meta"
        self.mount_point = self.directory / "pool"
        # Which loop backs each device file: found without listing every loop on the host.
        self._loops = loop.LoopIndex(self.directory / "loops", self._files_by_id)

    # -- the pool ---------------------------------------------------------------------

    def mode(self) -> str:
        """`xfs` (the loop-mounted pool_data) or `directory` (the fallback), as pool_meta records it."""
        meta = self._read_meta()
        return MODE_DIRECTORY if meta and meta.get("mode") == MODE_DIRECTORY else MODE_XFS

    def ensure_pool_exists(self) -> PoolStatus:
        """Create the pool when missing; after a reboot re-attach and re-mount its existing files."""
        status = self.get_pool_status()
        if status.exists:
            return status
        log.info("pool does not exist, attempting to create", pool_name=self.config.pool_name)
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.mode() == MODE_DIRECTORY:
            self._open_directory_pool()
        elif self.data_file.exists():
            self._reattach_xfs_pool()
        else:
            unavailable = self._xfs_unavailable() if self.use_xfs else "XFS disabled for this pool"
            if unavailable:
                log.warning("XFS unavailable for the blockfile pool", pool_name=self.config.pool_name,
                            reason=unavailable)
                self._open_directory_pool()
            else:
                self._create_xfs_pool()
        status = self.get_pool_status()
        if not status.exists:
            raise ManagerError(f"pool {self.config.pool_name} still missing after setup: {status.raw}")
        log.info("thin pool created successfully", pool_name=self.config.pool_name, backend=self.backend_name,
                 mode=self.mode(), detail=status.raw)
        return status

    def _xfs_unavailable(self) -> str | None:
        """Why an XFS pool cannot be made here, or None when it can."""
        if shutil.which("mkfs.xfs") is None:
            return "mkfs.xfs not found (install xfsprogs)"
        try:
            known = Path("/proc/filesystems").read_text().split()
        except OSError:
            known = []
        if "xfs" not in known and not Path(f"/lib/modules/{os.uname().release}").exists():
            return "the kernel lists no xfs filesystem"
        return None

    def _create_xfs_pool(self) -> None:
        log.info("creating new thin pool", pool_name=self.config.pool_name, backend=self.backend_name,
                 data_size=self.config.data_size_bytes, metadata_size=self.config.metadata_size_bytes)
        self._refuse_hidden_devices()
        # Formatted under a temporary name, so a failed mkfs never leaves a pool_data that
        # a later start would have to refuse as "not a pool".
        fresh = self.data_file.with_name("pool_data.new")
        with open(fresh, "wb") as fh:
            fh.truncate(self.config.data_size_bytes)
        filesystem.make_xfs(fresh, timeout=MKFS_XFS_TIMEOUT)
        os.replace(fresh, self.data_file)
        self._write_meta(MODE_XFS)
        self._attach_and_mount()

    def _reattach_xfs_pool(self) -> None:
        content = self._pool_file_content()
        if content == "empty":
            # No signature and not one written byte (the guide's `fallocate -l 2G pool_data`):
            # nothing to lose, so it is formatted in place.
            log.info("pool_data holds no data; formatting it", path=str(self.data_file))
            filesystem.make_xfs(self.data_file, timeout=MKFS_XFS_TIMEOUT)
            self._write_meta(MODE_XFS)
        elif content != MODE_XFS:
            raise ManagerError(f"{self.data_file} holds {content}, not an XFS pool; refusing to format it")
        else:
            log.info("re-attaching existing pool files", pool_name=self.config.pool_name, path=str(self.data_file))
        recorded = (self._read_meta() or {}).get("data_size_bytes")
        if not self.meta_file.exists() or recorded != self.data_file.stat().st_size:
            # A grow cut short between extending pool_data and recording it: the file's size stands.
            self._write_meta(MODE_XFS)
        self._attach_and_mount()

    def _pool_file_content(self) -> str:
        """`xfs`, `empty`, or a description of what else pool_data holds (blkid -p and the magic)."""
        probe = filesystem.probe(self.data_file, timeout=PROBE_TIMEOUT)
        found = probe.fields
        with open(self.data_file, "rb") as fh:
            magic = fh.read(len(XFS_MAGIC))
        if found.get("TYPE") == "xfs" and magic == XFS_MAGIC:
            return MODE_XFS
        if found.get("TYPE"):
            return f"a {found['TYPE']} signature"
        if probe.nothing_found and not _holds_data(self.data_file):
            return "empty"
        return "data with no known filesystem signature"

    def _attach_and_mount(self) -> None:
        """Attach pool_data (reusing a loop that already backs it) and mount it at `pool`."""
        attached_here = False
        device = self._pool_loop()
        if device is None:
            device = loop.attach(self.data_file)
            attached_here = True
        self.mount_point.mkdir(exist_ok=True)
        if mount_entry(self.mount_point) is None:
            self._refuse_hidden_devices()
            try:
                mount(device, self.mount_point, fstype="xfs")
            except CommandFailed:
                if attached_here:  # a clean failure: release the loop this call made
                    loop.detach(device)
                raise
        log.info("pool mounted", device=device, mount_point=str(self.mount_point))

    def _refuse_hidden_devices(self) -> None:
        """Mounting over (or beside) a non-empty `pool` directory would hide device files."""
        if self.mount_point.is_dir() and mount_entry(self.mount_point) is None and any(self.mount_point.iterdir()):
            raise ManagerError(f"{self.mount_point} is not empty and no pool is mounted there; "
                               "refusing to mount a pool over it (a directory-mode pool without its pool_meta?)")

    def _open_directory_pool(self) -> None:
        self.mount_point.mkdir(exist_ok=True)
        if self._read_meta() is None:
            self._write_meta(MODE_DIRECTORY)
        reflink = _reflink_works(self.mount_point)
        log.warning("blockfile pool is a plain directory on the host filesystem", path=str(self.mount_point),
                    snapshots="reflink" if reflink else "full copies (no reflink on this filesystem)")

    def _read_meta(self) -> dict[str, object] | None:
        try:
            with open(self.meta_file, "rb") as fh:
                head = fh.read(4096).rstrip(b"\0")
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(head or b"null")
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def _write_meta(self, mode: str) -> None:
        """pool_meta: metadata_size_bytes long (as the guide's file), a JSON record at its head.
        The data size recorded is pool_data's actual size (a grow may have extended it)."""
        data_size = self.data_file.stat().st_size if self.data_file.exists() else self.config.data_size_bytes
        meta = {"backend": self.backend_name, "mode": mode, "pool_name": self.config.pool_name,
                "data_size_bytes": data_size, "metadata_size_bytes": self.config.metadata_size_bytes}
        fresh = self.meta_file.with_name("pool_meta.new")
        with open(fresh, "wb") as fh:
            fh.write(json.dumps(meta).encode())
            fh.truncate(max(self.config.metadata_size_bytes, fh.tell()))
            os.fsync(fh.fileno())
        os.replace(fresh, self.meta_file)
        fsync_dir(self.directory)

    def _pool_loop(self) -> str | None:
        found = loop.find_backing(self.data_file)
        return found[0] if found else None

    def get_pool_status(self) -> PoolStatus:
        """The pool as statvfs of its filesystem sees it: one data block = one fs block."""
        if self.mode() == MODE_DIRECTORY:
            if not self.mount_point.is_dir():
                return PoolStatus(backend=self.backend_name, exists=False, raw=f"no directory {self.mount_point}")
            return self._status_from_statvfs(error=None, raw=f"directory {self.mount_point} on the host filesystem "
                                                              "(no XFS pool; reflink where the host has it)")
        entry = mount_entry(self.mount_point)
        if entry is None:
            return PoolStatus(backend=self.backend_name, exists=False, raw=f"nothing mounted at {self.mount_point}")
        error = self._pool_mount_error(entry)
        return self._status_from_statvfs(error=error, raw=error or f"xfs on {entry.source} ({self.data_file}) "
                                                                    f"at {self.mount_point}")

    def _pool_mount_error(self, entry: MountEntry) -> str | None:
        """Why the mount at `pool` is not our pool_data on a loop device, or None (one ioctl
        on the mounted loop: a status costs the same however many loops the host has)."""
        if entry.fstype != "xfs":
            return f"{self.mount_point} holds a {entry.fstype} mount of {entry.source}, not the XFS pool"
        identity = loop.backing_identity(entry.source)
        if identity is None:
            return f"{self.mount_point} is mounted from {entry.source}, which is not a bound loop device"
        try:
            st = self.data_file.stat()
        except FileNotFoundError:
            return f"the pool's backing file {self.data_file} is gone ({entry.source} still holds it)"
        if identity != (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            return f"{entry.source} at {self.mount_point} is backed by another file, not {self.data_file}"
        return None

    def _status_from_statvfs(self, *, error: str | None, raw: str) -> PoolStatus:
        st = os.statvfs(self.mount_point)
        return PoolStatus(
            backend=self.backend_name, exists=True,
            read_only=bool(st.f_flag & os.ST_RDONLY),
            error_state=error is not None,
            out_of_data_space=st.f_bavail == 0,
            used_data_blocks=st.f_blocks - st.f_bfree, total_data_blocks=st.f_blocks,
            used_metadata_blocks=st.f_files - st.f_ffree, total_metadata_blocks=st.f_files,
            data_block_bytes=st.f_frsize,
            raw=raw,
        )

    def validate_pool_health(self) -> PoolStatus:
        """The status, or PoolUnhealthy naming every problem."""
        status = self.get_pool_status()
        if not status.exists:
            raise PoolUnhealthy(f"pool {self.config.pool_name} does not exist ({status.raw}); "
                                "run `flyio-image-manager setup-pool`")
        problems = [name for name, bad in (("error state", status.error_state), ("read-only", status.read_only),
                                           ("out of data space", status.out_of_data_space)) if bad]
        if problems:
            raise PoolUnhealthy(f"pool {self.config.pool_name} is unhealthy: {', '.join(problems)} ({status.raw})")
        return status

    def teardown_pool(self) -> None:
        """Unmount and detach every device and the pool, as a reboot would; no file is deleted."""
        backing = {(d.backing_inode, d.backing_dev): d.device for d in loop.loop_devices() if not d.backing_deleted}
        all_mounts = mounts()
        for path in self._device_files():
            st = path.stat()
            device = backing.get((st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))))
            if device is None:
                continue
            for target in [m.target for m in all_mounts if m.source == device][::-1]:
                unmount(target)
            loop.detach(device)
        for device_id in self._files_by_id():
            self._loops.forget(device_id)
        if self.mode() == MODE_XFS:
            pool_loops = set(loop.find_backing(self.data_file))
            entry = mount_entry(self.mount_point)
            data_path = os.path.join(os.path.realpath(self.directory), self.data_file.name)
            if entry is not None and loop.list_loops().get(entry.source) == data_path:
                pool_loops.add(entry.source)  # its pool_data was deleted: no inode to match any more
            unmount(self.mount_point)
            for device in sorted(pool_loops):
                loop.detach(device)
        log.info("pool torn down", pool_name=self.config.pool_name, mode=self.mode())

    def max_device_bytes(self) -> SizeLimit:
        """A device is a file in the pool's filesystem: that filesystem's largest file,
        probed where the pool is mounted (or is a directory); XFS's before the pool exists."""
        from devices.limits import SQLITE_INTEGER_MAX, file_limit

        if self.mode() == MODE_DIRECTORY and self.mount_point.is_dir():
            return file_limit(self.mount_point)
        if mount_entry(self.mount_point) is not None:
            return file_limit(self.mount_point)
        return SizeLimit(SQLITE_INTEGER_MAX, "XFS's largest file (the pool's filesystem)")

    def grow_pool(self, *, data_size_bytes: int | None = None, metadata_size_bytes: int | None = None) -> PoolStatus:
        """Extend pool_data (sparse), `losetup -c` its loop, `xfs_growfs` the mounted pool,
        then record the size in pool_meta. Each step leaves a pool that mounts: XFS only
        ever uses what its superblock says, and the file is extended before XFS grows.
        The blockfile pool has no separate metadata space (XFS inodes grow with data)."""
        if metadata_size_bytes is not None:
            raise ManagerError("the blockfile pool keeps no separate metadata space (its inodes grow with "
                               "--grow); --grow-metadata applies to the devicemapper backend")
        if self.mode() != MODE_XFS:
            raise ManagerError(f"a directory-mode pool ({self.mount_point}) grows with its host filesystem")
        self._require_pool()
        if data_size_bytes is None:
            return self.get_pool_status()
        current = self.data_file.stat().st_size
        device = self._pool_loop()
        if device is None:
            raise PoolUnhealthy(f"no loop device backs {self.data_file}; run `flyio-image-manager setup-pool`")
        if check_growth("data", current, data_size_bytes):
            with open(self.data_file, "r+b") as fh:
                fh.truncate(data_size_bytes)
                os.fsync(fh.fileno())
            log.info("pool file extended", path=str(self.data_file), old_size=current, new_size=data_size_bytes)
        # Run even when the file already has the size: a grow cut short after the extend
        # is finished by running it again.
        loop.refresh_capacity(device, timeout=GROW_TIMEOUT)
        filesystem.grow_xfs(self.mount_point, timeout=GROW_TIMEOUT)
        self.config = replace(self.config, data_size_bytes=max(data_size_bytes, current))
        self._write_meta(MODE_XFS)
        status = self.get_pool_status()
        log.info("pool grown", pool_name=self.config.pool_name, backend=self.backend_name, data_size=data_size_bytes,
                 total_bytes=status.total_data_blocks * status.data_block_bytes)
        return status

    # -- devices ----------------------------------------------------------------------

    def _file(self, device_id: int) -> Path:
        if not isinstance(device_id, int) or not 0 <= device_id <= MAX_THIN_ID:
            raise ManagerError(f"invalid thin device id {device_id!r}: must be an integer 0..{MAX_THIN_ID}")
        return self.mount_point / f"{device_name(device_id)}{IMAGE_SUFFIX}"

    def _backing(self, device_id: int) -> list[str]:
        """The loop devices backing the device's file (normally zero or one), from the index."""
        return self._loops.lookup(device_id, self._file(device_id))

    def _files_by_id(self) -> dict[int, Path]:
        files = {}
        for path in self._device_files():
            device_id = device_id_from_name(path.name.removesuffix(IMAGE_SUFFIX))
            if device_id is not None and self._file(device_id) == path:  # thin-007.img is nobody's
                files[device_id] = path
        return files

    def _device_files(self) -> Iterator[Path]:
        if not self.mount_point.is_dir():
            return
        for entry in self.mount_point.iterdir():
            if entry.name.endswith(IMAGE_SUFFIX) and device_id_from_name(entry.name[:-len(IMAGE_SUFFIX)]) is not None:
                yield entry

    def _require_pool(self) -> PoolStatus:
        """The status of a pool that exists; otherwise PoolUnhealthy (a device path under an
        unmounted `pool` directory would silently name nothing)."""
        status = self.get_pool_status()
        if not status.exists:
            raise PoolUnhealthy(f"pool {self.config.pool_name} does not exist ({status.raw}); "
                                "run `flyio-image-manager setup-pool`")
        return status

    def _require_room(self) -> None:
        """Healthy, and free space at or above min_free_fraction of the pool."""
        status = self.validate_pool_health()
        free = status.free_data_bytes
        total = status.total_data_blocks * status.data_block_bytes
        if total and free < self.min_free_fraction * total:
            raise PoolUnhealthy(f"pool has too little free space: {_mib(free)} free of {_mib(total)} "
                                f"({free / total:.1%} < {self.min_free_fraction:.0%})")

    def _create_file(self, device_id: int) -> int:
        try:
            return os.open(self._file(device_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                           0o600)
        except FileExistsError:
            raise DeviceExists(f"device {device_name(device_id)} already exists in the pool") from None

    def _abandon(self, device_id: int, fd: int) -> None:
        """Remove a device file this call created but could not finish (no half-made device stays)."""
        os.close(fd)
        self._file(device_id).unlink(missing_ok=True)

    def create_thin(self, device_id: int, size_bytes: int) -> None:
        """A new sparse `thin-<id>.img` of size_bytes (O_EXCL: DeviceExists if the id is taken)."""
        if size_bytes <= 0:
            raise ManagerError(f"invalid size {size_bytes} for {device_name(device_id)}")
        self._require_room()
        fd = self._create_file(device_id)
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
        except BaseException:
            self._abandon(device_id, fd)
            raise
        os.close(fd)
        fsync_dir(self.mount_point)
        log.info("thin device created", device_name=device_name(device_id), size=size_bytes)

    def create_snapshot(self, device_id: int, origin_id: int) -> None:
        """A reflink copy of origin (a full sparse copy where reflink is missing).

        The origin must not be mounted read-write: a clone of a live filesystem is not
        crash-consistent. An active origin is flushed first (the dm equivalent: suspend)."""
        origin = self._file(origin_id)
        self._require_room()
        if not origin.is_file():
            raise OriginMissing(f"snapshot origin {device_name(origin_id)} does not exist in the pool")
        for dev in self._backing(origin_id):
            for entry in mounts():
                if entry.source == dev and not entry.read_only:
                    raise ManagerError(f"snapshot origin {device_name(origin_id)} ({dev}) is mounted read-write "
                                       f"at {entry.target}; unmount it first")
            filesystem.flush_buffers(dev, timeout=FLUSH_TIMEOUT)
        src = os.open(origin, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(src)  # the origin's own data durable before a snapshot of it exists
            dst = self._create_file(device_id)
            try:
                method = _clone_or_copy(src, dst)
                os.fsync(dst)
            except BaseException:
                self._abandon(device_id, dst)
                raise
            os.close(dst)
        finally:
            os.close(src)
        fsync_dir(self.mount_point)
        log.info("snapshot created", device_name=device_name(device_id), origin=device_name(origin_id), method=method)

    def activate(self, device_id: int, size_bytes: int) -> str:
        """Attach the device's file to a loop device (or return the one already attached).

        A size larger than the file grows it (sparse: the new range reads zeros, as a
        longer dm table would); a smaller one is refused, it would cut a filesystem short."""
        self._require_pool()
        return self._bind(device_id, size_bytes)

    def active_path(self, device_id: int) -> str | None:
        """The loop bound to the device's file now (the index, checked by the kernel), or None."""
        bound = self._backing(device_id)
        return bound[0] if bound else None

    def activate_all(self, devices: Sequence[tuple[int, int]]) -> dict[int, str | ManagerError]:
        """`activate` of each, the pool checked once: after a reboot every VM's disk is bound
        again before anything is answered. One after another: binding a loop takes the
        kernel 0.07-0.15 ms here, and threads neither made it faster (two or four: the same
        time for 1,000 disks) nor left it correct (they drew the same free loop and one of
        them lost 16 times in a row)."""
        self._require_pool()
        return activate_each(self._bind, devices)

    def _bind(self, device_id: int, size_bytes: int) -> str:
        """`activate` in a pool known to exist."""
        path = self._file(device_id)
        existing = self._backing(device_id)
        if existing:
            return existing[0]
        try:
            current = path.stat().st_size
        except FileNotFoundError:
            raise ManagerError(f"device {device_name(device_id)} does not exist in the pool") from None
        if size_bytes < current:
            raise ManagerError(f"cannot activate {device_name(device_id)} at {size_bytes} bytes: it holds {current}")
        if size_bytes > current:
            os.truncate(path, size_bytes)
        self._loops.attaching(device_id)
        try:
            device = loop.attach(path)
        except BaseException:
            self._loops.forget(device_id)
            raise
        self._loops.attached(device_id, device)
        log.debug("device activated", device_name=device_name(device_id), device=device)
        return device

    def deactivate(self, device_id: int) -> None:
        """Detach the device's loop; inactive is fine; a mounted device is refused."""
        for dev in self._backing(device_id):
            mounted_at = [m.target for m in mounts() if m.source == dev]
            if mounted_at:
                raise ManagerError(f"device {device_name(device_id)} ({dev}) is mounted at {mounted_at[0]}; "
                                   "unmount it first")
            loop.detach(dev)
            if loop.backing_identity(dev) is None:  # still bound: held open, detached when its user lets go
                self._loops.forget(device_id)
            log.debug("device deactivated", device_name=device_name(device_id), device=dev)

    def delete(self, device_id: int) -> None:
        """Delete the device's file; absent is fine; an active device is refused (the caller deactivates)."""
        path = self._file(device_id)
        self._require_pool()
        try:
            # XFS frees an unlinked file's blocks in the background (inodegc), and neither
            # statfs nor syncfs reliably waits for it; a truncate frees them in its own
            # transaction. So the pool's usage is right the moment delete returns (eviction
            # and admission read it to know what an eviction freed).
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            # The one call that destroys data asks the index, then the kernel: a loop bound by
            # hand, which the index never saw, holds the file open and must not have it cut to
            # zero. Only then (or where the filesystem grants no leases) is every loop listed,
            # to name it.
            active = self._backing(device_id)
            if not active and _opened_elsewhere(fd) is not False:
                active = loop.find_backing(path)
            if active:
                raise ManagerError(f"device {device_name(device_id)} is active ({active[0]}); deactivate it first")
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        fsync_dir(self.mount_point)
        _syncfs(self.mount_point)
        log.info("thin device deleted", device_name=device_name(device_id))

    def list_devices(self) -> list[DeviceInfo]:
        """Every `thin-<id>.img` in the pool, with the loop that backs it and where that is mounted."""
        self._require_pool()
        backing: dict[tuple[int, tuple[int, int] | None], str] = {}
        for attached in sorted(loop.loop_devices(), key=lambda d: d.device, reverse=True):
            if not attached.backing_deleted:
                backing[(attached.backing_inode, attached.backing_dev)] = attached.device  # the first by name wins
        mounted = {}
        for entry in reversed(mounts()):
            mounted[entry.source] = entry.target
        devices = []
        for path in self._device_files():
            device_id = device_id_from_name(path.name.removesuffix(IMAGE_SUFFIX))
            assert device_id is not None  # _device_files yields only our names
            st = path.stat(follow_symlinks=False)
            dev = backing.get((st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))))
            mounted_at = mounted.get(dev) if dev else None
            devices.append(DeviceInfo(device_id=device_id, name=device_name(device_id), active=dev is not None,
                                      path=dev, mounted_at=mounted_at))
        return sorted(devices, key=lambda d: d.device_id)


def _clone_or_copy(src: int, dst: int) -> str:
    """Reflink src into dst (FICLONE); where the filesystem cannot, copy its data extents."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return "reflink"
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            raise
    _sparse_copy(src, dst)
    return "copy"


def _sparse_copy(src: int, dst: int) -> None:
    """Copy only the data extents of src (SEEK_DATA/SEEK_HOLE), keeping holes as holes."""
    size = os.fstat(src).st_size
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        position = start
        while position < end:
            copied = os.copy_file_range(src, dst, min(COPY_CHUNK, end - position), position, position)
            if copied == 0:
                break
            position += copied
        offset = end


def _holds_data(path: Path) -> bool:
    """Whether any byte of the file was ever written: holes and fallocated-but-unwritten
    extents do not count (FIEMAP; ext4's SEEK_DATA reports unwritten extents as data).
    Where FIEMAP is unsupported the answer is the safe one: yes."""
    header = struct.Struct("=QQIIII")  # struct fiemap
    extent = struct.Struct("=QQQQQIIII")  # struct fiemap_extent
    batch = 128
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            request = bytearray(header.pack(start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, batch, 0))
            request += bytes(extent.size * batch)
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
            except OSError:
                return True
            mapped = header.unpack_from(request)[3]
            if mapped == 0:
                return False
            for i in range(mapped):
                logical, _, length, _, _, flags, _, _, _ = extent.unpack_from(request, header.size + i * extent.size)
                if not flags & FIEMAP_EXTENT_UNWRITTEN:
                    return True
                if flags & FIEMAP_EXTENT_LAST:
                    return False
                start = logical + length
    finally:
        os.close(fd)


def _reflink_works(directory: Path) -> bool:
    """Whether FICLONE works in `directory` (probed on two small temporary files)."""
    a, b = directory / ".reflink-probe-a", directory / ".reflink-probe-b"
    try:
        a.write_bytes(b"\0" * 4096)
        with open(a, "rb") as src, open(b, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        return False
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def _opened_elsewhere(fd: int) -> bool | None:
    """Whether the file `fd` has open is open anywhere else too (a loop bound to it holds
    it open): the kernel grants a write lease only to a file's sole opener (fcntl(2),
    F_SETLEASE), one call whatever the host's number of loops. None: this filesystem grants
    no leases. The lease is let go at once (a second opener while it is held would have the
    kernel signal this process: SIGIO, which the CLI ignores)."""
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    return False


def _syncfs(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _LIBC.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {directory} failed")
    finally:
        os.close(fd)


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"
