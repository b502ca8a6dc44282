"""The blockfile backend on real loop devices, mkfs.ext4, mounts and an XFS reflink pool."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.base import DeviceExists, PoolConfig
from devices.blockfile import BlockfilePool
from devices.filesystem import make_filesystem
from devices.loop import list_loops
from devices.mount import mounted, parse_mountinfo
from support.proc import CommandFailed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
SIZE = 128 * 1024**2


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[BlockfilePool]:
    loops_before = set(list_loops())
    pool = BlockfilePool(PoolConfig(directory=str(tmp_path / "state"), data_size_bytes=1024**3))
    try:
        yield pool
    finally:
        pool.teardown_pool()
        assert set(list_loops()) == loops_before, "the test leaked a loop device"


def write_file(device: str, target: Path, name: str, data: bytes) -> None:
    target.mkdir(exist_ok=True)
    with mounted(device, target):
        (target / name).write_bytes(data)


def read_file(device: str, target: Path, name: str) -> bytes:
    target.mkdir(exist_ok=True)
    with mounted(device, target, read_only=True):
        return (target / name).read_bytes()


def test_pool_is_created_once_and_reports_sane_numbers(pool: BlockfilePool) -> None:
    first = pool.ensure_pool_exists()
    again = pool.ensure_pool_exists()
    assert first.exists and again.exists and first.healthy
    assert 0 < first.used_data_blocks < first.total_data_blocks
    assert first.total_data_blocks * first.data_block_bytes > 900 * 1024**2
    assert (Path(pool.config.directory) / "pool_meta").exists()


def test_device_lifecycle_snapshot_and_reboot(pool: BlockfilePool, tmp_path: Path) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(1, SIZE)
    with pytest.raises(DeviceExists):
        pool.create_thin(1, SIZE)
    device = pool.activate(1, SIZE)
    assert pool.activate(1, SIZE) == device  # idempotent
    make_filesystem(device)
    payload = os.urandom(50 * 1024**2)
    write_file(device, tmp_path / "m1", "data.bin", payload)
    pool.deactivate(1)

    used_before = pool.get_pool_status().used_data_blocks
    pool.create_snapshot(2, 1)
    used_after = pool.get_pool_status().used_data_blocks
    block = pool.get_pool_status().data_block_bytes
    assert (used_after - used_before) * block < 5 * 1024**2, "a reflink snapshot must not copy 50 MB"

    snap = pool.activate(2, SIZE)
    assert read_file(snap, tmp_path / "m2", "data.bin") == payload
    write_file(snap, tmp_path / "m2", "data.bin", b"changed in the snapshot")
    origin = pool.activate(1, SIZE)
    assert hashlib.sha256(read_file(origin, tmp_path / "m1", "data.bin")).digest() == hashlib.sha256(payload).digest()

    # A reboot: every mapping and the pool mount gone, the files stay; the pool comes back.
    pool.teardown_pool()
    assert not pool.get_pool_status().exists
    assert pool.ensure_pool_exists().exists
    assert {d.device_id: d.active for d in pool.list_devices()} == {1: False, 2: False}
    snap = pool.activate(2, SIZE)
    assert read_file(snap, tmp_path / "m2", "data.bin") == b"changed in the snapshot"
    pool.deactivate(2)
    pool.deactivate(2)  # idempotent

    pool.delete(2)
    pool.delete(2)  # idempotent
    assert [d.device_id for d in pool.list_devices()] == [1]


def test_an_active_device_cannot_be_deleted_and_a_bad_mount_is_one_line(pool: BlockfilePool, tmp_path: Path) -> None:
    pool.ensure_pool_exists()
    pool.create_thin(7, SIZE)
    pool.activate(7, SIZE)
    with pytest.raises(Exception, match="is active; deactivate it first"):
        pool.delete(7)
    pool.deactivate(7)
    target = tmp_path / "m"
    target.mkdir()
    with pytest.raises(CommandFailed) as failed:
        with mounted("/dev/does-not-exist", target):
            pass
    assert "\n" not in str(failed.value) and "mount" in str(failed.value)


def test_mountinfo_unescapes_paths() -> None:
    line = r"36 25 0:32 / /mnt/with\040space rw,relatime shared:1 - ext4 /dev/loop3 rw"
    entry = parse_mountinfo(line)[0]
    assert (entry.target, entry.source, entry.fstype) == ("/mnt/with space", "/dev/loop3", "ext4")


def test_existing_non_pool_file_is_never_formatted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "pool_data").write_bytes(b"precious data" * 100)
    pool = BlockfilePool(PoolConfig(directory=str(state)))
    with pytest.raises(Exception, match="refusing to format"):
        pool.ensure_pool_exists()
    assert (state / "pool_data").read_bytes() == b"precious data" * 100
    assert subprocess.run(["losetup", "-j", str(state / "pool_data")], capture_output=True, text=True).stdout == ""
