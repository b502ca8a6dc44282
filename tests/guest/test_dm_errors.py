"""devices/dmsetup.py's error table against a real dm-thin kernel: each failure the
devicemapper backend tells apart is made for real, and the errno read from dmsetup's own
output is the one the backend tests. Runs INSIDE the QEMU guest (tests/test_vm.py);
skipped elsewhere. The texts are printed (-s, or on failure) for tests/test_tool_errors.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices import dmsetup
from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool
from devices.dmsetup import DMSETUP_ERRORS
from devices.loop import list_loops
from support.proc import ToolFailed

pytestmark = pytest.mark.skipif(not Path("/dev/mapper/control").exists(),
                                reason="needs a device-mapper kernel (/dev/mapper/control); run via tests/test_vm.py")

MB = 1024**2


@pytest.fixture
def pool(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DevicemapperPool]:
    base = os.environ.get("GUEST_SHARE")
    folder = (Path(base) if base else tmp_path) / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    loops_before = set(list_loops())
    pool = DevicemapperPool(PoolConfig(directory=str(folder), data_size_bytes=64 * MB, metadata_size_bytes=4 * MB,
                                       pool_name="errpool"))
    pool.ensure_pool_exists()
    try:
        yield pool
    finally:
        pool.teardown_pool()
        assert set(list_loops()) == loops_before, "the test leaked a loop device"


def failure(call: object, *args: str) -> ToolFailed:
    with pytest.raises(ToolFailed) as raised:
        call(*args)  # type: ignore[operator]
    print(f"{' '.join(raised.value.result.argv)!r}: {raised.value.result.stderr!r} -> {raised.value.reason}")
    return raised.value


def test_dmsetup_failures_map_to_their_errno(pool: DevicemapperPool) -> None:
    pool.create_thin(1, 16 * MB)
    assert failure(dmsetup.message, "errpool", "create_thin 1").errno == errno.EEXIST
    assert failure(dmsetup.message, "errpool", "create_snap 2 9").errno == errno.ENODATA
    assert failure(dmsetup.message, "errpool", "delete 9").errno == errno.ENODATA
    assert failure(dmsetup.create, "thin-9", f"0 32768 thin {pool.pool_path} 9").errno == errno.ENODATA
    assert not Path("/dev/mapper/thin-9").exists()
    assert failure(dmsetup.remove, "no-such-mapping").errno in dmsetup.GONE
    missing = dmsetup.dmsetup("status", "no-such-mapping", check=False)
    print(f"'dmsetup status no-such-mapping': {missing.stderr!r}")
    assert DMSETUP_ERRORS.errno_of(missing.stderr) in dmsetup.ABSENT
    assert dmsetup.status("no-such-mapping") is None
    assert failure(dmsetup.message, "errpool", "no_such_message").errno == errno.EINVAL
    dmsetup.message("errpool", "reserve_metadata_snap")
    try:
        # Kernel 6.1: "Pool metadata snapshot already exists: release this before taking another."
        assert failure(dmsetup.message, "errpool", "reserve_metadata_snap").errno == errno.EBUSY
    finally:
        dmsetup.message("errpool", "release_metadata_snap")


def test_removing_an_open_mapping_is_ebusy(pool: DevicemapperPool) -> None:
    pool.create_thin(1, 16 * MB)
    path = pool.activate(1, 16 * MB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert failure(dmsetup.remove, "thin-1").errno == errno.EBUSY
    finally:
        os.close(fd)
    pool.deactivate(1)
    assert not dmsetup.is_active("thin-1")
