"""process-image end to end on real parts: SeaweedFS over HTTP, real SQLite, real loop
devices, mkfs.ext4 and mounts (blockfile backend on this kernel)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from images.chain import chain_ids
from demo.samples import diff_trees, expected_tree, family_layers, snapshot_tree
from tests.conftest import SampleBucket

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
DEVICE_SIZE = "256M"


def manager(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def process(state_dir: Path, bucket: SampleBucket, *args: str) -> subprocess.CompletedProcess[str]:
    return manager(state_dir, "process-image", "--bucket", bucket.name, "--endpoint-url", bucket.endpoint_url,
                   "--device-size", DEVICE_SIZE, "--backend", "blockfile", *args)


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.file_digest(path.open("rb"), "sha256").hexdigest()


def fields(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    return dict(pair.split("=", 1) for pair in last.split())


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    teardown(directory)


def teardown(state_dir: Path) -> None:
    """Release every loop device and mount the test's pool holds (the files stay)."""
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
    for device in pool.list_devices():
        if device.active:
            pool.deactivate(device.device_id)
    pool.teardown_pool()


def mount_snapshot(device: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "ro,nodev,nosuid,noload", device, str(target)], check=True, timeout=60)


@needs_root
@pytest.mark.slow
def test_all_families_share_layers_and_match_the_expected_tree(state_dir: Path, sample_bucket: SampleBucket,
                                                                tmp_path: Path) -> None:
    results: dict[str, dict[str, str]] = {}
    for family in ("golang", "node", "python", "whiteout"):
        done = process(state_dir, sample_bucket, "--image", family)
        assert done.returncode == 0, done.stderr[-3000:]
        if family == "golang":
            # The first layer downloads in the step; the four above it in the background,
            # each taken by its layer's creating_device (overlapping the unpacks below it).
            assert done.stderr.count("blob downloaded") == 5 and done.stderr.count("background=true") == 4, done.stderr
        results[family] = fields(done.stdout)
        assert results[family]["state"] == "complete"

    # Shared base layers 1-3 are stored once: golang made them, node and python reused them.
    with sqlite3.connect(state_dir / "images.db") as db:
        chains = db.execute("SELECT count(*) FROM unpacked_images WHERE state='ready'").fetchone()[0]
        reused = db.execute("SELECT count(*) FROM job_events WHERE event='layer_reused'").fetchone()[0]
        images = db.execute("SELECT name, activation_status FROM images ORDER BY id").fetchall()
        orphans = db.execute("SELECT count(*) FROM orphaned_devices").fetchone()[0]
    # Independently: the distinct layer chains of the four families' tar files.
    all_chains = [chain_ids([sha256_of(p) for p in sample_bucket.layers[f]]) for f in results]
    distinct = set().union(*map(set, all_chains))
    assert chains == len(distinct) >= 5 + 2 + 2 + 1
    assert reused == sum(map(len, all_chains)) - len(distinct) >= 6
    assert images == [("golang", "active"), ("node", "active"), ("python", "active"), ("whiteout", "active")]
    assert orphans == 0

    for family, result in results.items():
        target = tmp_path / f"mnt-{family}"
        mount_snapshot(result["snapshot_device"], target)
        try:
            actual = snapshot_tree(target)
        finally:
            subprocess.run(["umount", str(target)], check=True, timeout=60)
        expected = expected_tree(family_layers(family, sample_bucket.scale_mb))
        assert diff_trees(expected, actual) == [], family


@needs_root
def test_second_run_of_a_complete_image_downloads_nothing_and_does_nothing(state_dir: Path,
                                                                            sample_bucket: SampleBucket) -> None:
    """A repeat is answered from the database: the same job, nothing downloaded, no new
    transition, no pool or safeguards built (the command's log says so), its use recorded."""
    first = process(state_dir, sample_bucket, "--s3-key", "images/node/5.tar")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "blob downloaded" in first.stderr

    from cli.app import open_store
    from fsm.runner import Runner
    from states.registry import all_workflows, build_services
    from states.submit import resolve_request
    from states.workflow import WORKFLOW_NAME

    request = resolve_request(bucket=sample_bucket.name, s3_key="images/node/5.tar",
                              endpoint_url=sample_bucket.endpoint_url)
    store = open_store(state_dir)
    runner = Runner(store, all_workflows(build_services(state_dir, backend="blockfile")))
    job = runner.start(WORKFLOW_NAME, request.idempotency_key, request.job_context())
    assert job.state == "complete"
    events = len(store.history(job.id))
    with sqlite3.connect(state_dir / "images.db") as db:
        (used_before,) = db.execute("SELECT last_used_at FROM images").fetchone()

    second = process(state_dir, sample_bucket, "--s3-key", "images/node/5.tar")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "blob downloaded" not in second.stderr and "safeguards initialized" not in second.stderr
    assert "image already complete; nothing to do" in second.stderr
    assert fields(second.stdout)["job_id"] == fields(first.stdout)["job_id"]
    assert fields(second.stdout)["snapshot_device"] == fields(first.stdout)["snapshot_device"]
    assert len(store.history(job.id)) == events
    with sqlite3.connect(state_dir / "images.db") as db:
        (used_after,) = db.execute("SELECT last_used_at FROM images").fetchone()
    assert used_after > used_before  # least recently used means the last process-image that used it


@needs_root
def test_endpoint_from_aws_endpoint_url_and_backend_auto_says_what_it_picked(state_dir: Path,
                                                                              sample_bucket: SampleBucket) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLYIO_BACKEND"}
    setup = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "setup-pool",
                            "--data-size", "1G", "--metadata-size", "2M"],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert (state_dir / "pool_data").stat().st_size == 1024**3
    assert (state_dir / "pool_meta").stat().st_size == 2 * 1024**2
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image",
                           "--s3-key", "images/node/5.tar", "--bucket", sample_bucket.name, "--device-size", "64M"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "AWS_ENDPOINT_URL": sample_bucket.endpoint_url})
    assert done.returncode == 0, done.stderr[-3000:]
    assert fields(done.stdout)["state"] == "complete"
    # This kernel has no device-mapper: auto picks blockfile and says so, with the reason.
    expected = "devicemapper" if Path("/dev/mapper/control").exists() else "blockfile"
    selected = [line for line in done.stderr.splitlines() if "backend selected" in line]
    assert selected and f"backend={expected}" in selected[0] and "reason=" in selected[0], done.stderr[-2000:]
