"""The `blockfile` backend, for kernels without dm-thin: each thin device is a sparse file
in the pool, attached to a real loop device when active; a snapshot is a reflink copy.

The pool itself is the guide's two files in the state directory: `pool_data`, a sparse
file formatted XFS with reflink=1 and loop-mounted at `<dir>/pool` (so snapshots are
copy-on-write whatever the host filesystem is), and `pool_meta`, a small JSON record of
the pool's configuration. After a reboot the existing files are re-attached, never
reformatted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from devices import loop
from devices.base import DeviceExists, DeviceInfo, PoolConfig, PoolStatus, PoolUnhealthy, device_name, device_id_from_name
from devices.mount import mount, mounts, unmount
from support.errors import ManagerError
from support.log import get_logger
from support.proc import run_command

log = get_logger("devices.blockfile", component="pool-manager")

FICLONE = 0x40049409
XFS_MAGIC = b"XFSB"
MIN_FREE_FRACTION = 0.05
COPY_CHUNK = 8 << 20


class BlockfilePool:
    backend_name = "blockfile"

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.data_file = self.directory / "pool_data"
        self.meta_file = self.directory / "pool_meta"
        self.mount_point = self.directory / "pool"

    # -- the pool ---------------------------------------------------------------------

    def _pool_loop(self) -> str | None:
        found = loop.find_backing(self.data_file)
        return found[0] if found else None

    def _mounted(self) -> bool:
        target = os.path.realpath(self.mount_point)
        return any(m.target == target for m in mounts())

    def ensure_pool_exists(self) -> PoolStatus:
        """Create the pool when missing; after a reboot re-attach and re-mount its files."""
        if self._mounted():
            return self.get_pool_status()
        log.info("pool does not exist, attempting to create", pool_name=self.config.pool_name)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.data_file.exists():
            log.info("creating new thin pool", pool_name=self.config.pool_name, backend=self.backend_name,
                     data_size=self.config.data_size_bytes)
            # Formatted under a temporary name, so a failed mkfs never leaves a pool_data
            # that a later start would refuse as "not a pool".
            fresh = self.data_file.with_name("pool_data.new")
            with open(fresh, "wb") as fh:
                fh.truncate(self.config.data_size_bytes)
            run_command(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(fresh)], timeout=120)
            os.replace(fresh, self.data_file)
            self._write_meta()
        elif self._read_magic() != XFS_MAGIC:
            raise ManagerError(f"{self.data_file} exists but holds no XFS pool; refusing to format it")
        else:
            log.info("re-attaching existing pool files", pool_name=self.config.pool_name, path=str(self.data_file))
        device = self._pool_loop() or loop.attach(self.data_file)
        self.mount_point.mkdir(exist_ok=True)
        mount(device, self.mount_point, fstype="xfs")
        status = self.get_pool_status()
        log.info("thin pool created successfully", pool_name=self.config.pool_name, device=device)
        return status

    def _write_meta(self) -> None:
        meta = {"backend": self.backend_name, "data_size_bytes": self.config.data_size_bytes,
                "metadata_size_bytes": self.config.metadata_size_bytes}
        with open(self.meta_file, "wb") as fh:
            fh.truncate(self.config.metadata_size_bytes)
            fh.write(json.dumps(meta).encode())
            os.fsync(fh.fileno())

    def _read_magic(self) -> bytes:
        with open(self.data_file, "rb") as fh:
            return fh.read(4)

    def get_pool_status(self) -> PoolStatus:
        if not self._mounted():
            return PoolStatus(backend=self.backend_name, exists=False)
        st = os.statvfs(self.mount_point)
        options = next((m.options for m in mounts() if m.target == os.path.realpath(self.mount_point)), ())
        return PoolStatus(
            backend=self.backend_name, exists=True,
            read_only="ro" in options,
            error_state=not self.data_file.exists(),
            out_of_data_space=st.f_bavail == 0,
            used_data_blocks=st.f_blocks - st.f_bfree, total_data_blocks=st.f_blocks,
            used_metadata_blocks=st.f_files - st.f_ffree, total_metadata_blocks=st.f_files,
            data_block_bytes=st.f_frsize,
            raw=f"xfs on {self._pool_loop()} at {self.mount_point}",
        )

    def validate_pool_health(self) -> PoolStatus:
        status = self.get_pool_status()
        if not status.exists:
            raise PoolUnhealthy(f"pool {self.config.pool_name} does not exist; run `flyio-image-manager setup-pool`")
        if not status.healthy:
            problems = [name for name, bad in (("error state", status.error_state), ("read-only", status.read_only),
                                               ("out of data space", status.out_of_data_space)) if bad]
            raise PoolUnhealthy(f"pool {self.config.pool_name} is unhealthy: {', '.join(problems)}")
        return status

    def teardown_pool(self) -> None:
        """Deactivate every device, unmount and detach the pool (as a reboot would); files stay."""
        for device in self.list_devices():
            if device.active:
                self.deactivate(device.device_id)
        if self._mounted():
            unmount(self.mount_point)
        pool_loop = self._pool_loop()
        if pool_loop:
            loop.detach(pool_loop)

    # -- devices ----------------------------------------------------------------------

    def _file(self, device_id: int) -> Path:
        return self.mount_point / f"{device_name(device_id)}.img"

    def _require_space(self) -> None:
        status = self.validate_pool_health()
        free = 1 - status.data_used_fraction
        if free < MIN_FREE_FRACTION:
            raise PoolUnhealthy(f"pool has too little free space: {free:.1%} free < {MIN_FREE_FRACTION:.0%}")

    def _create_file(self, device_id: int) -> int:
        try:
            return os.open(self._file(device_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise DeviceExists(f"device {device_name(device_id)} already exists in the pool") from None

    def _sync_dir(self) -> None:
        fd = os.open(self.mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create_thin(self, device_id: int, size_bytes: int) -> None:
        self._require_space()
        fd = self._create_file(device_id)
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_dir()

    def create_snapshot(self, device_id: int, origin_id: int) -> None:
        """A reflink copy of origin (a full sparse copy where reflink is missing).

        The origin must not be mounted read-write: a clone of a live filesystem is not
        crash-consistent. An active origin is flushed first (the dm equivalent: suspend)."""
        origin = self._file(origin_id)
        if not origin.exists():
            raise ManagerError(f"snapshot origin {device_name(origin_id)} does not exist in the pool")
        for dev in loop.find_backing(origin):
            for m in mounts():
                if m.source == dev and "rw" in m.options:
                    raise ManagerError(f"snapshot origin {device_name(origin_id)} is mounted read-write at {m.target}")
            run_command(["blockdev", "--flushbufs", dev], timeout=60)
        self._require_space()
        src = os.open(origin, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = self._create_file(device_id)
            try:
                try:
                    fcntl.ioctl(dst, FICLONE, src)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                        raise
                    _sparse_copy(src, dst)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self._sync_dir()

    def activate(self, device_id: int, size_bytes: int) -> str:
        path = self._file(device_id)
        if not path.exists():
            raise ManagerError(f"device {device_name(device_id)} does not exist in the pool")
        existing = loop.find_backing(path)
        return existing[0] if existing else loop.attach(path)

    def deactivate(self, device_id: int) -> None:
        for dev in loop.find_backing(self._file(device_id)):
            loop.detach(dev)

    def delete(self, device_id: int) -> None:
        path = self._file(device_id)
        if loop.find_backing(path):
            raise ManagerError(f"device {device_name(device_id)} is active; deactivate it first")
        path.unlink(missing_ok=True)
        if self._mounted():
            self._sync_dir()

    def list_devices(self) -> list[DeviceInfo]:
        if not self._mounted():
            return []
        loops = loop.list_loops()
        mounted_at = {m.source: m.target for m in mounts()}
        devices = []
        for entry in sorted(self.mount_point.iterdir()):
            device_id = device_id_from_name(entry.name.removesuffix(".img"))
            if device_id is None or not entry.name.endswith(".img"):
                continue
            backing = sorted(dev for dev, file in loops.items() if file == str(entry.resolve()))
            path = backing[0] if backing else None
            devices.append(DeviceInfo(device_id=device_id, name=device_name(device_id), active=bool(backing),
                                      path=path, mounted_at=mounted_at.get(path) if path else None))
        return devices


def _sparse_copy(src: int, dst: int) -> None:
    """Copy only the data extents of src (SEEK_DATA/SEEK_HOLE), keeping holes as holes."""
    size = os.fstat(src).st_size
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
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
