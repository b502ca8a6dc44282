"""After a reboot the catalog is reconciled with the pool that came back (catalog/reconcile.py):
real blockfile pool, real process-image, a reboot made by releasing every loop and mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devices.base import PoolConfig
from devices.blockfile import BlockfilePool
from tests.conftest import SampleBucket
from tests.test_operations_guide import manager, process, sqlite, state_dir  # noqa: F401 (fixture)
from tests.test_process_image import fields, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")

MB64 = 64 * 1024**2


def json_events(stderr: str) -> dict[str, dict]:
    return {event["msg"]: event for event in map(json.loads, stderr.splitlines())}


def test_setup_pool_after_a_reboot_reports_missing_and_unnamed_devices(state_dir: Path,  # noqa: F811
                                                                       sample_bucket: SampleBucket) -> None:
    first = process(state_dir, sample_bucket, "images/node/5.tar")
    assert first.returncode == 0, first.stderr[-2000:]
    snapshot = fields(first.stdout)["snapshot"]
    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
    # The snapshot's device vanishes behind the catalog's back; a device no row names appears.
    pool.deactivate(int(snapshot.removeprefix("thin-")))
    pool.delete(int(snapshot.removeprefix("thin-")))
    pool.create_thin(900, MB64)
    teardown(state_dir)  # the reboot

    done = manager(state_dir, "setup-pool", "--log-format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    events = json_events(done.stderr)
    assert events["device recorded in the database is missing from the pool"]["device_name"] == snapshot
    unnamed = events["orphaned device detected; run 'flyio-image-manager gc' to clean up"]
    assert unnamed["device_name"] == "thin-900" and unnamed["reason"] == "no row names it"
    counts = events["catalog reconciled with the pool"]
    assert (counts["reactivated"], counts["missing"], counts["unnamed"]) == (0, 1, 1), counts
    # Reported, not wiped: the rows and the unnamed device are all still there.
    assert sqlite(state_dir / "images.db", "SELECT device_name FROM snapshots;").split() == [snapshot]
    assert 900 in {device.device_id for device in pool.list_devices()}

    # A pool that did not go away is not reconciled again.
    again = manager(state_dir, "setup-pool", "--log-format", "json")
    assert again.returncode == 0 and "catalog reconciled with the pool" not in json_events(again.stderr)
