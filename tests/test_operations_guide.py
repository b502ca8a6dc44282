"""OPERATIONS.md, section by section, run as written (blockfile backend on this kernel;
the device-mapper halves run in the QEMU guest, tests/guest/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SampleBucket
from tests.test_process_image import REPO, fields, mount_snapshot, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "flyio"
    yield directory
    teardown(directory)


def manager(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args, "--state-dir", str(state_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "FLYIO_BACKEND": "blockfile"})


def process(state_dir: Path, bucket: SampleBucket, key: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return manager(state_dir, "process-image", "--s3-key", key, "--bucket", bucket.name, "--endpoint-url",
                   bucket.endpoint_url, "--device-size", "64M", *extra)


def sqlite(db: Path, sql: str) -> str:
    return subprocess.run(["sqlite3", str(db), sql], capture_output=True, text=True, check=True, timeout=30).stdout


def test_manager_lock_holds_pid_timestamp_and_command_while_running(state_dir: Path, sample_bucket: SampleBucket) -> None:
    lock = state_dir / "fsm" / "flyio-manager.lock"
    seen: list[dict] = []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not seen:
            try:
                seen.append(json.loads(lock.read_text()))
            except (OSError, ValueError):
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    done = process(state_dir, sample_bucket, "images/node/5.tar")
    watcher.join()
    assert done.returncode == 0, done.stderr[-2000:]
    assert seen and set(seen[0]) == {"pid", "timestamp", "command"}
    assert seen[0]["command"] == "process-image" and abs(seen[0]["timestamp"] - time.time()) < 120
    assert not lock.exists()


def test_setup_pool_with_db_creates_pool_files_in_its_directory_and_recovers(tmp_path: Path) -> None:
    db_dir = tmp_path / "var-lib-flyio"
    try:
        done = subprocess.run([sys.executable, "-m", "cli", "setup-pool", "--db", str(db_dir / "images.db"),
                               "--backend", "blockfile"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (db_dir / "pool_meta").exists() and (db_dir / "pool_data").exists() and (db_dir / "images.db").exists()
        assert "pool ready: backend=blockfile" in done.stdout
        assert "creating new thin pool" in done.stderr and "thin pool created successfully" in done.stderr
        again = subprocess.run([sys.executable, "-m", "cli", "setup-pool", "--db", str(db_dir / "images.db"),
                                "--backend", "blockfile"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "creating new thin pool" not in again.stderr
    finally:
        teardown(db_dir)


def test_pool_recovery_after_a_reboot_keeps_images(state_dir: Path, sample_bucket: SampleBucket, tmp_path: Path) -> None:
    first = process(state_dir, sample_bucket, "images/python/5.tar")
    assert first.returncode == 0, first.stderr[-2000:]
    teardown(state_dir)  # what a reboot does to loop devices and mounts

    # "Simply run process-image - pool will be auto-created" (from the existing files).
    second = process(state_dir, sample_bucket, "images/node/5.tar", "--log-format", "json")
    assert second.returncode == 0, second.stderr[-2000:]
    events = {event["msg"]: event for event in map(json.loads, second.stderr.splitlines())}
    assert "pool does not exist, attempting to create" in events
    assert "re-attaching existing pool files" in events

    # The catalog was reconciled with the pool that came back: the VM snapshot from before
    # the reboot is active again, nothing is missing, nothing unnamed.
    old_name = fields(first.stdout)["snapshot"]
    assert events["snapshot re-activated"]["device_name"] == old_name
    counts = events["catalog reconciled with the pool"]
    assert (counts["reactivated"], counts["missing"], counts["unnamed"], counts["failed"]) == (1, 0, 0, 0), counts

    # The image from before the reboot is intact: its device is in the pool and mounts.
    names = sqlite(state_dir / "images.db", "SELECT device_name FROM unpacked_images;").split()
    assert len(names) == 2 and all(n.startswith("thin-") for n in names)
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
    old_snapshot = int(old_name.removeprefix("thin-"))
    active = {d.device_id: d.active for d in pool.list_devices()}
    assert active[old_snapshot], "the old snapshot was not re-activated"
    device = pool.activate(old_snapshot, 64 * 1024**2)
    mount_snapshot(device, tmp_path / "old")
    try:
        assert any((tmp_path / "old").iterdir())
    finally:
        subprocess.run(["umount", str(tmp_path / "old")], check=True, timeout=60)


def test_emergency_reset_then_cleanup_then_process_again(state_dir: Path, sample_bucket: SampleBucket) -> None:
    first = process(state_dir, sample_bucket, "images/node/5.tar")
    assert first.returncode == 0, first.stderr[-2000:]
    reset = subprocess.run([str(REPO / "test-scripts" / "reset-devicemapper.sh"), "--state-dir", str(state_dir), "--yes"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert "DELETE FROM unpacked_images;" in reset.stdout
    # Step 3 of the guide, as written.
    db = state_dir / "images.db"
    sqlite(db, "DELETE FROM unpacked_images;")
    sqlite(db, "DELETE FROM snapshots;")
    # Step 4: "Verify system health" by processing an image again.
    again = process(state_dir, sample_bucket, "images/node/5.tar", "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert fields(again.stdout)["state"] == "complete"
    assert fields(again.stdout)["job_id"] == fields(first.stdout)["job_id"]  # the same job, reopened
    events = sqlite(db, "SELECT event FROM job_events ORDER BY seq;").split()
    assert "reopen" in events and events[-1] == "snapshotted"
    assert sqlite(db, "SELECT count(*) FROM snapshots WHERE state='ready';").strip() == "1"


def test_pool_full_scenario_delete_snapshot(state_dir: Path, sample_bucket: SampleBucket) -> None:
    done = process(state_dir, sample_bucket, "images/golang/5.tar")
    assert done.returncode == 0, done.stderr[-2000:]
    listing = manager(state_dir, "snapshots", "--json")
    snapshot = json.loads(listing.stdout)[0]
    # delete-snapshot runs inside the Operation Guard: while another process holds the
    # dm-operations lock it waits, and the device stays.
    from safeguards.guard import GuardConfig, OperationGuard

    deleting: subprocess.Popen[str] | None = None
    with OperationGuard(GuardConfig(state_dir=state_dir)).operation("unpack-image"):
        deleting = subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "delete-snapshot",
                                     str(snapshot["id"])], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        time.sleep(2)
        assert deleting.poll() is None, deleting.communicate()
        assert len(json.loads(manager(state_dir, "snapshots", "--json").stdout)) == 1
    out, err = deleting.communicate(timeout=120)
    assert deleting.returncode == 0, err
    assert f"deleted snapshot {snapshot['id']}" in out
    assert json.loads(manager(state_dir, "snapshots", "--json").stdout) == []
    images = json.loads(manager(state_dir, "images", "--json").stdout)
    assert images[0]["activation_status"] == "inactive"
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    assert snapshot["device_name"] not in {d.name for d in BlockfilePool(PoolConfig(directory=str(state_dir))).list_devices()}
    missing = manager(state_dir, "delete-snapshot", "99")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == "error: snapshot 99 not found"
