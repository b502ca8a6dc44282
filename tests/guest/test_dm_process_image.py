"""process-image end to end on the devicemapper backend, INSIDE the QEMU guest:
SeaweedFS on the guest's 127.0.0.1, the golang and node families (layers 1-3 shared) and
the 3-layer `whiteout` family at ~1 MB, 64M thin devices, and the mounted snapshots
compared with demo.samples.expected_tree.
"""

from __future__ import annotations

import json
import os
import sqlite3
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


def process(state_dir: Path, family: str, bucket: str, endpoint_url: str) -> dict[str, str]:
    # A subprocess like an operator's run (not run_command: its output is the subject).
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--image", family,
         "--bucket", bucket, "--endpoint-url", endpoint_url, "--backend", "devicemapper", "--device-size", "64M"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split())
    assert result["state"] == "complete"
    assert result["snapshot_device"].startswith("/dev/mapper/thin-")
    return {**result, "log": done.stderr}


def test_process_image_on_dm_thin(state_dir: Path, tmp_path: Path) -> None:
    """golang, then node (layers 1-3 shared: thin snapshot chains reused, stored once), then
    the whiteout family; each mounted snapshot equals the tree built without the unpacker."""
    from demo.s3server import start_s3_server
    from images.source import make_s3_client

    families = ("golang", "node", FAMILY)
    samples = tmp_path / "samples"
    build_families(samples, SCALE_MB, families=families)
    with start_s3_server(tmp_path / "s3", timeout=240) as server:
        client = make_s3_client(server.endpoint_url, anonymous=True)
        client.create_bucket(Bucket="guest-samples")
        upload_families(client, "guest-samples", samples)
        results = {family: process(state_dir, family, "guest-samples", server.endpoint_url) for family in families}

    first = results["golang"]["log"]
    for line in ("pool does not exist, attempting to create", "creating new thin pool", "thin pool created successfully"):
        assert line in first
    assert "thin-pool" in run_command(["dmsetup", "table", "pool"], timeout=10).stdout
    # node shares golang's layers 1-3; the whiteout family starts from the same layer 1.
    reused = {family: results[family]["log"].count("layer already unpacked; reusing its device") for family in families}
    assert reused == {"golang": 0, "node": 3, FAMILY: 1}

    # Stored once: one thin device per distinct layer chain (5 + 2 + 2) plus one snapshot per image,
    # and the pool holds exactly the devices the catalog names.
    with sqlite3.connect(state_dir / "images.db") as db:
        chains = [row[0] for row in db.execute("SELECT device_name FROM unpacked_images WHERE state='ready'")]
        snapshots = [row[0] for row in db.execute("SELECT device_name FROM snapshots WHERE state='ready'")]
    layer_count = sum(len(family_layers(family, SCALE_MB)) for family in families)
    assert len(chains) == layer_count - sum(reused.values()) == 9 and len(snapshots) == 3
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    assert sorted(d.name for d in pool.list_devices()) == sorted(chains + snapshots)

    for family in ("node", FAMILY):
        target = tmp_path / f"mnt-{family}"
        target.mkdir()
        with mounted(results[family]["snapshot_device"], target, read_only=True, options=(*DEFAULT_OPTIONS, "noload")):
            actual = snapshot_tree(target)
        assert diff_trees(expected_tree(family_layers(family, SCALE_MB)), actual) == [], family

    vm_snapshots_on_dm_thin(state_dir, tmp_path, "node")


def vm_snapshots_on_dm_thin(state_dir: Path, tmp_path: Path, image: str) -> None:
    """10 VMs of one image on dm-thin: 10 distinct thin snapshots of its top layer device;
    one bigger than the origin (activated at its own size, ext4 grown); a file one VM
    writes is in no other VM's snapshot. Two through the CLI, eight in-process (TCG makes
    each interpreter start cost seconds)."""
    from cli.app import open_store
    from states.registry import open_environment
    from states.vm_snapshot import process_snapshot_request, resolve_snapshot_request

    devices: dict[str, str] = {}
    for vm, extra in (("vm-0", ["--size", "128M"]), ("vm-1", [])):
        done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "snapshot", image,
                               "--vm", vm, "--backend", "devicemapper", *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        devices[vm] = dict(p.split("=", 1) for p in done.stdout.strip().splitlines()[-1].split())["snapshot_device"]
    store = open_store(state_dir)
    environment = open_environment(state_dir, store, backend="devicemapper")
    for n in range(2, 10):
        with store.transaction() as session:
            request = resolve_snapshot_request(session, image, f"vm-{n}", None)
        job = process_snapshot_request(environment.runner, request, environment.services)
        assert job.state == "complete", job.error
        devices[f"vm-{n}"] = json.loads(job.context)["snapshot_device"]
    assert len(set(devices.values())) == 10 and all(d.startswith("/dev/mapper/thin-") for d in devices.values())
    size = int(run_command(["blockdev", "--getsize64", devices["vm-0"]], timeout=30).stdout)
    assert size == 128 * 1024**2, size  # the dm table's length is the snapshot row's size

    writer = tmp_path / "vm-writer"
    writer.mkdir()
    with mounted(devices["vm-3"], writer, options=DEFAULT_OPTIONS):
        (writer / "written-by-vm-3").write_bytes(b"mine")
    reader = tmp_path / "vm-reader"
    reader.mkdir()
    for vm, device in sorted(devices.items()):
        with mounted(device, reader, read_only=True, options=(*DEFAULT_OPTIONS, "noload")):
            assert (reader / "written-by-vm-3").exists() == (vm == "vm-3"), vm
            if vm == "vm-0":
                stat = os.statvfs(reader)
                assert stat.f_blocks * stat.f_frsize > 100 * 1024**2  # grown past the origin's 64M
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    with sqlite3.connect(state_dir / "images.db") as db:
        named = [row[0] for row in db.execute("SELECT device_name FROM unpacked_images UNION ALL "
                                              "SELECT device_name FROM snapshots")]
    assert sorted(d.name for d in pool.list_devices()) == sorted(named) and len(named) == len(set(named))
