"""The blockfile backend on real parts: an XFS reflink pool on a loop device, thin devices
as sparse files on loop devices, real mkfs.ext4 and mounts. Every test checks that it
left no loop device and no mount behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.base import DeviceExists, PoolConfig, PoolUnhealthy
from devices.blockfile import BlockfilePool
from devices.filesystem import make_filesystem
from devices.loop import attach, detach, find_backing, list_loops
from devices.mount import mount_entry, mounted, mounts, unmount
from support.errors import ManagerError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount"),
    pytest.mark.skipif(not Path("/dev/loop-control").exists(), reason="no loop devices (/dev/loop-control)"),
]
SIZE = 128 * 1024**2
POOL_SIZE = 1024**3
MiB = 1024**2


def loops_under(directory: Path) -> list[str]:
    return sorted(dev for dev, backing in list_loops().items() if backing.startswith(f"{directory}/"))


def mounts_under(directory: Path) -> list[str]:
    return [m.target for m in mounts() if m.target.startswith(f"{directory}/")]


def release_everything_under(directory: Path) -> tuple[list[str], list[str]]:
    """Unmount and detach whatever is left under `directory`; returns what was left."""
    leaked_mounts, leaked_loops = mounts_under(directory), loops_under(directory)
    for target in reversed(leaked_mounts):
        unmount(target)
    for dev in loops_under(directory):  # the pool's loop is only detachable once unmounted
        detach(dev)
    return leaked_mounts, leaked_loops


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state directory; after the test, teardown_pool must have left no loop and no mount."""
    assert loops_under(tmp_path) == []
    yield tmp_path / "state"
    leaked = release_everything_under(tmp_path)
    assert leaked == ([], []), "the test leaked mounts or loop devices"


@pytest.fixture
def pool(state: Path) -> Iterator[BlockfilePool]:
    pool = BlockfilePool(PoolConfig(directory=str(state), data_size_bytes=POOL_SIZE))
    try:
        yield pool
    finally:
        pool.teardown_pool()


def write_file(device: str, target: Path, name: str, data: bytes) -> None:
    target.mkdir(exist_ok=True)
    with mounted(device, target):
        (target / name).write_bytes(data)


def read_file(device: str, target: Path, name: str) -> bytes:
    target.mkdir(exist_ok=True)
    with mounted(device, target, read_only=True):
        return (target / name).read_bytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pool_is_created_once_and_reports_sane_numbers(pool: BlockfilePool, state: Path) -> None:
    first = pool.ensure_pool_exists()
    data_inode = (state / "pool_data").stat().st_ino
    again = pool.ensure_pool_exists()
    assert (state / "pool_data").stat().st_ino == data_inode
    assert first.backend == "blockfile" and first.exists and first.healthy and again.healthy
    assert first.data_block_bytes == 4096
    assert 0 < first.used_data_blocks < first.total_data_blocks
    assert 0.9 * POOL_SIZE < first.total_data_blocks * first.data_block_bytes <= POOL_SIZE
    assert first.data_used_fraction < 0.1 and 0 < first.total_metadata_blocks
    assert len(find_backing(state / "pool_data")) == 1
    entry = mount_entry(state / "pool")
    assert entry is not None and entry.fstype == "xfs" and {"nodev", "nosuid", "rw"} <= set(entry.options)
    assert "reflink=1" in subprocess.run(["xfs_info", str(state / "pool")], capture_output=True, text=True).stdout
    meta = state / "pool_meta"
    assert meta.stat().st_size == pool.config.metadata_size_bytes
    assert json.loads(meta.read_bytes().rstrip(b"\0"))["mode"] == "xfs"
    assert pool.list_devices() == []


def test_thin_device_lifecycle(pool: BlockfilePool, tmp_path: Path) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    image = Path(pool.config.directory) / "pool" / "thin-1.img"
    assert image.stat().st_size == SIZE and image.stat().st_blocks == 0  # sparse
    assert [(d.name, d.active) for d in pool.list_devices()] == [("thin-1", False)]  # create != activate
    with pytest.raises(DeviceExists, match="thin-1 already exists"):
        pool.create_thin(1, SIZE)
    device = pool.activate(1, SIZE)
    assert device.startswith("/dev/loop") and pool.activate(1, SIZE) == device  # idempotent
    make_filesystem(device)
    target = tmp_path / "m1"
    target.mkdir()
    with mounted(device, target):
        (target / "hello").write_text("world")
        [info] = pool.list_devices()
        assert (info.active, info.path, info.mounted_at) == (True, device, str(target))
        with pytest.raises(ManagerError, match=f"thin-1 \\({device}\\) is mounted at {target}; unmount it first"):
            pool.deactivate(1)
    with pytest.raises(ManagerError, match="thin-1 is active .*deactivate it first"):
        pool.delete(1)
    pool.deactivate(1)
    pool.deactivate(1)  # idempotent
    assert find_backing(image) == []
    assert read_file(pool.activate(1, SIZE), target, "hello") == b"world"
    pool.deactivate(1)
    pool.delete(1)
    pool.delete(1)  # idempotent
    assert pool.list_devices() == [] and not image.exists()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_loop_bound_by_hand_keeps_its_file_from_delete(pool: BlockfilePool, read_only: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The index never saw a loop an operator bound with losetup; delete asks the kernel
    (a file lease: one call) and refuses, naming the loop, instead of cutting the file to
    zero under it. A delete with no such loop lists no loops at all."""
    import devices.blockfile as blockfile

    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    pool.create_thin(2, SIZE)
    image = pool.mount_point / "thin-1.img"
    with image.open("r+b") as f:
        f.write(b"the operator's data")
    by_hand = subprocess.run(["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(image)],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    try:
        with pytest.raises(ManagerError, match=rf"thin-1 is active \({by_hand}\); deactivate it first"):
            pool.delete(1)
        assert image.read_bytes()[:19] == b"the operator's data" and image.stat().st_size == SIZE
    finally:
        subprocess.run(["losetup", "--detach", by_hand], timeout=30, check=True)
    listings = []
    monkeypatch.setattr(blockfile.loop, "find_backing", lambda path: listings.append(path) or [])
    pool.delete(2)
    pool.delete(1)  # its loop gone: deleted now
    assert listings == [] and not image.exists()


def test_snapshot_is_a_reflink_and_independent_of_its_origin(pool: BlockfilePool, tmp_path: Path) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    origin = pool.activate(1, SIZE)
    make_filesystem(origin)
    payload = os.urandom(50 * MiB)
    write_file(origin, tmp_path / "m1", "data.bin", payload)
    pool.deactivate(1)

    before = pool.get_pool_status()
    pool.create_snapshot(2, 1)
    after = pool.get_pool_status()
    grown = (after.used_data_blocks - before.used_data_blocks) * after.data_block_bytes
    assert grown < 2 * MiB, f"a reflink snapshot of 50 MiB of data used {grown} bytes"
    with pytest.raises(DeviceExists):
        pool.create_snapshot(2, 1)

    snapshot = pool.activate(2, SIZE)
    assert digest(read_file(snapshot, tmp_path / "m2", "data.bin")) == digest(payload)
    write_file(snapshot, tmp_path / "m2", "data.bin", b"changed in the snapshot")
    origin = pool.activate(1, SIZE)
    assert digest(read_file(origin, tmp_path / "m1", "data.bin")) == digest(payload)
    write_file(origin, tmp_path / "m1", "other.bin", b"written to the origin later")
    with mounted(snapshot, tmp_path / "m2", read_only=True):
        assert (tmp_path / "m2" / "data.bin").read_bytes() == b"changed in the snapshot"
        assert not (tmp_path / "m2" / "other.bin").exists()


def test_snapshot_refuses_a_read_write_mounted_origin(pool: BlockfilePool, tmp_path: Path) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    origin = pool.activate(1, SIZE)
    make_filesystem(origin)
    target = tmp_path / "m"
    target.mkdir()
    with mounted(origin, target):
        with pytest.raises(ManagerError, match="origin thin-1 .* is mounted read-write at .*; unmount it first"):
            pool.create_snapshot(2, 1)
    assert [d.device_id for d in pool.list_devices()] == [1]  # nothing half-made
    with mounted(origin, target, read_only=True):  # read-only: consistent, allowed (flushed first)
        pool.create_snapshot(2, 1)
    with pytest.raises(ManagerError, match="snapshot origin thin-9 does not exist"):
        pool.create_snapshot(3, 9)
    assert [d.device_id for d in pool.list_devices()] == [1, 2]


def test_reboot_reattaches_the_existing_pool_file(pool: BlockfilePool, state: Path, tmp_path: Path) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    device = pool.activate(1, SIZE)
    make_filesystem(device)
    write_file(device, tmp_path / "m", "kept.txt", b"survives the reboot")
    pool.create_thin(2, SIZE)
    pool.activate(2, SIZE)
    data_inode = (state / "pool_data").stat().st_ino

    # A reboot: every loop and mount gone, the files stay.
    pool.teardown_pool()
    assert loops_under(state) == [] and mounts_under(state) == []
    assert not pool.get_pool_status().exists
    with pytest.raises(PoolUnhealthy, match="does not exist"):
        pool.list_devices()
    with pytest.raises(PoolUnhealthy, match="does not exist"):
        pool.delete(1)  # must not "succeed" against the empty mount point
    pool.deactivate(1)  # nothing active: fine

    status = BlockfilePool(PoolConfig(directory=str(state), data_size_bytes=POOL_SIZE)).ensure_pool_exists()
    assert status.healthy and (state / "pool_data").stat().st_ino == data_inode
    assert [(d.device_id, d.active) for d in pool.list_devices()] == [(1, False), (2, False)]
    assert read_file(pool.activate(1, SIZE), tmp_path / "m", "kept.txt") == b"survives the reboot"


def test_a_pool_file_left_attached_but_unmounted_reuses_its_loop(pool: BlockfilePool, state: Path) -> None:
    """A crash between losetup and mount: the next start mounts the loop that is there."""
    pool.ensure_pool_exists()
    pool.teardown_pool()
    left = attach(state / "pool_data")
    assert pool.ensure_pool_exists().healthy
    assert find_backing(state / "pool_data") == [left]
    entry = mount_entry(state / "pool")
    assert entry is not None and entry.source == left


def test_new_devices_are_refused_when_the_pool_is_nearly_full(pool: BlockfilePool, state: Path) -> None:
    status = pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    filler = state / "pool" / "filler"
    free = status.free_data_bytes
    subprocess.run(["fallocate", "-l", str(free - 50 * MiB), str(filler)], check=True, timeout=60)
    try:
        with pytest.raises(PoolUnhealthy, match=r"pool has too little free space: .* MiB free of .* \(.*% < 10%\)"):
            pool.create_thin(2, SIZE)
        with pytest.raises(PoolUnhealthy, match="too little free space"):
            pool.create_snapshot(2, 1)
        assert [d.device_id for d in pool.list_devices()] == [1]
        pool.delete(1)  # freeing space is always allowed
    finally:
        # XFS frees an unlinked file's blocks in the background (inodegc); a truncate frees
        # them in its own transaction, so the next statfs sees them (as the pool's delete does).
        os.truncate(filler, 0)
        filler.unlink()
    pool.create_thin(2, SIZE)


def test_pool_file_gone_is_an_error_state(pool: BlockfilePool, state: Path) -> None:
    pool.ensure_pool_exists()
    (state / "pool_data").unlink()
    status = pool.get_pool_status()
    assert status.exists and status.error_state and not status.healthy
    assert "pool_data is gone" in status.raw
    with pytest.raises(PoolUnhealthy, match="unhealthy: error state"):
        pool.create_thin(1, SIZE)


def test_ids_outside_the_dm_thin_range_are_refused(pool: BlockfilePool) -> None:
    pool.ensure_pool_exists()
    for bad in (-1, 2**24):
        with pytest.raises(ManagerError, match="invalid thin device id"):
            pool.create_thin(bad, SIZE)


def test_activate_grows_a_device_but_never_shrinks_it(pool: BlockfilePool) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    with pytest.raises(ManagerError, match="cannot activate thin-1 at"):
        pool.activate(1, SIZE // 2)
    device = pool.activate(1, 2 * SIZE)
    assert subprocess.run(["blockdev", "--getsize64", device], capture_output=True, text=True,
                          timeout=10).stdout.strip() == str(2 * SIZE)


def test_activate_all_binds_each_device_once_and_reports_each_refusal(pool: BlockfilePool) -> None:
    """A reboot's re-activation: several loops bound side by side, each device its own loop,
    the refusals (a missing device, a size below the file's) named per device, not raised."""
    from devices import loop

    pool.ensure_pool_exists()
    for device_id in range(1, 13):
        pool.create_thin(device_id, SIZE)
    already = pool.activate(3, SIZE)
    wanted = [(device_id, SIZE) for device_id in range(1, 13)] + [(40, SIZE)]
    wanted[5] = (6, SIZE // 2)
    paths = pool.activate_all(wanted)
    assert list(paths) == [device_id for device_id, _ in wanted]
    assert isinstance(paths[40], ManagerError) and "thin-40 does not exist" in str(paths[40])
    assert isinstance(paths[6], ManagerError) and "cannot activate thin-6 at" in str(paths[6])
    bound = {device_id: path for device_id, path in paths.items() if isinstance(path, str)}
    assert len(bound) == 11 and len(set(bound.values())) == 11 and bound[3] == already
    for device_id, path in bound.items():  # the kernel agrees with every answer
        assert loop.find_backing(pool.mount_point / f"thin-{device_id}.img") == [path]
    assert {d.device_id for d in pool.list_devices() if d.active} == set(bound)
    assert pool.activate_all([(device_id, SIZE) for device_id in bound]) == bound  # again: the same loops


def test_the_loop_index_is_believed_only_where_the_kernel_agrees(pool: BlockfilePool, state: Path) -> None:
    """The index (one record per device id in loops/slots) answers which loop backs a file
    without listing every loop; every way it can be wrong is settled by the kernel."""
    from devices import loop

    pool.ensure_pool_exists()
    for device_id in (1, 2, 3):
        pool.create_thin(device_id, SIZE)
    index = loop.LoopIndex(state / "loops", lambda: {})
    path = {device_id: pool.mount_point / f"thin-{device_id}.img" for device_id in (1, 2, 3)}

    bound = pool.activate(1, SIZE)
    assert index.lookup(1, path[1]) == [bound]
    assert (pool.active_path(1), pool.active_path(2), pool.active_path(9)) == (bound, None, None)
    assert (state / "loops" / "slots").stat().st_size == 2 * loop.LoopIndex.RECORD  # no file per device

    detach(bound)  # a loop detached behind the index's back: the stale record is dropped
    assert index.lookup(1, path[1]) == [] and index._read(1) is None

    index.attaching(2)  # a crash between the intent and the attach's record ...
    by_hand = attach(path[2])
    assert index.lookup(2, path[2]) == [by_hand]  # ... is settled by one listing, and recorded
    assert index._read(2) == by_hand

    with open(state / "loops" / "slots", "r+b") as slots:  # a record read mid-write: not trusted
        slots.seek(3 * loop.LoopIndex.RECORD)
        slots.write(b"/devloo9\x00\x00junk\n\x00\x00")
    other = attach(path[3])
    assert index.lookup(3, path[3]) == [other]
    assert index.lookup(3, path[1]) == []  # a record naming a loop of another file is not believed
    detach(other)
    detach(by_hand)


def test_the_loop_index_is_rebuilt_after_a_reboot_and_from_an_older_layout(pool: BlockfilePool,
                                                                          state: Path) -> None:
    """A boot id other than this boot's, or an index with no slots file (per-device files,
    as before), is rebuilt from one listing: a loop bound before is always found."""
    from devices import loop

    pool.ensure_pool_exists()
    for device_id in (1, 2):
        pool.create_thin(device_id, SIZE)
    bound = pool.activate(1, SIZE)
    by_hand = attach(pool.mount_point / "thin-2.img")  # the index never saw it
    (state / "loops" / "boot_id").write_text("another boot\n")
    fresh = BlockfilePool(PoolConfig(directory=str(state), data_size_bytes=POOL_SIZE))
    assert fresh._backing(1) == [bound] and fresh._backing(2) == [by_hand]

    (state / "loops" / "slots").unlink()  # the older layout: a file per device
    (state / "loops" / "thin-2").write_text("/dev/loop999999\n")
    older = BlockfilePool(PoolConfig(directory=str(state), data_size_bytes=POOL_SIZE))
    assert older._backing(2) == [by_hand] and older._backing(1) == [bound]
    assert sorted(p.name for p in (state / "loops").iterdir()) == ["boot_id", "slots"]
    detach(by_hand)


def test_a_file_with_data_is_never_formatted(state: Path) -> None:
    state.mkdir()
    precious = b"precious data" * 100
    (state / "pool_data").write_bytes(precious)
    with pytest.raises(ManagerError, match="holds data with no known filesystem signature.*refusing to format"):
        BlockfilePool(PoolConfig(directory=str(state))).ensure_pool_exists()
    assert (state / "pool_data").read_bytes() == precious

    ext4 = state / "pool_data"
    ext4.unlink()
    with open(ext4, "wb") as fh:
        fh.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True, timeout=60)
    with pytest.raises(ManagerError, match="holds a ext4 signature, not an XFS pool; refusing to format it"):
        BlockfilePool(PoolConfig(directory=str(state))).ensure_pool_exists()
    assert find_backing(ext4) == []


def test_an_allocated_but_never_written_file_is_formatted(state: Path) -> None:
    """The guide's manual step `fallocate -l 2G pool_data`: no signature, no data, safe to format."""
    state.mkdir()
    subprocess.run(["fallocate", "-l", str(POOL_SIZE), str(state / "pool_data")], check=True, timeout=60)
    pool = BlockfilePool(PoolConfig(directory=str(state), data_size_bytes=POOL_SIZE))
    try:
        assert pool.ensure_pool_exists().healthy
    finally:
        pool.teardown_pool()


def test_a_pool_is_never_mounted_over_device_files(state: Path) -> None:
    (state / "pool").mkdir(parents=True)
    (state / "pool" / "thin-1.img").write_bytes(b"a device from a directory-mode pool")
    with pytest.raises(ManagerError, match="is not empty and no pool is mounted there"):
        BlockfilePool(PoolConfig(directory=str(state))).ensure_pool_exists()
    assert not (state / "pool_data").exists()


def test_directory_fallback_without_xfs(state: Path, tmp_path: Path) -> None:
    """No XFS: the pool is a plain directory on the host fs (ext4 here: snapshots are copies)."""
    pool = BlockfilePool(PoolConfig(directory=str(state), data_size_bytes=POOL_SIZE), use_xfs=False)
    try:
        status = pool.ensure_pool_exists()
        assert status.exists and status.healthy and "on the host filesystem" in status.raw
        assert pool.mode() == "directory" and not (state / "pool_data").exists()
        # Sticky: a later pool on the same directory (XFS allowed) keeps the directory.
        assert BlockfilePool(PoolConfig(directory=str(state))).ensure_pool_exists().raw == status.raw
        pool.create_thin(1, SIZE)
        origin = pool.activate(1, SIZE)
        make_filesystem(origin)
        payload = os.urandom(4 * MiB)
        write_file(origin, tmp_path / "m1", "data.bin", payload)
        pool.deactivate(1)
        pool.create_snapshot(2, 1)
        snap_file = state / "pool" / "thin-2.img"
        assert snap_file.stat().st_blocks * 512 < SIZE // 2  # a sparse copy, holes kept
        snapshot = pool.activate(2, SIZE)
        assert read_file(snapshot, tmp_path / "m2", "data.bin") == payload
        write_file(snapshot, tmp_path / "m2", "data.bin", b"snapshot only")
        assert read_file(pool.activate(1, SIZE), tmp_path / "m1", "data.bin") == payload
        assert [(d.device_id, d.active) for d in pool.list_devices()] == [(1, True), (2, True)]
    finally:
        pool.teardown_pool()
    assert loops_under(tmp_path) == []
    assert sorted(p.name for p in (state / "pool").iterdir()) == ["thin-1.img", "thin-2.img"]  # files stay
