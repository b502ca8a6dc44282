"""Capacity on real parts (issue 12): a small blockfile pool filled with distinct images
past its high watermark, evicted below its low one, with a pinned image, an image with a
live (mounted, written) VM snapshot and a layer chain shared with a kept image surviving
and reading back; online growth while a snapshot is mounted and written; the usage policy's
one-line errors; admission against a real pool. SeaweedFS, SQLite, loop devices, XFS, mkfs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_vm_snapshots import (catalog_dump, db_rows, fields, layer_tar, manager, mounted, pool_devices,
                                     state_dir, umount)  # noqa: F401  (state_dir is a fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
MB = 1024**2
POOL = "320M"  # XFS's smallest: 256 MiB of data blocks
FILLS = 20
FILL = {"FLYIO_POOL_HIGH_PERCENT": "99", "FLYIO_POOL_LOW_PERCENT": "98"}  # let the fill go past 85%


def blob(seed: str, size: int) -> bytes:
    """`size` incompressible bytes, the same for the same seed."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(MB, size - offset)) for offset in range(0, size, MB))


def pool_of(state_dir: Path) -> Any:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    return BlockfilePool(PoolConfig(directory=str(state_dir)))


def usage(state_dir: Path) -> float:
    return pool_of(state_dir).get_pool_status().data_used_fraction


def run(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return manager(state_dir, *args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def process(state_dir: Path, bucket: dict[str, str], family: str, env: dict[str, str] | None = None) -> dict[str, str]:
    result = run(state_dir, "process-image", "--image", family, "--bucket", bucket["bucket"], "--endpoint-url",
                 bucket["endpoint"], "--device-size", "64M", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return fields(result.stdout)


def fill_past_high_watermark(state_dir: Path, bucket: dict[str, Any]) -> list[str]:
    """Process distinct images until data usage is at or above 85%; their names, in order."""
    filled: list[str] = []
    big = small = 0
    while usage(state_dir) < 0.85:
        if usage(state_dir) < 0.80:
            name, big = f"fill-{big}", big + 1
        else:
            name, small = f"small-{small}", small + 1
        assert big <= FILLS and small <= FILLS, f"{usage(state_dir):.1%} after {filled}"
        process(state_dir, bucket, name, FILL)
        filled.append(name)
    return filled


def read_back(device: str, target: Path, expected: dict[str, bytes], *options: str) -> None:
    mounted(device, target, "ro", "noload", *options)
    try:
        for path, body in expected.items():
            assert hashlib.sha256((target / path).read_bytes()).digest() == hashlib.sha256(body).digest(), path
    finally:
        umount(target)


def image_status(state_dir: Path) -> dict[str, str]:
    return dict(db_rows(state_dir, "SELECT name, activation_status FROM images"))


def release_first_snapshots(state_dir: Path, names: list[str]) -> None:
    """The VMs given these images' first snapshots (process-image's) are gone: their disks
    are deleted, as an operator does, so the images are unused (eviction deletes no snapshot)."""
    for name in names:
        (snapshot_id,) = db_rows(state_dir, "SELECT s.id FROM snapshots s JOIN images i ON i.id = s.image_id "
                                            f"WHERE i.name = '{name}' AND s.vm_id IS NULL")[0]
        done = run(state_dir, "delete-snapshot", str(snapshot_id), "--backend", "blockfile")
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def capacity_bucket(s3_client: Any, make_bucket: Any, s3_server: Any) -> dict[str, Any]:
    """fam-a and fam-b share base layer `base` (8 MB); `pinned` and `vm` are single-layer
    images; fill-N are distinct 12 MB single-layer images (about 5% of the pool each, the
    image's fixed cost included) and small-N 2 MB ones (about 1%: the fill's last steps, so
    it lands between 85% and the 90% above which the pool refuses new devices)."""
    bucket = make_bucket("capacity")
    files: dict[str, dict[str, bytes]] = {}

    def put(family: str, layers: list[dict[str, bytes]]) -> None:
        files[family] = {}
        for n, layer in enumerate(layers, start=1):
            s3_client.put_object(Bucket=bucket, Key=f"images/{family}/{n}.tar", Body=layer_tar(layer))
            files[family].update(layer)

    base = {"usr/lib/base.bin": blob("base", 8 * MB)}
    put("fam-a", [base, {"srv/a.bin": blob("a", 2 * MB)}])
    put("fam-b", [base, {"srv/b.bin": blob("b", 2 * MB)}])
    put("pinned", [{"srv/pinned.bin": blob("pinned", 4 * MB)}])
    put("vm", [{"srv/vm.bin": blob("vm", 4 * MB)}])
    for n in range(FILLS):
        put(f"fill-{n}", [{f"srv/fill-{n}.bin": blob(f"fill-{n}", 12 * MB)}])
        put(f"small-{n}", [{f"srv/small-{n}.bin": blob(f"small-{n}", 2 * MB)}])
    return {"bucket": bucket, "endpoint": s3_server.endpoint_url, "files": files}


def test_eviction_frees_the_pool_and_keeps_what_is_used(state_dir: Path, capacity_bucket: dict[str, Any],
                                                       tmp_path: Path) -> None:
    files = capacity_bucket["files"]
    setup = run(state_dir, "setup-pool", "--data-size", POOL, "--backend", "blockfile")
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert re.search(r"^pool usage: data=\d+\.\d% .* warn=80% high=85% low=75%$", setup.stdout, re.MULTILINE), setup.stdout

    fam_a = process(state_dir, capacity_bucket, "fam-a", FILL)  # the least recently used
    fam_b = process(state_dir, capacity_bucket, "fam-b", FILL)
    pinned = process(state_dir, capacity_bucket, "pinned", FILL)
    process(state_dir, capacity_bucket, "vm", FILL)
    pin = run(state_dir, "images", "--pin", "fam-b")
    assert pin.returncode == 0 and pin.stdout.strip() == "image fam-b pinned", pin.stderr
    assert run(state_dir, "images", "--pin", "pinned").returncode == 0
    vm = run(state_dir, "snapshot", "vm", "--vm", "vm-1")
    assert vm.returncode == 0, vm.stderr[-2000:]
    vm_device = fields(vm.stdout)["snapshot_device"]
    # The VM's snapshot is live: mounted read-write and written, as a VM would.
    vm_mount = tmp_path / "vm-live"
    mounted(vm_device, vm_mount)
    (vm_mount / "written-by-vm").write_bytes(b"vm data\n")
    os.sync()
    try:
        filled = fill_past_high_watermark(state_dir, capacity_bucket)
        release_first_snapshots(state_dir, ["fam-a", *filled])
        before = usage(state_dir)
        assert before >= 0.85, f"the fill did not pass the high watermark: {before:.1%}"

        # The dry run lists what would go, and changes nothing.
        catalog, devices = catalog_dump(state_dir), pool_devices(state_dir)
        dry = run(state_dir, "gc", "--images", "--backend", "blockfile")
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert "would evict image=fam-a " in dry.stdout and "DRY RUN" in dry.stdout, dry.stdout
        assert re.search(r"kept image=fam-b reason='pinned'", dry.stdout)
        assert re.search(r"kept image=vm reason='VM vm-1 has a snapshot of it'", dry.stdout)
        assert catalog_dump(state_dir) == catalog and pool_devices(state_dir) == devices
        assert usage(state_dir) == pytest.approx(before, abs=0.005)

        top_a = db_rows(state_dir, "SELECT u.device_id FROM images i JOIN unpacked_images u "
                                   "ON u.chain_id = i.top_chain_id WHERE i.name = 'fam-a'")[0][0]
        base_chain = db_rows(state_dir, "SELECT chain_id FROM image_layers il JOIN images i ON i.id = il.image_id "
                                        "WHERE i.name = 'fam-a' AND position = 0")[0][0]
        force = run(state_dir, "gc", "--images", "--force", "--backend", "blockfile")
        assert force.returncode == 0, force.stdout[-3000:] + force.stderr[-2000:]
        assert re.search(r"image evicted\s+image=fam-a ", force.stdout), force.stdout
        after = usage(state_dir)
        assert after < 0.75, f"eviction left {after:.1%}\n{force.stdout[-3000:]}"
        statuses = image_status(state_dir)
        assert statuses["fam-a"] == "evicted"
        assert statuses["fam-b"] == statuses["pinned"] == statuses["vm"] == "active"
        assert re.search(r"kept image=vm reason='VM vm-1 has a snapshot of it'", force.stdout)
        assert top_a not in pool_devices(state_dir)
        # fam-a's base chain is fam-b's too: it stays.
        assert db_rows(state_dir, f"SELECT state FROM unpacked_images WHERE chain_id = '{base_chain}'") == [("ready",)]
        evicted_fills = [name for name in filled if statuses[name] == "evicted"]
        assert evicted_fills == filled[:len(evicted_fills)], "not least recently used first"

        # Survivors read back bit for bit; the live VM's mount kept working throughout.
        assert (vm_mount / "written-by-vm").read_bytes() == b"vm data\n"
        read_back(fam_b["snapshot_device"], tmp_path / "b", files["fam-b"])
        read_back(pinned["snapshot_device"], tmp_path / "p", files["pinned"])

        # --all, with one image's device mounted: that image is skipped, untouched.
        survivor = next(name for name in filled if statuses[name] != "evicted")
        survivor_device, survivor_size = db_rows(state_dir, "SELECT u.device_id, u.size_bytes FROM images i JOIN "
                                                            "unpacked_images u ON u.chain_id = i.top_chain_id "
                                                            f"WHERE i.name = '{survivor}'")[0]
        device_path = pool_of(state_dir).activate(survivor_device, survivor_size)
        held = tmp_path / "held"
        mounted(device_path, held, "ro", "noload")
        try:
            everything = run(state_dir, "gc", "--images", "--all", "--force", "--backend", "blockfile")
            assert everything.returncode == 0, everything.stdout[-3000:]
            assert f"skipped image={survivor} reason=" in everything.stdout and "in use" in everything.stdout
        finally:
            umount(held)
        statuses = image_status(state_dir)
        assert {name for name, status in statuses.items() if status != "evicted"} == {"fam-b", "pinned", "vm", survivor}
        assert (vm_mount / "written-by-vm").read_bytes() == b"vm data\n"
    finally:
        umount(vm_mount)

    # Processing an evicted image again re-creates it; nothing is left for gc.
    again = process(state_dir, capacity_bucket, "fam-a")
    assert again["state"] == "complete"
    assert image_status(state_dir)["fam-a"] == "active"
    read_back(again["snapshot_device"], tmp_path / "a", files["fam-a"])
    read_back(vm_device, tmp_path / "vm-again", {**files["vm"], "written-by-vm": b"vm data\n"})
    listing = json.loads(run(state_dir, "images", "--json").stdout)
    assert {row["name"]: row["pinned"] for row in listing}["fam-b"] is True
    gc = run(state_dir, "gc", "--dry-run", "--backend", "blockfile")
    assert re.search(r"Summary\s+cleaned=0 failed=0 orphaned=0 ", gc.stdout), gc.stdout[-2000:]


def test_grow_a_live_pool_while_a_snapshot_is_written(state_dir: Path, capacity_bucket: dict[str, Any],
                                                      tmp_path: Path) -> None:
    files = capacity_bucket["files"]
    assert run(state_dir, "setup-pool", "--data-size", "320M", "--backend", "blockfile").returncode == 0
    image = process(state_dir, capacity_bucket, "pinned")
    vm = run(state_dir, "snapshot", "pinned", "--vm", "vm-grow")
    assert vm.returncode == 0, vm.stderr[-2000:]
    device = fields(vm.stdout)["snapshot_device"]
    source = tmp_path / "payload"
    source.write_bytes(blob("payload", 32 * MB))
    target = tmp_path / "vm"
    before = pool_of(state_dir).get_pool_status()
    mounted(device, target)
    try:
        writer = subprocess.Popen(["dd", f"if={source}", f"of={target / 'payload'}", "bs=1M", "conv=fsync",
                                   "status=none"], stderr=subprocess.PIPE, text=True)
        grow = run(state_dir, "setup-pool", "--grow", "512M", "--backend", "blockfile")
        _, err = writer.communicate(timeout=300)
        assert grow.returncode == 0, grow.stderr[-2000:]
        assert writer.returncode == 0, err
        assert hashlib.sha256((target / "payload").read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    finally:
        umount(target)
    status = pool_of(state_dir).get_pool_status()
    total = status.total_data_blocks * status.data_block_bytes
    # XFS keeps its log out of the count: the data space grew by what the file did.
    grown = total - before.total_data_blocks * before.data_block_bytes
    assert 190 * MB <= grown <= 192 * MB, grown
    assert f"of {total / MB:.1f} MiB" in grow.stdout, grow.stdout
    meta = json.loads((state_dir / "pool_meta").read_bytes().rstrip(b"\0"))
    assert meta["data_size_bytes"] == 512 * MB

    shrink = run(state_dir, "setup-pool", "--grow", "320M", "--backend", "blockfile")
    assert shrink.returncode == 1
    assert errors(shrink) == [f"error: cannot shrink the pool's data from {512 * MB} to {320 * MB} bytes; "
                              "a pool only grows (shrinking would cut devices short)"]
    metadata = run(state_dir, "setup-pool", "--grow-metadata", "8M", "--backend", "blockfile")
    assert metadata.returncode == 1 and len(errors(metadata)) == 1, metadata.stderr
    assert "--grow-metadata applies to the devicemapper backend" in errors(metadata)[0]

    resume = manager(state_dir, "fsm", "resume")
    assert resume.returncode == 0, resume.stderr[-2000:]
    gc = run(state_dir, "gc", "--dry-run", "--backend", "blockfile")
    assert re.search(r"Summary\s+cleaned=0 failed=0 orphaned=0 ", gc.stdout), gc.stdout[-2000:]

    # A grow cut short after extending the file (as a power cut would leave it): after the
    # "reboot" setup-pool re-attaches, every device reads back, and the grow can finish.
    pool_of(state_dir).teardown_pool()
    with open(state_dir / "pool_data", "r+b") as fh:
        fh.truncate(768 * MB)
    again = run(state_dir, "setup-pool", "--backend", "blockfile")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((state_dir / "pool_meta").read_bytes().rstrip(b"\0"))["data_size_bytes"] == 768 * MB
    # By the device the re-attach re-activated: the old /dev/loopN node still exists after a
    # teardown, but may now be another file's loop device, or none.
    read_back(_path_of(state_dir, image["snapshot"]), tmp_path / "img", files["pinned"])
    read_back(_path_of(state_dir, fields(vm.stdout)["snapshot"]), tmp_path / "vm2",
              {**files["pinned"], "payload": source.read_bytes()})
    finish = run(state_dir, "setup-pool", "--grow", "768M", "--backend", "blockfile")
    assert finish.returncode == 0, finish.stderr[-2000:]
    status = pool_of(state_dir).get_pool_status()
    assert status.total_data_blocks * status.data_block_bytes - total >= 254 * MB


def errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _path_of(state_dir: Path, name: str) -> str:
    device = next(d for d in pool_of(state_dir).list_devices() if d.name == name)
    assert device.active and device.path, f"{name} was not re-activated"
    return device.path


def test_policy_values_are_checked_in_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    for env, flags, text in (({"FLYIO_POOL_HIGH_PERCENT": "lots"}, (), "FLYIO_POOL_HIGH_PERCENT='lots' is not a percent"),
                             ({}, ("--pool-low", "90"), "low watermark 90% must be below the high watermark 85%"),
                             ({}, ("--pool-warn", "120"), "--pool-warn='120' is not a percent")):
        result = run(state_dir, "gc", "--images", *flags, env=env)
        assert result.returncode == 1, result.stdout
        assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"] and text in result.stderr


def test_data_block_size_is_checked_in_one_line_before_any_pool_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    for env, flags in (({}, ("--data-block-size", "100K")), ({"FLYIO_POOL_DATA_BLOCK_SIZE": "2G"}, ()),
                       ({}, ("--data-block-size", "32K")), ({"FLYIO_POOL_DATA_BLOCK_SIZE": "big"}, ())):
        result = run(state_dir, "setup-pool", "--backend", "devicemapper", *flags, env=env)
        assert result.returncode == 1, result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "data block size" in result.stderr or "invalid size 'big'" in result.stderr, result.stderr
        assert not (state_dir / "pool_meta").exists() and not (state_dir / "pool_data").exists()


def test_a_bad_layer_block_size_fails_before_any_device(tmp_path: Path, capacity_bucket: dict[str, Any]) -> None:
    state_dir = tmp_path / "state"
    result = run(state_dir, "process-image", "--image", "fill-0", "--bucket", capacity_bucket["bucket"],
                 "--endpoint-url", capacity_bucket["endpoint"], env={"FLYIO_LAYER_BLOCK_SIZE": "3K"})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "FLYIO_LAYER_BLOCK_SIZE='3K' is not an ext4 block size" in result.stderr
    assert not (state_dir / "pool_data").exists()  # nothing made: not a pool, not a device


def test_superblock_data_block_size_is_read_back() -> None:
    import struct

    from devices.devicemapper import THIN_SUPERBLOCK_MAGIC, data_block_sectors, recorded_data_block_sectors

    head = bytearray(4096)
    struct.pack_into("<Q", head, 32, THIN_SUPERBLOCK_MAGIC)
    struct.pack_into("<I", head, 336, 128)
    assert recorded_data_block_sectors(bytes(head)) == 128
    assert recorded_data_block_sectors(bytes(4096)) is None  # never formatted
    struct.pack_into("<Q", head, 32, 1234)
    assert recorded_data_block_sectors(bytes(head)) is None  # not dm-thin metadata
    assert [data_block_sectors(size) for size in (64 * 1024, MB, 1024**3)] == [128, 2048, 2097152]


@pytest.mark.parametrize("block, data, devices", [("64k", 2 * 1024**3, 10), ("64k", 8 * 1024**3, 128),
                                                   ("1m", 2 * 1024**3, 128), ("512k", 100 * MB, 1000)])
def test_metadata_estimate_is_thin_metadata_sizes(block: str, data: int, devices: int) -> None:
    from devices.devicemapper import metadata_bytes_needed
    from support.sizes import parse_size

    tool = subprocess.run(["thin_metadata_size", "-b", block, "-s", f"{data // 1024}k", "-m", str(devices),
                           "-u", "k", "-n"], capture_output=True, text=True, timeout=10, check=True)
    ours = metadata_bytes_needed(data, parse_size(block) // 512, devices) / 1024
    assert abs(float(tool.stdout) - ours) <= 4, (tool.stdout, ours)


def test_a_new_small_block_pool_gets_the_metadata_its_data_needs(tmp_path: Path) -> None:
    from devices.base import PoolConfig
    from devices.devicemapper import DevicemapperPool

    for block, expected in ((64 * 1024, 2 * MB), (MB, MB)):
        folder = tmp_path / str(block)
        folder.mkdir()
        DevicemapperPool(PoolConfig(directory=str(folder), data_block_bytes=block))._create_files(block // 512)
        assert (folder / "pool_meta").stat().st_size == expected
        assert (folder / "pool_data").stat().st_size == 2 * 1024**3


def test_admission_waits_or_evicts_against_a_real_pool(tmp_path: Path) -> None:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool
    from devices.policy import UsagePolicy
    from states.admission import PoolFullWait, admit, estimated_bytes
    from states.services import ImageServices

    pool = BlockfilePool(PoolConfig(directory=str(tmp_path / "pool"), data_size_bytes=320 * MB))
    pool.ensure_pool_exists()
    try:
        services = ImageServices(state_dir=tmp_path, pool=pool, blobs=None, s3_client=lambda _: None,  # type: ignore[arg-type]
                                 health_guard=lambda: None, operation=lambda _: None, policy=UsagePolicy())
        admit(services, tar_bytes=64 * MB, base=True, job_id=1)  # fits: returns
        with pytest.raises(PoolFullWait, match=r"high watermark \(85%\).*needs about 3\d\d\.\d MiB") as cli:
            admit(services, tar_bytes=260 * MB, base=True, job_id=1)
        # A CLI command leaves the job waiting (it holds the lock the remedies need); the daemon waits.
        assert cli.value.leave_waiting and str(cli.value).endswith("(setup-pool --grow SIZE), then fsm resume")
        with pytest.raises(PoolFullWait) as daemon:
            admit(dataclasses.replace(services, wait_for_room=True), tar_bytes=260 * MB, base=True, job_id=1)
        assert not daemon.value.leave_waiting and str(daemon.value).endswith("(setup-pool --grow SIZE)")
        # A high watermark of 100% is none: admission is off (the fault tests run a pool out).
        unguarded = dataclasses.replace(services, policy=UsagePolicy(high=1.0, low=0.75))
        admit(unguarded, tar_bytes=260 * MB, base=True, job_id=1)
        filler = tmp_path / "pool" / "pool" / "filler"
        filler.write_bytes(blob("filler", 200 * MB))
        evicted = []

        def evict(room_for: int) -> None:
            evicted.append(room_for)
            # Truncated first: XFS frees an unlinked file's blocks in the background (inodegc),
            # where statfs may not see them yet; a truncate frees them in the call itself.
            os.truncate(filler, 0)
            filler.unlink()
            os.sync()

        services.evict = evict
        admit(services, tar_bytes=16 * MB, base=False, job_id=1)  # evicts, then fits
        assert evicted == [estimated_bytes(16 * MB, base=False)]
    finally:
        pool.teardown_pool()


def test_admission_evicts_down_to_where_the_device_fits() -> None:
    """The low watermark, unless the device needs more than the gap to the high one; unchanged
    when even an empty pool could not take it (evicting cannot help)."""
    from devices.base import PoolStatus
    from devices.policy import UsagePolicy

    policy = UsagePolicy()  # high 85%, low 75%
    status = PoolStatus(backend="blockfile", exists=True, used_data_blocks=50, total_data_blocks=100,
                        data_block_bytes=MB)
    assert policy.making_room(status, 5 * MB) == policy
    assert policy.making_room(status, 30 * MB).low == pytest.approx(0.55)
    assert policy.making_room(status, 85 * MB) == policy
    assert policy.making_room(dataclasses.replace(status, total_data_blocks=0), 5 * MB) == policy


def test_the_daemon_evicts_above_its_high_watermark(state_dir: Path, capacity_bucket: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """A daemon whose high watermark is below the pool's usage evicts at its first health
    round, by itself: the unpinned image goes, the pinned one stays, and it says why."""
    import sys
    import time

    from tests.killpoints import REPO

    assert run(state_dir, "setup-pool", "--data-size", POOL, "--backend", "blockfile").returncode == 0
    process(state_dir, capacity_bucket, "pinned")
    process(state_dir, capacity_bucket, "vm")
    release_first_snapshots(state_dir, ["vm"])
    assert run(state_dir, "images", "--pin", "pinned").returncode == 0
    assert usage(state_dir) > 0.05
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "daemon", "--backend",
                                   "blockfile", "--metrics-port", "0", "--health-interval", "1", "--pool-warn", "3",
                                   "--pool-high", "5", "--pool-low", "4"], cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while "image eviction finished" not in log_path.read_text() and time.monotonic() < deadline:
            assert daemon.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)  # polling the daemon's log for the outcome, with a deadline
        text = log_path.read_text()
        assert "image eviction finished" in text, text[-3000:]
        assert "pool usage above threshold" in text and re.search(r"image evicted\s+image=vm ", text), text[-3000:]
        assert image_status(state_dir) == {"pinned": "active", "vm": "evicted"}
        assert run(state_dir, "shutdown").returncode == 0
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
