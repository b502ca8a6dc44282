"""The `devicemapper` backend: a dm-thin pool on two loop-backed files, as in the guide.

    pool_meta, pool_data   files in the state directory (sparse; 1 MB + 2 GB by default)
    /dev/mapper/pool       `0 <data sectors> thin-pool <meta loop> <data loop> 2048 32768`
                           (2048: 1 MiB data blocks; `--data-block-size` picks another for a new pool)
    /dev/mapper/thin-<id>  `0 <sectors> thin /dev/mapper/pool <id>`, one per active device

After a reboot or kernel panic the loops and the pool are gone but the files are not:
ensure_pool_exists() re-attaches the existing files and reloads the same table, so the
thin devices and their data come back. The data block size is fixed when the pool is
created (the kernel refuses a table whose size differs from the metadata's), so
re-attaching reads it back from the metadata superblock. Only a brand-new pool gets
zeroed metadata (the kernel formats metadata whose superblock is all zeros).

dmsetup and thin_ls are run by devices/dmsetup.py, `losetup -c` by devices/loop.py: each
with a timeout (outliving it raises CommandTimeout, a hazard: a D-state dm call is how
kernels hang), each failure a ToolFailed whose errno (EEXIST, ENODATA, ENXIO, EBUSY) is
read once there from the tool's output and tested here.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from devices import dmsetup, loop
from devices.base import (DeviceExists, DeviceInfo, OriginMissing, PoolConfig, PoolStatus, PoolUnhealthy, activate_each,
                          check_growth, device_id_from_name, device_name)
from devices.dmstatus import DmStatusError, parse_pool_status
from devices.limits import SizeLimit
from devices.mount import mounts
from support.errors import ManagerError, PermanentError
from support.log import get_logger
from support.proc import ToolFailed
from support.retry import Backoff, retrying

log = get_logger("devices.devicemapper", component="pool-manager")

SECTOR = 512
MIB = 1024**2
DEFAULT_DATA_BLOCK_BYTES = MIB  # 2048 sectors, the guide's table
MIN_DATA_BLOCK_SECTORS = 128  # the kernel's bounds: 64 KiB to 1 GiB, in multiples of 64 KiB
MAX_DATA_BLOCK_SECTORS = 2097152
LOW_WATER_MARK = 32768
METADATA_BLOCK = 4096
MAPPINGS_PER_LEAF = 126
PLANNED_DEVICES = 128  # layers + VM snapshots a pool's metadata is sized for at least
MIN_FREE_FRACTION = 0.10
THIN_SUPERBLOCK_MAGIC = 27022010
SUPERBLOCK_MAGIC_OFFSET = 32
SUPERBLOCK_DATA_BLOCK_SIZE_OFFSET = 336  # struct thin_disk_superblock: __le32 data_block_size, in sectors
BUSY_RETRIES = 3
BUSY_BACKOFF = Backoff(initial=0.5, max_wait=1.0, jitter=0.25)  # 0.5 s then 1 s: a racing opener closes


def data_block_sectors(size_bytes: int) -> int:
    """The thin-pool table's block size for `size_bytes`; a size dm-thin refuses is a one-line error."""
    sectors, remainder = divmod(size_bytes, SECTOR)
    if remainder or not MIN_DATA_BLOCK_SECTORS <= sectors <= MAX_DATA_BLOCK_SECTORS \
            or sectors % MIN_DATA_BLOCK_SECTORS:
        raise PermanentError(f"invalid data block size {size_bytes} bytes ({size_bytes / 1024:g} KiB): "
                             "dm-thin takes 64 KiB to 1 GiB in multiples of 64 KiB (e.g. 64K, 512K, 1M)")
    return sectors


def metadata_bytes_needed(data_bytes: int, block_sectors: int, devices: int = PLANNED_DEVICES) -> int:
    """thin_metadata_size's estimate: the mapping leaves (half full, 126 entries per 4 KiB
    node) for every data block, plus a root node per thin device."""
    blocks = -(-data_bytes // (block_sectors * SECTOR))
    return METADATA_BLOCK * (-(-blocks // MAPPINGS_PER_LEAF) + devices)


def recorded_data_block_sectors(head: bytes) -> int | None:
    """The data block size a pool's metadata superblock records, or None for unformatted metadata."""
    if len(head) < SUPERBLOCK_DATA_BLOCK_SIZE_OFFSET + 4 or not any(head):
        return None
    if struct.unpack_from("<Q", head, SUPERBLOCK_MAGIC_OFFSET)[0] != THIN_SUPERBLOCK_MAGIC:
        return None
    return int(struct.unpack_from("<I", head, SUPERBLOCK_DATA_BLOCK_SIZE_OFFSET)[0])


class DevicemapperPool:
    backend_name = "devicemapper"

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.meta_file = self.directory / "pool_meta"
        self.data_file = self.directory / "pool_data"
        self.pool_name = config.pool_name
        self.pool_path = f"/dev/mapper/{self.pool_name}"
        # None: no preference (a new pool gets the guide's 1 MiB, an existing one keeps its own)
        self.requested_block_sectors = (data_block_sectors(config.data_block_bytes)
                                        if config.data_block_bytes is not None else None)
        self._live_block_sectors: int | None = None  # read from the live table once; it never changes

    # -- dmsetup ----------------------------------------------------------------------

    def _message(self, text: str) -> None:
        dmsetup.message(self.pool_name, text)

    def _remove(self, name: str) -> None:
        """`dmsetup remove`, idempotent; EBUSY (a racing opener) is retried a few times,
        with the product's back-off (support/retry.py)."""
        from tenacity import retry_if_exception

        busy = retry_if_exception(lambda exc: isinstance(exc, ToolFailed) and exc.errno == errno.EBUSY)
        for attempt in retrying(BUSY_BACKOFF, attempts=BUSY_RETRIES, retry=busy):
            with attempt:
                try:
                    dmsetup.remove(name)
                    return
                except ToolFailed as exc:
                    if exc.errno in dmsetup.GONE or not dmsetup.is_active(name):
                        return
                    raise

    # -- the pool ---------------------------------------------------------------------

    def ensure_pool_exists(self) -> PoolStatus:
        """Create the pool when missing; after a reboot re-attach the existing files."""
        status = self.get_pool_status()
        if status.exists:
            return status
        log.info("pool does not exist, attempting to create", pool_name=self.pool_name)
        self.directory.mkdir(parents=True, exist_ok=True)
        block_sectors = self.requested_block_sectors or DEFAULT_DATA_BLOCK_BYTES // SECTOR
        if not self.meta_file.exists() and not self.data_file.exists():
            log.info("creating new thin pool", pool_name=self.pool_name, backend=self.backend_name,
                     data_size=self.config.data_size_bytes, metadata_size=self.config.metadata_size_bytes,
                     data_block_bytes=block_sectors * SECTOR)
            self._create_files(block_sectors)
        elif not (self.meta_file.exists() and self.data_file.exists()):
            present = self.meta_file if self.meta_file.exists() else self.data_file
            raise ManagerError(f"only {present} exists; refusing to build a pool around half of one")
        else:
            block_sectors = self._check_existing_metadata() or block_sectors
            log.info("re-attaching existing pool files", pool_name=self.pool_name, path=str(self.directory),
                     data_block_bytes=block_sectors * SECTOR)
        attached: list[str] = []
        try:
            meta_dev = self._loop_for(self.meta_file, attached)
            data_dev = self._loop_for(self.data_file, attached)
            data_sectors = self.data_file.stat().st_size // SECTOR
            table = f"0 {data_sectors} thin-pool {meta_dev} {data_dev} {block_sectors} {LOW_WATER_MARK}"
            dmsetup.create(self.pool_name, table)
            self._live_block_sectors = block_sectors
        except BaseException:
            for device in attached:
                loop.detach(device)
            raise
        status = self.get_pool_status()
        log.info("thin pool created successfully", pool_name=self.pool_name, metadata_device=meta_dev,
                 data_device=data_dev)
        return status

    def _create_files(self, block_sectors: int) -> None:
        """Sparse files under temporary names, renamed into place only when complete. The
        metadata file is at least what its data needs at this block size: at 64 KiB blocks a
        2 GiB pool's mappings alone outgrow the guide's 1 MB, and a pool out of metadata
        space turns read-only."""
        metadata_size = self.config.metadata_size_bytes
        needed = metadata_bytes_needed(self.config.data_size_bytes, block_sectors)
        if needed > metadata_size:
            metadata_size = -(-needed // MIB) * MIB
            log.info("pool metadata sized for its data block size", pool_name=self.pool_name,
                     requested=self.config.metadata_size_bytes, metadata_size=metadata_size,
                     data_block_bytes=block_sectors * SECTOR)
        for path, size in ((self.data_file, self.config.data_size_bytes), (self.meta_file, metadata_size)):
            fresh = path.with_name(path.name + ".new")
            with open(fresh, "wb") as fh:
                fh.truncate(size)
                # All-zero superblock: the kernel formats fresh metadata instead of reading garbage.
                fh.write(b"\0" * 4096)
                os.fsync(fh.fileno())
            os.replace(fresh, path)

    def _check_existing_metadata(self) -> int | None:
        """The data block size the existing metadata records (None: never formatted, a crash
        before the first create, so formatting it loses nothing). Refuses files that are not
        dm-thin metadata (e.g. a blockfile pool's pool_meta): the kernel would reject them, or
        with an all-zero block silently format them."""
        with open(self.meta_file, "rb") as fh:
            head = fh.read(4096)
        if not any(head):
            return None
        recorded = recorded_data_block_sectors(head)
        if recorded is None:
            raise ManagerError(f"{self.meta_file} exists but holds no dm-thin metadata; refusing to use it")
        if self.requested_block_sectors not in (None, recorded):
            log.warning("pool data block size is fixed at creation; keeping the pool's", pool_name=self.pool_name,
                        data_block_bytes=recorded * SECTOR, requested_bytes=self.requested_block_sectors * SECTOR)
        return recorded

    @staticmethod
    def _loop_for(path: Path, attached: list[str]) -> str:
        existing = loop.find_backing(path)
        if existing:
            return existing[0]
        device = loop.attach(path)
        attached.append(device)
        return device

    def get_pool_status(self) -> PoolStatus:
        """`dmsetup status pool`, parsed; exists=False when there is no such mapping."""
        line = dmsetup.status(self.pool_name)
        if line is None:
            return PoolStatus(backend=self.backend_name, exists=False)
        try:
            parsed = parse_pool_status(line)
        except DmStatusError as exc:
            raise ManagerError(f"{self.pool_name} is not a thin-pool this manager can use: {exc}") from None
        return PoolStatus(
            backend=self.backend_name, exists=True,
            needs_check=parsed.needs_check, read_only=parsed.read_only, error_state=parsed.failed,
            out_of_data_space=parsed.out_of_data_space, transaction_id=parsed.transaction_id,
            used_data_blocks=parsed.used_data_blocks, total_data_blocks=parsed.total_data_blocks,
            used_metadata_blocks=parsed.used_metadata_blocks, total_metadata_blocks=parsed.total_metadata_blocks,
            data_block_bytes=self._block_sectors() * SECTOR, raw=line,
        )

    def _pool_table(self) -> list[str]:
        """`<start> <length> thin-pool <meta> <data> <block size> <low water mark> [features]`."""
        fields = dmsetup.table(self.pool_name).split()
        if len(fields) < 7 or fields[2] != "thin-pool" or not fields[5].isdigit():
            raise ManagerError(f"{self.pool_name} has no thin-pool table: {' '.join(fields)}")
        return fields

    def _block_sectors(self) -> int:
        """The live pool's data block size, from its table (read once per pool object)."""
        if self._live_block_sectors is None:
            self._live_block_sectors = int(self._pool_table()[5])
        return self._live_block_sectors

    def validate_pool_health(self) -> PoolStatus:
        """Status, or PoolUnhealthy naming every problem."""
        status = self.get_pool_status()
        if not status.exists:
            raise PoolUnhealthy(f"pool {self.pool_name} does not exist; run `flyio-image-manager setup-pool`")
        if not status.healthy:
            problems = [name for name, bad in (("error state (Fail)", status.error_state),
                                               ("needs_check", status.needs_check),
                                               ("read-only", status.read_only),
                                               ("out of data space", status.out_of_data_space)) if bad]
            raise PoolUnhealthy(f"pool {self.pool_name} is unhealthy: {', '.join(problems)}")
        return status

    def teardown_pool(self) -> None:
        """Remove every thin mapping, the pool, and detach its loops (as a reboot would); files stay."""
        for device in self._active_ids():
            self.deactivate(device)
        self._remove(self.pool_name)
        for path in (self.meta_file, self.data_file):
            for device in loop.find_backing(path):
                loop.detach(device)

    def max_device_bytes(self) -> SizeLimit:
        """dm-thin maps 64-bit virtual block numbers: the bound is the kernel's block device
        (a loff_t of whole sectors); devices/limits.py adds ext4's and SQLite's."""
        from devices.limits import BLOCK_DEVICE_LIMIT

        return BLOCK_DEVICE_LIMIT

    def grow_pool(self, *, data_size_bytes: int | None = None, metadata_size_bytes: int | None = None) -> PoolStatus:
        """Extend the backing file(s), `losetup -c` their loops, then reload the pool's
        table (data: the new length) and resume: dm-thin resizes its data and metadata
        devices on resume. Thin devices stay active and mounted; their I/O waits out the
        suspend. A power cut at any point: re-attach builds the table from the files'
        actual sizes, and the kernel grows the pool to them on its first resume."""
        status = self.get_pool_status()
        if not status.exists:
            raise PoolUnhealthy(f"pool {self.pool_name} does not exist; run `flyio-image-manager setup-pool`")
        for path, wanted, what in ((self.data_file, data_size_bytes, "data"),
                                   (self.meta_file, metadata_size_bytes, "metadata")):
            if wanted is None:
                continue
            current = path.stat().st_size
            if check_growth(what, current, wanted):
                with open(path, "r+b") as fh:
                    fh.truncate(wanted)
                    os.fsync(fh.fileno())
                log.info("pool file extended", path=str(path), old_size=current, new_size=wanted)
            for device in loop.find_backing(path):
                loop.refresh_capacity(device)
        if data_size_bytes is None and metadata_size_bytes is None:
            return status
        self._reload_pool_table()
        status = self.get_pool_status()
        log.info("pool grown", pool_name=self.pool_name, backend=self.backend_name,
                 data_bytes=status.total_data_blocks * status.data_block_bytes,
                 metadata_blocks=status.total_metadata_blocks)
        return status

    def _reload_pool_table(self) -> None:
        """The pool's table with the data file's current length: suspend, reload, resume
        (resumed in finally: a pool left suspended would hang every thin device)."""
        fields = self._pool_table()
        fields[1] = str(self.data_file.stat().st_size // SECTOR)
        dmsetup.suspend(self.pool_name)
        try:
            dmsetup.reload(self.pool_name, " ".join(fields))
        finally:
            dmsetup.resume(self.pool_name)

    # -- devices ----------------------------------------------------------------------

    def _require_space(self) -> None:
        status = self.validate_pool_health()
        free = 1 - status.data_used_fraction
        if free < MIN_FREE_FRACTION:
            raise PoolUnhealthy(f"pool has too little free space: {free:.1%} free < {MIN_FREE_FRACTION:.0%}")

    def create_thin(self, device_id: int, size_bytes: int) -> None:
        """`create_thin <id>` (the size is given at activation; dm-thin stores none)."""
        self._require_space()
        try:
            self._message(f"create_thin {device_id}")
        except ToolFailed as exc:
            if exc.errno == errno.EEXIST:
                raise DeviceExists(f"device {device_name(device_id)} already exists in the pool") from None
            raise

    def create_snapshot(self, device_id: int, origin_id: int) -> None:
        """`create_snap <id> <origin>`; an active origin is suspended around it (resumed in finally)
        so its in-flight writes are either in the snapshot or after it, never half."""
        self._require_space()
        origin = device_name(origin_id)
        suspended = False
        try:
            if dmsetup.is_active(origin):
                dmsetup.suspend(origin)
                suspended = True
            self._message(f"create_snap {device_id} {origin_id}")
        except ToolFailed as exc:
            if exc.errno == errno.EEXIST:
                raise DeviceExists(f"device {device_name(device_id)} already exists in the pool") from None
            if exc.errno == errno.ENODATA:
                raise OriginMissing(f"snapshot origin {origin} does not exist in the pool") from None
            raise
        finally:
            if suspended:
                dmsetup.resume(origin)

    def active_path(self, device_id: int) -> str | None:
        """/dev/mapper/thin-<id> when that mapping exists (`dmsetup info` of it), or None."""
        name = device_name(device_id)
        return f"/dev/mapper/{name}" if dmsetup.is_active(name) else None

    def activate_all(self, devices: Sequence[tuple[int, int]]) -> dict[int, str | ManagerError]:
        """One `dmsetup create` after another: table loads of one pool are not overlapped."""
        return activate_each(self.activate, devices)

    def activate(self, device_id: int, size_bytes: int) -> str:
        """`dmsetup create thin-<id>`; an already active device just gets its path back."""
        name = device_name(device_id)
        path = f"/dev/mapper/{name}"
        if dmsetup.is_active(name):
            if not Path(path).exists():
                dmsetup.mknodes(name)
            return path
        sectors = size_bytes // SECTOR
        try:
            dmsetup.create(name, f"0 {sectors} thin {self.pool_path} {device_id}")
        except ToolFailed as exc:
            if exc.errno == errno.ENODATA:
                raise ManagerError(f"device {name} does not exist in the pool") from None
            raise
        return path

    def deactivate(self, device_id: int) -> None:
        """Remove the mapping; the device's data stays in the pool. Idempotent."""
        self._remove(device_name(device_id))

    def delete(self, device_id: int) -> None:
        """`delete <id>`: free its blocks. Absent is fine (ENODATA); active is refused."""
        name = device_name(device_id)
        if dmsetup.is_active(name):
            raise ManagerError(f"device {name} is active; deactivate it first")
        try:
            self._message(f"delete {device_id}")
        except ToolFailed as exc:
            if exc.errno != errno.ENODATA:
                raise

    def _active_ids(self) -> list[int]:
        ids = []
        for name in dmsetup.names("thin"):
            device_id = device_id_from_name(name)
            if device_id is not None:
                ids.append(device_id)
        return sorted(ids)

    def pool_device_ids(self) -> list[int]:
        """Thin ids in the pool's metadata, read by `thin_ls` from a reserved metadata
        snapshot (the live metadata changes under a reader otherwise)."""
        meta = loop.find_backing(self.meta_file)
        if not meta or not self.get_pool_status().exists:
            return []
        try:
            self._message("reserve_metadata_snap")
        except ToolFailed as exc:
            if exc.errno not in (errno.EEXIST, errno.EINVAL, errno.EBUSY):  # 6.1 says EBUSY
                raise
            # One left reserved by a process that died between reserve and release.
            self._message("release_metadata_snap")
            self._message("reserve_metadata_snap")
        try:
            return dmsetup.thin_ids(meta[0])
        finally:
            self._message("release_metadata_snap")

    def list_devices(self) -> list[DeviceInfo]:
        """Every thin device: active mappings named thin-*, plus inactive ids from pool metadata."""
        active = set(self._active_ids())
        try:
            in_pool = set(self.pool_device_ids())
        except ManagerError as exc:
            log.warning("cannot read thin ids from pool metadata; listing active devices only", error=str(exc))
            in_pool = set()
        mounted_at = {m.source: m.target for m in mounts()}
        devices = []
        for device_id in sorted(active | in_pool):
            name = device_name(device_id)
            path = f"/dev/mapper/{name}" if device_id in active else None
            devices.append(DeviceInfo(device_id=device_id, name=name, active=device_id in active, path=path,
                                      mounted_at=mounted_at.get(path) if path else None))
        return devices
