"""One snapshot per VM, sizes that follow the device, and the device ledger, on real parts:
SeaweedFS over HTTP, real SQLite, real loop devices, mkfs.ext4, resize2fs and mounts
(blockfile backend on this kernel; tests/guest/test_dm_snapshots.py does it on dm-thin)."""

from __future__ import annotations

import io
import json
import os
import random
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.killpoints import (SNAPSHOT_KILL_POINTS, assert_every_device_named_once, db_rows, manager, pool_devices,
                              run_until)
from tests.test_process_image import fields, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
MB = 1024**2


def layer_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, body in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(body), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    teardown(directory)


@pytest.fixture
def images_bucket(s3_client: Any, make_bucket: Any, s3_server: Any) -> dict[str, str]:
    """Images fa (layers 1, 2a) and fb (layers 1, 2b): the same base layer, as in the issue."""
    bucket = make_bucket("vmsnap")
    base = layer_tar({"etc/os-release": b"base\n", "usr/bin/tool": b"#!/bin/sh\n"})
    for family, top in (("fa", b"a"), ("fb", b"b")):
        s3_client.put_object(Bucket=bucket, Key=f"images/{family}/1.tar", Body=base)
        s3_client.put_object(Bucket=bucket, Key=f"images/{family}/2.tar",
                             Body=layer_tar({f"srv/{family}": top * 100, "etc/motd": top}))
    return {"bucket": bucket, "endpoint": s3_server.endpoint_url}


def process(state_dir: Path, source: dict[str, str], family: str, size: str) -> subprocess.CompletedProcess[str]:
    return manager(state_dir, "process-image", "--image", family, "--bucket", source["bucket"],
                   "--endpoint-url", source["endpoint"], "--device-size", size)


def catalog_dump(state_dir: Path) -> dict[str, list[tuple]]:
    return {table: db_rows(state_dir, f"SELECT * FROM {table} ORDER BY 1")
            for table in ("jobs", "job_events", "unpacked_images", "snapshots", "orphaned_devices", "images")}


def mounted(device: str, target: Path, *options: str) -> subprocess.CompletedProcess[str]:
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-o", ",".join(("nodev", "nosuid", *options)), device, str(target)],
                          capture_output=True, text=True, timeout=60, check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True, timeout=60, check=True)


def test_sizes_follow_the_device_and_snapshots_grow(state_dir: Path, images_bucket: dict[str, str],
                                                    tmp_path: Path) -> None:
    """The issue's case: fa at one size, fb (same base layer) at another; both complete,
    their snapshots mount, and the log says the chain kept its own size. Then a VM snapshot
    larger than its origin gets a grown ext4; a smaller one is one error line, nothing made."""
    fa = process(state_dir, images_bucket, "fa", "512M")
    assert fa.returncode == 0, fa.stderr[-3000:]
    fb = process(state_dir, images_bucket, "fb", "256M")
    assert fb.returncode == 0, fb.stderr[-3000:]
    assert "layer chain keeps its own size" in fb.stderr and f"size={512 * MB}" in fb.stderr
    assert f"requested_size={256 * MB}" in fb.stderr
    sizes = dict(db_rows(state_dir, "SELECT device_name, size_bytes FROM unpacked_images"))
    assert sorted(sizes.values()) == [512 * MB] * 3  # base, fa's top, fb's top: the chain's size stands
    for result, family in ((fa, "fa"), (fb, "fb")):
        line = fields(result.stdout)
        target = tmp_path / family
        mounted(line["snapshot_device"], target, "ro", "noload")
        try:
            assert (target / "srv" / family).read_bytes() == family[1].encode() * 100
        finally:
            umount(target)

    big = manager(state_dir, "snapshot", "fa", "--vm", "vm-big", "--size", "1G")
    assert big.returncode == 0, big.stderr[-3000:]
    line = fields(big.stdout)
    assert line["state"] == "complete" and line["vm"] == "vm-big" and line["size"] == str(1024 * MB)
    target = tmp_path / "big"
    mounted(line["snapshot_device"], target, "ro", "noload")
    try:
        statvfs = os.statvfs(target)
        assert statvfs.f_blocks * statvfs.f_frsize > 900 * MB  # df: the grown filesystem, not the origin's 512M
        assert (target / "srv" / "fa").exists()
    finally:
        umount(target)

    before, devices = catalog_dump(state_dir), pool_devices(state_dir)
    small = manager(state_dir, "snapshot", "fa", "--vm", "vm-small", "--size", "128M")
    assert small.returncode == 1
    assert small.stderr.strip().splitlines() == [
        f"error: --size {128 * MB} bytes is below image 'fa''s device size {512 * MB} bytes; "
        "a snapshot can only be the same size or larger"]
    assert catalog_dump(state_dir) == before and pool_devices(state_dir) == devices

    listing = json.loads(manager(state_dir, "snapshots", "--json").stdout)
    assert {(row["vm_id"], row["size_bytes"]) for row in listing} == {(None, 512 * MB), (None, 512 * MB),
                                                                       ("vm-big", 1024 * MB)}
    assert_every_device_named_once(state_dir)


def test_fifty_vm_snapshots_are_fifty_distinct_devices(state_dir: Path, images_bucket: dict[str, str],
                                                       tmp_path: Path) -> None:
    """50 VMs of one image: 50 devices; a file one VM writes is in no other VM's snapshot
    and not in the image's layers. The first few through the CLI (and once more, to show
    it is idempotent), the rest through the same code in-process to keep the test short."""
    from cli.app import open_store
    from states.registry import open_environment
    from states.vm_snapshot import process_snapshot_request, resolve_snapshot_request

    assert process(state_dir, images_bucket, "fa", "64M").returncode == 0
    by_cli = {}
    for vm in ("vm-0", "vm-1", "vm-2", "vm-0"):
        done = manager(state_dir, "--quiet", "snapshot", "fa", "--vm", vm)
        assert done.returncode == 0, done.stderr[-3000:]
        by_cli.setdefault(vm, fields(done.stdout)["snapshot"])
        assert fields(done.stdout)["snapshot"] == by_cli[vm]  # the second vm-0 is the same snapshot

    store = open_store(state_dir)
    environment = open_environment(state_dir, store, backend="blockfile")
    for n in range(3, 50):
        with store.transaction() as session:
            request = resolve_snapshot_request(session, "fa", f"vm-{n}", None)
        assert process_snapshot_request(environment.runner, request, environment.services).state == "complete"

    rows = db_rows(state_dir, "SELECT vm_id, device_id FROM snapshots WHERE vm_id IS NOT NULL")
    assert len(rows) == 50 and len({vm for vm, _ in rows}) == 50 and len({dev for _, dev in rows}) == 50
    contexts = [json.loads(c) for (c,) in db_rows(state_dir, "SELECT context FROM jobs WHERE workflow='snapshot'")]
    paths = {ctx["vm_id"]: ctx["snapshot_device"] for ctx in contexts}
    assert len(set(paths.values())) == 50

    writer = tmp_path / "writer"
    mounted(paths["vm-7"], writer, "rw")
    try:
        (writer / "srv" / "written-by-vm-7").write_bytes(b"mine")
    finally:
        umount(writer)
    reader = tmp_path / "reader"
    for vm, device in sorted(paths.items()):
        mounted(device, reader, "ro", "noload")
        try:
            assert (reader / "srv" / "written-by-vm-7").exists() == (vm == "vm-7"), vm
            assert (reader / "srv" / "fa").exists()
        finally:
            umount(reader)
    env = open_environment(state_dir, store, backend="blockfile", ensure_pool=False)
    for (device_id,) in db_rows(state_dir, "SELECT device_id FROM unpacked_images"):
        path = env.services.pool.activate(device_id, 64 * MB)
        mounted(path, reader, "ro", "noload")
        try:
            assert not (reader / "srv" / "written-by-vm-7").exists()
        finally:
            umount(reader)
            env.services.pool.deactivate(device_id)
    assert_every_device_named_once(state_dir)


def test_snapshot_of_an_incomplete_or_unknown_image_is_one_line(state_dir: Path, images_bucket: dict[str, str]) -> None:
    assert process(state_dir, images_bucket, "fa", "64M").returncode == 0
    with sqlite3.connect(state_dir / "images.db") as db:  # the image's job no longer complete
        db.execute("UPDATE jobs SET state='unpacking' WHERE workflow='image'")
    before = catalog_dump(state_dir)
    for image, expected in (("fa", "error: image 'fa' (id 1) is not complete; `fsm show 1` says where its job stands"),
                            ("nope", "error: image 'nope' not found; `images` lists them")):
        done = manager(state_dir, "snapshot", image, "--vm", "vm-x")
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [expected], done.stderr
    assert catalog_dump(state_dir) == before


def test_delete_snapshot_by_vm(state_dir: Path, images_bucket: dict[str, str]) -> None:
    """--vm deletes that VM's snapshot through the ledger; a VM with none is one error line
    and changes nothing; the VM can then get a new snapshot (its job is reopened)."""
    assert process(state_dir, images_bucket, "fa", "64M").returncode == 0
    first = fields(manager(state_dir, "snapshot", "fa", "--vm", "vm-a").stdout)
    before, devices = catalog_dump(state_dir), pool_devices(state_dir)
    missing = manager(state_dir, "--quiet", "delete-snapshot", "--vm", "vm-nobody")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == ["error: VM 'vm-nobody' has no snapshot"]
    assert catalog_dump(state_dir) == before and pool_devices(state_dir) == devices

    done = manager(state_dir, "delete-snapshot", "--vm", "vm-a")
    assert done.returncode == 0 and first["snapshot"] in done.stdout, done.stderr
    assert int(first["snapshot"].split("-")[1]) not in pool_devices(state_dir)
    assert db_rows(state_dir, "SELECT count(*) FROM snapshots WHERE vm_id='vm-a'") == [(0,)]

    again = manager(state_dir, "snapshot", "fa", "--vm", "vm-a")
    assert again.returncode == 0 and fields(again.stdout)["snapshot"] != first["snapshot"]
    assert fields(again.stdout)["job_id"] == first["job_id"]  # the same job, reopened
    assert_every_device_named_once(state_dir)


@pytest.mark.slow
def test_kill_minus_nine_anywhere_in_the_snapshot_job_then_resume(state_dir: Path, images_bucket: dict[str, str]) -> None:
    """≥ 20 SIGKILLs, each at a named log event of a real `snapshot` run (every kill point
    at least twice), then `fsm resume`: every job complete, every device named by exactly
    one row, no snapshot shared by two VMs."""
    assert process(state_dir, images_bucket, "fa", "64M").returncode == 0
    rng = random.Random(8)
    points = [point.name for point in SNAPSHOT_KILL_POINTS] * 4
    rng.shuffle(points)
    hits: dict[str, int] = {}
    for trial, point in enumerate(points[:24]):
        size = ["--size", "96M"] if trial % 3 == 0 else []
        if run_until(state_dir, ["snapshot", "fa", "--vm", f"vm-{trial}", *size], point).hit:
            hits[point] = hits.get(point, 0) + 1
        resumed = manager(state_dir, "fsm", "resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_every_device_named_once(state_dir)
    assert sum(hits.values()) >= 20 and all(count >= 2 for count in hits.values()), hits
    states = db_rows(state_dir, "SELECT state, count(*) FROM jobs WHERE workflow='snapshot' GROUP BY state")
    assert states == [("complete", 24)], states
    rows = db_rows(state_dir, "SELECT vm_id, device_id, state FROM snapshots WHERE vm_id IS NOT NULL")
    assert len(rows) == 24 and len({r[0] for r in rows}) == 24 and len({r[1] for r in rows}) == 24
    assert {r[2] for r in rows} == {"ready"}
    dry = manager(state_dir, "gc", "--dry-run")
    force = manager(state_dir, "gc", "--force")
    assert dry.returncode == 0 and force.returncode == 0, force.stderr[-3000:]
    assert db_rows(state_dir, "SELECT count(*) FROM orphaned_devices WHERE cleaned_at IS NULL") == [(0,)]
    live = {r[0] for r in db_rows(state_dir, "SELECT device_id FROM unpacked_images UNION SELECT device_id FROM snapshots")}
    assert pool_devices(state_dir) == live
