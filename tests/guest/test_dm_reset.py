"""The guide's Emergency Recovery on a real dm-thin pool, INSIDE the QEMU guest (tests/test_vm.py
runs tests/guest/); skipped elsewhere: `test-scripts/reset-devicemapper.sh` (typed
confirmation, as an operator runs it) deactivates every thin device, removes the pool and
recreates it empty; after the guide's database cleanup (Step 3) process-image works again.
"""

from __future__ import annotations

import io
import os
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


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get("GUEST_SHARE")
    directory = Path(base) / "reset-state" if base else tmp_path / "state"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    finally:
        pool = DevicemapperPool(PoolConfig(directory=str(directory)))
        for device in pool.list_devices():
            pool.deactivate(device.device_id)
        pool.teardown_pool()


def process(state_dir: Path, layer: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--url",
                           f"file://{layer}", "--backend", "devicemapper", "--device-size", "64M"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split())


def thin_mappings() -> list[str]:
    out = run_command(["dmsetup", "ls"], timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("thin-")]


def test_reset_script_recreates_an_empty_pool_and_processing_works_again(state_dir: Path, tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"box\n"))
    first = process(state_dir, layer)
    assert first["state"] == "complete" and thin_mappings() == [first["snapshot"]]

    script = [str(REPO / "test-scripts" / "reset-devicemapper.sh"), "--state-dir", str(state_dir)]
    refused = subprocess.run(script, input="no\n", capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "nothing done" in refused.stdout
    assert thin_mappings() == [first["snapshot"]], "a refused reset must touch nothing"

    reset = subprocess.run(script, input="reset\n", capture_output=True, text=True, timeout=300)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert f"deactivating {first['snapshot']}" in reset.stdout and "removing pool" in reset.stdout
    assert thin_mappings() == []
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    assert pool.get_pool_status().exists and pool.pool_device_ids() == [], "the recreated pool must be empty"

    with sqlite3.connect(state_dir / "images.db") as db:  # OPERATIONS.md, Step 3
        db.execute("DELETE FROM unpacked_images;")
        db.execute("DELETE FROM snapshots;")
    again = process(state_dir, layer)
    assert again["state"] == "complete" and again["job_id"] == first["job_id"]
    assert thin_mappings() == [again["snapshot"]]
