"""A kernel fault under a real job, INSIDE the QEMU guest (tests/test_vm.py runs tests/guest/);
skipped elsewhere.

The pool is filled to out_of_data_space while process-image writes a layer: dm-thin first
queues the writes (`no_space_timeout`, lowered here from 60 s to 2 s so the test is quick),
then fails them with EIO. The job must abort within its timeout with the device recorded in
`orphaned_devices` (not cleaned: fail-dumb), the manager must exit with a one-line reason
and not crash, and a later `gc --force` must clean the orphan the aborted job left.
"""

from __future__ import annotations

import io
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool
from support.proc import run_command

pytestmark = pytest.mark.skipif(not Path("/dev/mapper/control").exists(),
                                reason="needs a device-mapper kernel (/dev/mapper/control); run via tests/test_vm.py")

REPO = Path(__file__).resolve().parents[2]
MB = 1024**2
NO_SPACE_TIMEOUT = Path("/sys/module/dm_thin_pool/parameters/no_space_timeout")
SUMMARY = re.compile(r"Summary\s+cleaned=(\d+) failed=(\d+) orphaned=(\d+) skipped=(\d+) total_devices=(\d+)")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get("GUEST_SHARE")
    directory = Path(base) / "fault-state" if base else tmp_path / "state"
    directory.mkdir(parents=True, exist_ok=True)
    old_timeout = NO_SPACE_TIMEOUT.read_text().strip()
    NO_SPACE_TIMEOUT.write_text("2")
    try:
        yield directory
    finally:
        NO_SPACE_TIMEOUT.write_text(old_timeout)
        for entry in Path("/proc/self/mountinfo").read_text().splitlines():
            target = entry.split()[4]
            if target.startswith(str(directory)):
                run_command(["umount", target], timeout=60, check=False)
        pool = DevicemapperPool(PoolConfig(directory=str(directory)))
        for device in pool.list_devices():
            pool.deactivate(device.device_id)
        pool.teardown_pool()


def manager(state_dir: Path, *args: str, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A subprocess like an operator's run: its exit code and output are the subject.
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def incompressible_layer(path: Path, files: int, file_bytes: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for number in range(files):
            info = tarfile.TarInfo(f"data/blob-{number:03d}")
            info.size = file_bytes
            tar.addfile(info, io.BytesIO(os.urandom(file_bytes)))
    return path


def test_pool_out_of_data_space_aborts_the_job_and_records_the_device(state_dir: Path, tmp_path: Path) -> None:
    setup = manager(state_dir, "setup-pool", "--data-size", "32M", "--backend", "devicemapper")
    assert setup.returncode == 0, setup.stderr[-3000:]
    layer = incompressible_layer(tmp_path / "big.tar", files=40, file_bytes=MB)  # 40 MB into a 32 MB pool

    # Admission would make the job wait for room (the product's answer to a pool too small):
    # a high watermark of 100% turns it off, so the write really runs the pool out.
    done = manager(state_dir, "process-image", "--url", f"file://{layer}", "--backend", "devicemapper",
                   "--device-size", "64M", env={"FLYIO_POOL_HIGH_PERCENT": "100"})
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    result = dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split() if "=" in pair)
    assert result["state"] == "aborted", done.stdout
    # The writes went to the page cache; the pool failed them in write-back (EIO), which only
    # the syncfs before unmount reports: without it the layer would have been marked ready.
    assert "failed to unpack layer; leaving device mounted for manual/GC cleanup" in done.stderr, done.stderr[-3000:]
    assert "Input/output error" in done.stdout, done.stdout  # the job's recorded error, on its result line

    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    assert pool.get_pool_status().out_of_data_space, run_command(["dmsetup", "status", "pool"], timeout=30).stdout
    with sqlite3.connect(state_dir / "images.db") as db:
        orphans = db.execute("SELECT device_name, reason FROM orphaned_devices WHERE cleaned_at IS NULL").fetchall()
        live = [row[0] for row in db.execute("SELECT device_name FROM unpacked_images")]
    assert [name for name, _ in orphans] == ["thin-1"], orphans
    assert live == [], "a layer that failed must not stay marked as unpacked"
    # Recorded, not cleaned: the device is still in the pool, as the job left it.
    assert "thin-1" in {device.name for device in pool.list_devices()}

    # Later, when the host is idle: gc lists the orphan, then removes it.
    dry = manager(state_dir, "gc", "--dry-run", "--backend", "devicemapper")
    assert dry.returncode == 0 and SUMMARY.search(dry.stdout).groups()[2] == "1", dry.stdout + dry.stderr
    forced = manager(state_dir, "gc", "--force", "--backend", "devicemapper")
    assert forced.returncode == 0, forced.stdout + forced.stderr[-3000:]
    cleaned, failed, orphaned, _skipped, _total = SUMMARY.search(forced.stdout).groups()
    assert (cleaned, failed, orphaned) == ("1", "0", "1"), forced.stdout
    assert not [d for d in pool.list_devices() if d.name == "thin-1"]
