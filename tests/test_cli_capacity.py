"""The CLI's capacity wait (issue 23), on real parts: a blockfile pool (XFS on a loop
device), SeaweedFS, SQLite, mkfs and mounts. Without a daemon, `process-image` evicts an
unused image exactly as the daemon does and completes; when nothing can be evicted it
leaves its job waiting and exits with one line, holding no lock, so the remedies it names
(`setup-pool --grow`, then `fsm resume`) run and finish the job.

The issue's case is a 400 MB pool and three 150 MB images; here the pool is XFS's smallest
(320M, about 256 MiB of data space) and the images 100 MiB: the same situation (one image
fits below the 85% high watermark, two do not)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_capacity import blob, errors, image_status, pool_of, read_back, run, usage
from tests.test_vm_snapshots import db_rows, fields, layer_tar, pool_devices, state_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
MB = 1024**2
IMAGE_BYTES = 100 * MB


@pytest.fixture
def big_bucket(s3_client: Any, make_bucket: Any, s3_server: Any) -> dict[str, Any]:
    """big1, big2, big3: one-layer images of IMAGE_BYTES incompressible bytes each."""
    bucket = make_bucket("bigimages")
    files = {}
    for name in ("big1", "big2", "big3"):
        files[name] = {f"srv/{name}.bin": blob(name, IMAGE_BYTES)}
        s3_client.put_object(Bucket=bucket, Key=f"images/{name}/1.tar", Body=layer_tar(files[name]))
    return {"bucket": bucket, "endpoint": s3_server.endpoint_url, "files": files}


def process(state_dir: Path, bucket: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
    """process-image, as a subprocess: a command that waited on the lock it holds (the old
    deadlock) fails the test at the subprocess timeout."""
    return run(state_dir, "process-image", "--image", name, "--bucket", bucket["bucket"], "--endpoint-url",
               bucket["endpoint"], "--device-size", "512M")


def delete_first_snapshot(state_dir: Path, image: str) -> None:
    """The snapshot process-image made (no VM id): with it gone the image is unused."""
    (snapshot_id,), = db_rows(state_dir, "SELECT s.id FROM snapshots s JOIN images i ON i.id = s.image_id "
                                         "WHERE i.name = ? AND s.vm_id IS NULL", image)
    deleted = run(state_dir, "delete-snapshot", str(snapshot_id))
    assert deleted.returncode == 0, deleted.stderr[-2000:]


def test_the_cli_evicts_or_leaves_its_job_waiting_without_the_lock(state_dir: Path, big_bucket: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    setup = run(state_dir, "setup-pool", "--data-size", "320M", "--backend", "blockfile")
    assert setup.returncode == 0, setup.stderr[-2000:]
    first = process(state_dir, big_bucket, "big1")
    assert first.returncode == 0, first.stderr[-3000:]
    delete_first_snapshot(state_dir, "big1")

    # big2 does not fit beside big1 below the high watermark: the CLI evicts big1 (unused,
    # least recently used) as the daemon would, with the same log lines, and completes.
    second = process(state_dir, big_bucket, "big2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pool would cross the high watermark; evicting images first" in second.stderr, second.stderr[-3000:]
    assert re.search(r"image evicted\s+image=big1 ", second.stderr), second.stderr[-3000:]
    assert "image eviction finished" in second.stderr
    assert image_status(state_dir) == {"big1": "evicted", "big2": "active"}
    read_back(fields(second.stdout)["snapshot_device"], tmp_path / "big2", big_bucket["files"]["big2"])

    # big2 unused but pinned: nothing can be evicted. The CLI leaves big3's job waiting and
    # exits 1 with one line: the job, the space it needs, what to run.
    delete_first_snapshot(state_dir, "big2")
    assert run(state_dir, "images", "--pin", "big2").returncode == 0
    devices = pool_devices(state_dir)
    third = process(state_dir, big_bucket, "big3")
    assert third.returncode == 1, third.stdout + third.stderr[-3000:]
    (job_id, state, error, owner), = db_rows(state_dir, "SELECT id, state, error, owner_pid FROM jobs j "
                                                        "WHERE j.context LIKE '%big3%'")
    assert errors(third) == [
        f"error: job {job_id} left waiting: pool has no room below its high watermark (85%) for this layer: "
        + errors(third)[0].split("for this layer: ", 1)[1]], third.stderr[-3000:]
    line = errors(third)[0]
    assert re.search(r"needs about \d+\.\d MiB, \d+\.\d MiB free \(\d+\.\d% used\); free space "
                     r"\(gc --images --force\) or grow the pool \(setup-pool --grow SIZE\), then fsm resume$", line), line
    assert third.stdout == ""
    assert state == "creating_device" and owner is None, (state, owner)
    assert error == "waiting: " + line.split(" left waiting: ", 1)[1]
    assert db_rows(state_dir, "SELECT outcome FROM job_notes WHERE job_id = ?", job_id) == [("left waiting",)]
    assert pool_devices(state_dir) == devices  # no device made for a job that could not be admitted
    assert image_status(state_dir)["big2"] != "evicted"  # pinned: kept

    # The lock is free: the pool grows, and `fsm resume` finishes the job.
    grow = run(state_dir, "setup-pool", "--grow", "640M", "--backend", "blockfile")
    assert grow.returncode == 0, grow.stderr[-2000:]
    resume = run(state_dir, "fsm", "resume")
    assert resume.returncode == 0, resume.stdout + resume.stderr[-3000:]
    assert f"job {job_id} complete" in resume.stdout
    (snapshot_device,), = db_rows(state_dir, "SELECT s.device_id FROM snapshots s JOIN images i "
                                             "ON i.id = s.image_id WHERE i.name = 'big3'")
    path = next(d.path for d in pool_of(state_dir).list_devices() if d.device_id == snapshot_device)
    read_back(path, tmp_path / "big3", big_bucket["files"]["big3"])

    # A VM's snapshot is admitted too. With the high watermark just above the pool's usage
    # its journal does not fit, and nothing can be evicted (big2 pinned, big3 the job's own
    # image): the snapshot job is left waiting with the same one line; below a watermark
    # that fits, `fsm resume` makes it.
    used = usage(state_dir) * 100
    tight = {"FLYIO_POOL_HIGH_PERCENT": f"{int(used) + 1}", "FLYIO_POOL_LOW_PERCENT": f"{int(used)}"}
    vm = run(state_dir, "snapshot", "big3", "--vm", "vm-1", env=tight)
    line = one_line(vm)
    (vm_job, vm_state, vm_error), = db_rows(state_dir, "SELECT id, state, error FROM jobs WHERE workflow = 'snapshot'")
    assert line.startswith(f"error: job {vm_job} left waiting: pool has no room below its high watermark "
                           f"({int(used) + 1}%) for this snapshot: needs about 9.0 MiB, "), line
    assert line.endswith(", then fsm resume") and vm_state == "snapshotting" and vm_error.startswith("waiting: ")
    assert db_rows(state_dir, "SELECT count(*) FROM snapshots WHERE vm_id IS NOT NULL") == [(0,)]
    resume = run(state_dir, "fsm", "resume")
    assert resume.returncode == 0 and f"job {vm_job} complete" in resume.stdout, resume.stdout + resume.stderr[-3000:]
    assert db_rows(state_dir, "SELECT vm_id, state FROM snapshots WHERE vm_id IS NOT NULL") == [("vm-1", "ready")]


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert len(errors(result)) == 1 and result.stdout == "", result.stdout + result.stderr[-3000:]
    return errors(result)[0]
