"""process-image end to end on the devicemapper backend, INSIDE the QEMU guest:
SeaweedFS on the guest's 127.0.0.1, the 3-layer `whiteout` sample family at ~1 MB,
64M thin devices, and the mounted snapshot compared with demo.samples.expected_tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.samples import build_families, diff_trees, expected_tree, family_layers, snapshot_tree, upload_families
from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool
from devices.mount import DEFAULT_OPTIONS, mounted
from support.proc import run_command

pytestmark = pytest.mark.skipif(not Path("/dev/mapper/control").exists(),
                                reason="needs a device-mapper kernel (/dev/mapper/control); run via tests/test_vm.py")

REPO = Path(__file__).resolve().parents[2]
FAMILY = "whiteout"
SCALE_MB = 1.0


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get("GUEST_SHARE")
    directory = Path(base) / "e2e-state" if base else tmp_path / "state"
    yield directory
    pool = DevicemapperPool(PoolConfig(directory=str(directory)))
    pool.teardown_pool()


def test_process_image_on_dm_thin(state_dir: Path, tmp_path: Path) -> None:
    from demo.s3server import start_s3_server
    from images.source import make_s3_client

    samples = tmp_path / "samples"
    build_families(samples, SCALE_MB, families=(FAMILY,))
    with start_s3_server(tmp_path / "s3", timeout=240) as server:
        client = make_s3_client(server.endpoint_url, anonymous=True)
        client.create_bucket(Bucket="guest-samples")
        upload_families(client, "guest-samples", samples)
        # A subprocess like an operator's run (not run_command: its output is the subject).
        done = subprocess.run(
            [sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--image", FAMILY,
             "--bucket", "guest-samples", "--endpoint-url", server.endpoint_url,
             "--backend", "devicemapper", "--device-size", "64M"],
            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split())
    assert result["state"] == "complete"
    assert result["snapshot_device"].startswith("/dev/mapper/thin-")
    for line in ("pool does not exist, attempting to create", "creating new thin pool", "thin pool created successfully"):
        assert line in done.stderr
    assert "thin-pool" in run_command(["dmsetup", "table", "pool"], timeout=10).stdout

    target = tmp_path / "mnt"
    target.mkdir()
    with mounted(result["snapshot_device"], target, read_only=True, options=(*DEFAULT_OPTIONS, "noload")):
        actual = snapshot_tree(target)
    assert diff_trees(expected_tree(family_layers(FAMILY, SCALE_MB)), actual) == []
