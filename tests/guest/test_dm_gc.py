"""`gc` on a real dm-thin pool, INSIDE the QEMU guest (run: `python -m tests.vm --share DIR
-- .venv/bin/python -m pytest -q tests/guest/test_dm_gc.py`); skipped elsewhere.

One device a live row names, one orphan active, formatted and mounted, one orphan never
activated (only in the pool's metadata): the dry run lists the two orphans and changes
nothing; force unmounts, deactivates and deletes them through dmsetup, and the live
device stays.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool
from devices.filesystem import make_filesystem
from devices.mount import mount
from support.proc import run_command

pytestmark = pytest.mark.skipif(not Path("/dev/mapper/control").exists(),
                                reason="needs a device-mapper kernel (/dev/mapper/control); run via tests/vm")

REPO = Path(__file__).resolve().parents[2]
MB = 1024**2
SUMMARY = re.compile(r"Summary\s+cleaned=(\d+) failed=(\d+) orphaned=(\d+) skipped=(\d+) total_devices=(\d+)")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get("GUEST_SHARE")
    directory = Path(base) / "gc-state" if base else tmp_path / "state"
    directory.mkdir(parents=True, exist_ok=True)
    pool = DevicemapperPool(PoolConfig(directory=str(directory), data_size_bytes=64 * MB, metadata_size_bytes=4 * MB))
    try:
        pool.ensure_pool_exists()
        yield directory
    finally:
        for entry in Path("/proc/self/mountinfo").read_text().splitlines():
            target = entry.split()[4]
            if target.startswith(str(tmp_path)):
                run_command(["umount", target], timeout=60, check=False)
        for device in pool.list_devices():
            pool.deactivate(device.device_id)
        pool.teardown_pool()


def gc(state_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # A subprocess like an operator's run (not run_command: its output is the subject).
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "gc", "--backend",
                           "devicemapper", *flags], cwd=REPO, capture_output=True, text=True, timeout=600)


def dm_names() -> set[str]:
    out = run_command(["dmsetup", "ls"], timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("thin-")}


def test_gc_on_dm_thin(state_dir: Path, tmp_path: Path) -> None:
    from catalog.ledger import DeviceLedger, engine_transactions
    from fsm.database import open_engine
    from migrations import upgrade_database

    db = state_dir / "images.db"
    upgrade_database(db)
    engine = open_engine(db)
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    pool.ensure_pool_exists()
    ledger = DeviceLedger(pool, engine_transactions(engine))
    live_id = ledger.create_layer_device(chain_id="sha256:" + "a" * 64, layer_digest="sha256:" + "a" * 64,
                                         parent_chain_id=None, size_bytes=16 * MB, job_id=None).device_id
    ledger.activate(live_id)
    engine.dispose()  # closed now, not whenever the garbage collector gets to it
    pool.create_thin(50, 16 * MB)  # orphan, active, mounted
    device = pool.activate(50, 16 * MB)
    make_filesystem(device)
    (tmp_path / "mnt").mkdir()
    mount(device, tmp_path / "mnt")
    pool.create_thin(51, 16 * MB)  # orphan, only in the pool's metadata
    assert {d.device_id for d in pool.list_devices()} == {live_id, 50, 51}

    db_bytes = db.read_bytes()
    dry = gc(state_dir, "--dry-run")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert re.search(r"Found orphaned device\s+device_id=50 device_name=thin-50 mounted=true", dry.stdout)
    assert re.search(r"Found orphaned device\s+device_id=51 device_name=thin-51 mounted=false", dry.stdout)
    assert SUMMARY.search(dry.stdout).groups() == ("0", "0", "2", "0", "3")
    assert db.read_bytes() == db_bytes
    assert dm_names() == {f"thin-{live_id}", "thin-50"}

    force = gc(state_dir, "--force", "--verbose")
    assert force.returncode == 0, force.stdout[-3000:]
    assert SUMMARY.search(force.stdout).groups() == ("2", "0", "2", "0", "3")
    assert dm_names() == {f"thin-{live_id}"}
    assert {d.device_id for d in pool.list_devices()} == {live_id}
    assert not os.path.ismount(tmp_path / "mnt")
