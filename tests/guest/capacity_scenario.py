"""Capacity on a real dm-thin pool, INSIDE the QEMU guest (issue 12); skipped elsewhere.

Not collected by the guest suite (its name is not test_*.py): under TCG it takes about
15 minutes, and its last run, after eviction and growth had passed, failed at `fsm resume`
with an integrity-check error on the 9p share that the same file does not show on the host
(unexplained; see the closing note of issue 12). Run it by hand, alone:

    sudo .venv/bin/python -m tests.vm --share /var/tmp/cap --env GUEST_SHARE=/var/tmp/cap -- \
        python -m pytest -q -p no:cacheprovider tests/guest/capacity_scenario.py

One pool, kept small for TCG: distinct images (SeaweedFS on the guest's 127.0.0.1) fill it
past the high watermark; `gc --images` changes nothing; `gc --images --force` brings it
below the low watermark, and a pinned image sharing its base chain with an evicted one and
an image whose VM snapshot is mounted and written survive and read back. Then the pool
grows (data and metadata) while that snapshot is written; the write completes, `dmsetup
status` shows the new size, `fsm resume` and `gc --dry-run` find nothing wrong, shrinking
is refused; a grow cut short after the file was extended (the pool torn down as a power
cut leaves it) re-attaches at the file's size with every device reading back.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
from contextlib import closing
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool
from support.proc import run_command

pytestmark = pytest.mark.skipif(not Path("/dev/mapper/control").exists(),
                                reason="needs a device-mapper kernel (/dev/mapper/control); run via tests/test_vm.py")

REPO = Path(__file__).resolve().parents[2]
MB = 1024**2
ENV = {"FLYIO_BACKEND": "devicemapper"}
FILL = {**ENV, "FLYIO_POOL_HIGH_PERCENT": "99", "FLYIO_POOL_LOW_PERCENT": "98"}


def blob(seed: str, size: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(MB, size - offset)) for offset in range(0, size, MB))


def layer_tar(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, body in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(body), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def cli(state_dir: Path, *args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    # A subprocess like an operator's run (not run_command: its output is the subject).
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def result_fields(stdout: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in stdout.strip().splitlines()[-1].split(" error=")[0].split())


def pool_status(state_dir: Path) -> Any:
    return DevicemapperPool(PoolConfig(directory=str(state_dir))).get_pool_status()


def usage(state_dir: Path) -> float:
    return pool_status(state_dir).data_used_fraction


def mount(device: str, target: Path, *options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    run_command(["mount", "-o", ",".join(("nodev", "nosuid", *options)), device, str(target)], timeout=60)


def umount(target: Path) -> None:
    run_command(["umount", str(target)], timeout=60)


def read_back(device: str, target: Path, expected: dict[str, bytes]) -> None:
    mount(device, target, "ro", "noload")
    try:
        for path, body in expected.items():
            assert hashlib.sha256((target / path).read_bytes()).digest() == hashlib.sha256(body).digest(), path
    finally:
        umount(target)


def catalog(state_dir: Path) -> list[tuple]:
    with closing(sqlite3.connect(state_dir / "images.db")) as db:
        return [row for table in ("images", "unpacked_images", "snapshots", "orphaned_devices")
                for row in db.execute(f"SELECT * FROM {table} ORDER BY 1")]


def statuses(state_dir: Path) -> dict[str, str]:
    with closing(sqlite3.connect(state_dir / "images.db")) as db:
        return dict(db.execute("SELECT name, activation_status FROM images"))


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get("GUEST_SHARE")
    directory = Path(base) / "capacity-state" if base else tmp_path / "state"
    yield directory
    for entry in Path("/proc/self/mountinfo").read_text().splitlines():
        target = entry.split()[4]
        if target.startswith(str(tmp_path)):
            run_command(["umount", target], timeout=60, check=False)
    DevicemapperPool(PoolConfig(directory=str(directory))).teardown_pool()


def test_eviction_and_growth_on_dm_thin(state_dir: Path, tmp_path: Path) -> None:
    from demo.s3server import start_s3_server
    from images.source import make_s3_client

    # Only the two families sharing a base go through S3 (SeaweedFS under TCG is slow to
    # take uploads); the single-layer images are file:// URLs (named by their file).
    files: dict[str, dict[str, bytes]] = {}
    base = {"usr/lib/base.bin": blob("base", 4 * MB)}
    families = {"fam-a": [base, {"srv/a.bin": blob("a", MB)}], "fam-b": [base, {"srv/b.bin": blob("b", MB)}]}
    singles = {"vm.tar": {"srv/vm.bin": blob("vm", 2 * MB)}}
    singles.update({f"fill-{n}.tar": {f"srv/fill-{n}.bin": blob(f"fill-{n}", 16 * MB)} for n in range(10)})
    singles.update({f"small-{n}.tar": {f"srv/small-{n}.bin": blob(f"small-{n}", MB // 2)} for n in range(10)})
    assert cli(state_dir, "setup-pool", "--data-size", "256M", "--metadata-size", "4M").returncode == 0
    with start_s3_server(tmp_path / "s3", timeout=240) as server:
        client = make_s3_client(server.endpoint_url, anonymous=True)
        client.create_bucket(Bucket="capacity")
        for family, family_layers in families.items():
            files[family] = {}
            for n, layer in enumerate(family_layers, start=1):
                client.put_object(Bucket="capacity", Key=f"images/{family}/{n}.tar", Body=layer_tar(layer))
                files[family].update(layer)

        def process(family: str) -> dict[str, str]:
            if family in singles:
                path = tmp_path / "layers" / family
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(layer_tar(singles[family]))
                files[family] = singles[family]
                source = ["--url", f"file://{path}"]
            else:
                source = ["--image", family, "--bucket", "capacity", "--endpoint-url", server.endpoint_url]
            done = cli(state_dir, "process-image", *source, "--device-size", "64M", env=FILL)
            assert done.returncode == 0, done.stderr[-3000:]
            return result_fields(done.stdout)

        process("fam-a")
        fam_b = process("fam-b")
        process("vm.tar")
        assert cli(state_dir, "images", "--pin", "fam-b").returncode == 0
        vm = cli(state_dir, "snapshot", "vm.tar", "--vm", "vm-1")
        assert vm.returncode == 0, vm.stderr[-3000:]
        vm_device = result_fields(vm.stdout)["snapshot_device"]
        vm_mount = tmp_path / "vm"
        mount(vm_device, vm_mount)
        (vm_mount / "written-by-vm").write_bytes(b"vm data\n")
        os.sync()
        big = small = 0
        while usage(state_dir) < 0.85:  # big images to 70%, then small steps: past 85%, below 90%
            name = f"fill-{big}.tar" if usage(state_dir) < 0.70 else f"small-{small}.tar"
            big, small = (big + 1, small) if name.startswith("fill") else (big, small + 1)
            process(name)
            assert big <= 10 and small <= 10

    before, dm_before = catalog(state_dir), run_command(["dmsetup", "ls"], timeout=30).stdout
    dry = cli(state_dir, "gc", "--images")
    assert dry.returncode == 0 and "would evict image=fam-a " in dry.stdout, dry.stdout[-3000:]
    assert catalog(state_dir) == before and run_command(["dmsetup", "ls"], timeout=30).stdout == dm_before

    force = cli(state_dir, "gc", "--images", "--force")
    assert force.returncode == 0, force.stdout[-3000:] + force.stderr[-2000:]
    assert usage(state_dir) < 0.75, force.stdout[-3000:]
    now = statuses(state_dir)
    assert now["fam-a"] == "evicted" and now["fam-b"] == now["vm.tar"] == "active"
    with closing(sqlite3.connect(state_dir / "images.db")) as db:
        base_state = db.execute("SELECT u.state FROM unpacked_images u JOIN image_layers il ON il.chain_id = u.chain_id "
                                "JOIN images i ON i.id = il.image_id WHERE i.name = 'fam-b' AND il.position = 0").fetchall()
    assert base_state == [("ready",)]
    read_back(fam_b["snapshot_device"], tmp_path / "b", files["fam-b"])
    assert (vm_mount / "written-by-vm").read_bytes() == b"vm data\n"

    # Growth, with the VM's snapshot mounted and being written.
    source = tmp_path / "payload"
    source.write_bytes(blob("payload", 24 * MB))
    writer = subprocess.Popen(["dd", f"if={source}", f"of={vm_mount / 'payload'}", "bs=1M", "conv=fsync",
                               "status=none"], stderr=subprocess.PIPE, text=True)
    grow = cli(state_dir, "setup-pool", "--grow", "384M", "--grow-metadata", "8M")
    _, err = writer.communicate(timeout=600)
    assert grow.returncode == 0, grow.stderr[-3000:]
    assert writer.returncode == 0, err
    assert (vm_mount / "payload").read_bytes() == source.read_bytes()
    umount(vm_mount)
    fields = run_command(["dmsetup", "status", "pool"], timeout=30).stdout.split()
    assert fields[1] == str(384 * MB // 512), fields
    meta_used, meta_total = map(int, fields[4].split("/"))
    data_used, data_total = map(int, fields[5].split("/"))
    assert data_total == 384 and meta_total == 8 * MB // 4096, fields
    shrink = cli(state_dir, "setup-pool", "--grow", "256M")
    assert shrink.returncode == 1 and "cannot shrink the pool's data" in shrink.stderr
    assert cli(state_dir, "fsm", "resume").returncode == 0
    gc = cli(state_dir, "gc", "--dry-run")
    assert re.search(r"Summary\s+cleaned=0 failed=0 orphaned=0 ", gc.stdout), gc.stdout[-2000:]

    # A grow cut short after extending the file: torn down as a power cut leaves it, then re-attached.
    DevicemapperPool(PoolConfig(directory=str(state_dir))).teardown_pool()
    with open(state_dir / "pool_data", "r+b") as fh:
        fh.truncate(448 * MB)
    again = cli(state_dir, "setup-pool")
    assert again.returncode == 0 and "re-attaching existing pool files" in again.stderr, again.stderr[-3000:]
    assert pool_status(state_dir).total_data_blocks == 448
    read_back(vm_device, tmp_path / "vm-again", {**files["vm.tar"], "written-by-vm": b"vm data\n",
                                                 "payload": source.read_bytes()})
    read_back(fam_b["snapshot_device"], tmp_path / "b-again", files["fam-b"])
