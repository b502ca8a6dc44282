"""A process-image killed with SIGKILL mid-unpack resumes and completes; the half-written
device is recorded as orphaned (never reused, never cleaned by the job), and every device
in the pool is named by a row."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.samples import diff_trees, expected_tree, family_layers, snapshot_tree
from tests.conftest import SampleBucket
from tests.test_process_image import REPO, fields, mount_snapshot, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4]
        if target.startswith(str(directory / "mnt")):
            subprocess.run(["umount", target], check=False, timeout=60)
    teardown(directory)


def argv(state_dir: Path, bucket: SampleBucket) -> list[str]:
    return [sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--image", "golang",
            "--bucket", bucket.name, "--endpoint-url", bucket.endpoint_url, "--backend", "blockfile",
            "--device-size", "256M"]


def current_state(db: Path) -> str | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT state FROM jobs ORDER BY id LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def test_sigkill_inside_unpacking_then_rerun_completes(state_dir: Path, sample_bucket: SampleBucket,
                                                       tmp_path: Path) -> None:
    db = state_dir / "images.db"
    proc = subprocess.Popen(argv(state_dir, sample_bucket), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    unpacking_seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if current_state(db) == "unpacking":
            unpacking_seen += 1
            if unpacking_seen == 2:  # the second layer's unpack: an upper layer (a snapshot device)
                break
            while current_state(db) == "unpacking" and proc.poll() is None:
                time.sleep(0.005)
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert current_state(db) == "unpacking"

    rerun = subprocess.run(argv(state_dir, sample_bucket), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = fields(rerun.stdout)
    assert result["state"] == "complete"
    assert "removing stale manager lock" in rerun.stderr

    with sqlite3.connect(db) as conn:
        events = [r[0] for r in conn.execute("SELECT event FROM job_events ORDER BY seq")]
        orphans = conn.execute("SELECT device_name, reason FROM orphaned_devices").fetchall()
        named = {r[0] for r in conn.execute(
            "SELECT device_name FROM unpacked_images UNION SELECT device_name FROM snapshots "
            "UNION SELECT device_name FROM orphaned_devices")}
    assert "resume" in events
    assert len(orphans) == 1 and orphans[0][1].startswith(("interrupted in state created", "interrupted in state unpacking"))

    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    in_pool = {d.name for d in BlockfilePool(PoolConfig(directory=str(state_dir))).list_devices()}
    assert in_pool <= named, in_pool - named
    assert orphans[0][0] in in_pool  # left as it was, for gc

    target = tmp_path / "mnt"
    mount_snapshot(result["snapshot_device"], target)
    try:
        actual = snapshot_tree(target)
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60)
    assert diff_trees(expected_tree(family_layers("golang", sample_bucket.scale_mb)), actual) == []
