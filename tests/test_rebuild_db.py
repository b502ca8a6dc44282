"""A VM's disk is never lost (issue 18), on real parts: the blockfile backend (real loop
devices, mkfs.ext4, an XFS pool), SeaweedFS over HTTP, real SQLite files, the real CLI.

Each scenario is one of the guide's own recovery paths that used to delete ready devices:
an older backup restored, the database lost, pages of it overwritten, eviction of an image
whose first snapshot a VM was given, and the Emergency Recovery reset. Afterwards the
catalog's view (`images --json`, `snapshots --json`) is what it was before the loss, gc
finds no orphan, a new VM snapshot works and a repeat process-image makes no device."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_backup import corrupt_middle
from tests.test_gc import gc, manager, pool_of, state_dir, summary  # noqa: F401  (state_dir: a fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
DEVICE_SIZE = "64M"
MISSING = "known to the pool, missing from the catalog: run rebuild-db --merge"
BEHIND = re.compile(r"^error: the catalog is behind the pool: (\d+) ready device\(s\) recorded beside the pool .*"
                    r"run `flyio-image-manager rebuild-db --merge`$")


def layer_tar(name: str, n: int) -> bytes:
    """A small layer of its own: a directory and two files named after the image and layer."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        folder = tarfile.TarInfo(f"srv/{name}")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(folder)
        for i in range(2):
            body = f"{name} layer {n} file {i}\n".encode() * 200
            info = tarfile.TarInfo(f"srv/{name}/layer-{n}-{i}.txt")
            info.size, info.mtime = len(body), 1_700_000_000 + n
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.fixture
def bucket(s3_client: Any, make_bucket: Callable[..., str]) -> str:
    """dsa (2 layers), dsb (3 layers), and three one-layer images one, two, three."""
    name = make_bucket("rebuild")
    for family, layers in (("dsa", 2), ("dsb", 3), ("one", 1), ("two", 1), ("three", 1)):
        for n in range(1, layers + 1):
            s3_client.put_object(Bucket=name, Key=f"images/{family}/{n}.tar", Body=layer_tar(family, n))
    return name


class Host:
    """The CLI on one state directory and one bucket."""

    def __init__(self, state_dir: Path, bucket: str, endpoint: str) -> None:
        self.state_dir, self.bucket, self.endpoint = state_dir, bucket, endpoint

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return manager(self.state_dir, *args, env={"FLYIO_BACKEND": "blockfile"})

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    def process(self, family: str) -> subprocess.CompletedProcess[str]:
        return self.run("process-image", "--image", family, "--bucket", self.bucket, "--endpoint-url", self.endpoint,
                        "--device-size", DEVICE_SIZE)

    def view(self) -> dict[str, Any]:
        """What an operator sees of the catalog: images and snapshots, without ids and times."""
        images = json.loads(self.ok("images", "--json"))
        snapshots = json.loads(self.ok("snapshots", "--json"))
        return {
            "images": sorted((i["name"], i["source"], i["layer_count"], i["activation_status"], i["top_device"],
                              i["pinned"]) for i in images),
            "snapshots": sorted((s["device_name"], s["state"], s["image"], s["vm_id"], s["size_bytes"],
                                 s["origin_device_id"]) for s in snapshots),
        }

    def devices(self) -> set[str]:
        return {device.name for device in pool_of(self.state_dir).list_devices()}

    @property
    def db(self) -> Path:
        return self.state_dir / "images.db"

    def drop_database(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            self.db.with_name(self.db.name + suffix).unlink(missing_ok=True)

    def after_recovery(self, before: dict[str, Any]) -> None:
        """What must hold once the catalog is back: the same view, no orphan, a new VM
        snapshot, a repeat process-image that makes no device."""
        assert self.view() == before
        dry = gc(self.state_dir, "--dry-run")
        assert summary(dry.stdout)["orphaned"] == 0 and MISSING not in dry.stdout, dry.stdout[-3000:]
        devices = self.devices()
        for family in ("dsa", "dsb"):
            again = self.process(family)
            assert again.returncode == 0 and "state=complete" in again.stdout, again.stderr[-3000:]
        assert self.devices() == devices, "a repeat process-image made or deleted a device"
        made = self.ok("snapshot", "dsb", "--vm", "vm-new")
        assert "state=complete" in made
        assert len(self.devices() - devices) == 1


@pytest.fixture
def host(state_dir: Path, bucket: str, s3_server: Any) -> Host:
    return Host(state_dir, bucket, s3_server.endpoint_url)


def two_images_and_a_vm(host: Host) -> None:
    for family in ("dsa", "dsb"):
        done = host.process(family)
        assert done.returncode == 0, done.stderr[-3000:]
    host.ok("snapshot", "dsa", "--vm", "vm-after-backup", "--size", "96M")


def test_an_older_backup_restored_is_noticed_merged_and_never_cleaned(host: Host) -> None:
    assert host.process("dsa").returncode == 0
    host.ok("backup")
    assert host.process("dsb").returncode == 0
    host.ok("snapshot", "dsa", "--vm", "vm-after-backup", "--size", "96M")
    before = host.view()
    devices = host.devices()
    assert len(devices) == 8  # dsa: 2 layers + 1 snapshot; dsb: 3 + 1; vm-after-backup's disk

    # The guide's Database Corruption step, to the letter.
    shutil.copyfile(host.state_dir / "images.db.backup", host.db)
    check = host.run("check-db")
    assert check.returncode == 1, check.stdout
    (line,) = check.stderr.strip().splitlines()
    assert "is behind the pool: 5 ready device(s)" in line and line.endswith("rebuild-db --merge`")

    # The guide's weekly maintenance finds no orphan, and deletes nothing.
    dry = gc(host.state_dir, "--dry-run")
    assert summary(dry.stdout) == {"cleaned": 0, "failed": 0, "orphaned": 0, "skipped": 0, "total_devices": 8}
    assert len(re.findall(rf"{re.escape(MISSING)}\s+device_id=\d+", dry.stdout)) == 5
    force = gc(host.state_dir, "--force")
    assert force.returncode == 0 and summary(force.stdout)["cleaned"] == 0, force.stdout[-3000:]
    assert host.devices() == devices

    # Every command that changes devices refuses the older view, in one line.
    for args in (("snapshot", "dsa", "--vm", "vm-x"), ("delete-snapshot", "--vm", "vm-after-backup"),
                 ("gc", "--images", "--force", "--all")):
        refused = host.run(*args)
        assert refused.returncode == 1, args
        assert BEHIND.match(refused.stderr.strip().splitlines()[-1]), (args, refused.stderr)
    refused = host.process("dsb")
    assert refused.returncode == 1 and BEHIND.match(refused.stderr.strip().splitlines()[-1]), refused.stderr
    assert host.devices() == devices

    merged = host.ok("rebuild-db", "--merge")
    assert "merged: images=1 layers=3 snapshots=2 jobs=2" in merged, merged
    assert "nothing to merge" in host.ok("rebuild-db", "--merge")
    assert "integrity_check ok" in host.ok("check-db")
    host.after_recovery(before)


def test_a_lost_database_is_rebuilt_from_the_pool(host: Host) -> None:
    two_images_and_a_vm(host)
    host.ok("images", "--pin", "dsb")
    before = host.view()
    host.drop_database()

    for refused in (host.process("dsa"), host.run("snapshot", "dsa", "--vm", "vm-x")):
        assert refused.returncode == 1 and BEHIND.match(refused.stderr.strip().splitlines()[-1]), refused.stderr
    dry = gc(host.state_dir, "--dry-run")
    assert summary(dry.stdout)["orphaned"] == 0 and len(re.findall(re.escape(MISSING), dry.stdout)) == 8

    rebuilt = host.ok("rebuild-db")
    assert "rebuilt: images=2 layers=5 snapshots=3 jobs=3" in rebuilt, rebuilt
    history = host.ok("fsm", "history", "1", "--json")
    assert json.loads(history)[0]["event"] == "rebuilt"
    host.after_recovery(before)
    # A new device id never collides with one already in the pool.
    ids = sorted(int(name.removeprefix("thin-")) for name in host.devices())
    assert len(ids) == len(set(ids)) == 9


def test_a_healthy_database_is_kept_unless_forced_and_a_corrupt_one_is_rebuilt(host: Host) -> None:
    two_images_and_a_vm(host)
    before = host.view()
    refused = host.run("rebuild-db")
    assert refused.returncode == 1 and "is healthy; `rebuild-db --merge`" in refused.stderr
    assert "nothing to merge" in host.ok("rebuild-db", "--merge")

    # Pages overwritten, as a bad disk would: check-db fails, rebuild-db --force restores the view.
    with sqlite3.connect(host.db) as conn:  # enough rows that the middle page holds some
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    corrupt_middle(host.db)
    assert host.run("check-db").returncode == 1
    rebuilt = host.ok("rebuild-db", "--force")
    assert "old database kept aside:" in rebuilt and "rebuilt: images=2" in rebuilt, rebuilt
    assert any(p.name.startswith("images.db.corrupt-") for p in host.state_dir.iterdir())
    host.after_recovery(before)


def test_eviction_never_deletes_a_ready_snapshot(host: Host) -> None:
    for family in ("one", "two", "three"):
        assert host.process(family).returncode == 0
    host.ok("images", "--pin", "three")
    snapshots = {s["image"]: s for s in json.loads(host.ok("snapshots", "--json"))}
    devices = host.devices()

    evicted = host.ok("gc", "--images", "--force", "--all")
    assert "images: evicted=0" in evicted, evicted
    for family in ("one", "two"):
        snap = snapshots[family]
        assert (f"kept image={family} reason=\"its snapshot {snap['device_name']} (ready, process-image's) may be a "
                f"VM's disk; delete-snapshot {snap['id']} frees it\"") in evicted, evicted
    assert "kept image=three reason='pinned'" in evicted
    assert host.devices() == devices

    # Only delete-snapshot deletes a snapshot; then the image is unused and may go.
    host.ok("delete-snapshot", str(snapshots["one"]["id"]))
    evicted = host.ok("gc", "--images", "--force", "--all")
    assert "evicted image=one" in evicted and "images: evicted=1" in evicted, evicted
    assert host.devices() == devices - {snapshots["one"]["device_name"], "thin-1"}


def test_emergency_recovery_leaves_nothing_stale(host: Host) -> None:
    two_images_and_a_vm(host)
    reset = subprocess.run(["bash", str(REPO / "test-scripts" / "reset-devicemapper.sh"), "--state-dir",
                            str(host.state_dir), "--yes"], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "FLYIO_BACKEND": "blockfile"})
    assert reset.returncode == 0, reset.stdout + reset.stderr
    with sqlite3.connect(host.db) as conn:  # the guide's Step 3
        conn.execute("DELETE FROM unpacked_images")
        conn.execute("DELETE FROM snapshots")
    assert host.devices() == set()
    assert "nothing to merge" in host.ok("rebuild-db", "--merge")
    dry = gc(host.state_dir, "--dry-run")
    assert summary(dry.stdout) == {"cleaned": 0, "failed": 0, "orphaned": 0, "skipped": 0, "total_devices": 0}
    assert "integrity_check ok" in host.ok("check-db")
    # Processing again re-creates the image.
    again = host.process("dsa")
    assert again.returncode == 0 and "state=complete" in again.stdout, again.stderr[-3000:]


def test_gc_says_which_kind_of_orphan_each_device_is(host: Host) -> None:
    from catalog.device_records import RecordStore

    assert host.process("dsa").returncode == 0
    pool = pool_of(host.state_dir)
    pool.create_thin(9000, 16 * 1024**2)  # made by something else: no record
    records = RecordStore(host.state_dir)
    # An intent that never finished: the record of a create whose row was lost with a crash.
    layer = next(r for r in records.devices().values() if r.kind == "layer")
    from dataclasses import replace

    from catalog.device_records import RecordState

    records.write_device(replace(layer, device_id=9001, state=RecordState.CREATING))
    pool.create_thin(9001, 16 * 1024**2)
    dry = gc(host.state_dir, "--dry-run")
    assert re.search(r"Found orphaned device\s+device_id=9000 device_name=thin-9000 mounted=false orphan=no-record$",
                     dry.stdout, re.MULTILINE), dry.stdout
    assert re.search(r"device_name=thin-9001 mounted=false orphan=unfinished-intent$", dry.stdout, re.MULTILINE)
    force = gc(host.state_dir, "--force")
    assert summary(force.stdout)["cleaned"] == 2
    assert not records.has_device(9001)


def test_a_catalog_from_before_records_is_described_once_then_survives_its_loss(host: Host) -> None:
    two_images_and_a_vm(host)
    shutil.rmtree(host.state_dir / "records")  # a host upgraded from before devices described themselves
    before = host.view()
    host.ok("snapshot", "dsa", "--vm", "vm-after-upgrade")  # the first command that opens the pool
    records = sorted(p.name for p in (host.state_dir / "records" / "devices").iterdir())
    assert len(records) == len(host.devices()) == 9, records
    assert len(list((host.state_dir / "records" / "images").iterdir())) == 2
    host.ok("delete-snapshot", "--vm", "vm-after-upgrade")
    host.drop_database()
    assert "rebuilt: images=2 layers=5 snapshots=3" in host.ok("rebuild-db")
    host.after_recovery(before)
