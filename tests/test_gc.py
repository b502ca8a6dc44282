"""`gc` end to end on real parts: orphans made by real aborted jobs (a hostile layer from
SeaweedFS refused while unpacking, a real mkfs that times out) and by a device created
in the pool with no row (a crash between create and commit); `gc --dry-run` touches
nothing, `gc --force` removes exactly the orphans; completed images keep working.
Blockfile backend: real loop devices, mkfs.ext4, mounts and SQLite."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SampleBucket

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
DEVICE_SIZE = "128M"
GOOD_KEY = "images/node/5.tar"
ORPHAN_HINT = "orphaned device detected; run 'flyio-image-manager gc' to clean up"
MKFS_FAILED = "failed to create filesystem; leaving device active for manual/GC cleanup"
SUMMARY = re.compile(r"^INFO\[\d+\] Summary\s+cleaned=(\d+) failed=(\d+) orphaned=(\d+) skipped=(\d+) "
                     r"total_devices=(\d+)$", re.MULTILINE)
FOUND = re.compile(r"^WARN\[\d+\] Found orphaned device\s+device_id=(\d+) device_name=(thin-\d+) "
                   r"mounted=(true|false) orphan=(no-record|unfinished-intent)$", re.MULTILINE)


# --- harness ---------------------------------------------------------------------------

def manager(state_dir: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def process(state_dir: Path, bucket: str, endpoint: str, key: str, *extra: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return manager(state_dir, "process-image", "--s3-key", key, "--bucket", bucket, "--endpoint-url", endpoint,
                   "--device-size", DEVICE_SIZE, "--backend", "blockfile", *extra, env=env)


def gc(state_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return manager(state_dir, "gc", "--backend", "blockfile", *flags)


def summary(report: str) -> dict[str, int]:
    """The counts of gc's Summary line (gc logs its report on stdout)."""
    found = SUMMARY.findall(report)
    assert len(found) == 1, report[-3000:]
    return dict(zip(("cleaned", "failed", "orphaned", "skipped", "total_devices"), map(int, found[0])))


def fields(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    head = last.split(" error=", 1)[0]  # the error is free text, last
    return dict(pair.split("=", 1) for pair in head.split())


def pool_of(state_dir: Path) -> Any:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    return BlockfilePool(PoolConfig(directory=str(state_dir)))


def device_names(state_dir: Path) -> set[str]:
    return {device.name for device in pool_of(state_dir).list_devices()}


def orphan_rows(state_dir: Path) -> dict[str, str | None]:
    """device name -> cleaned_at of every orphaned_devices row."""
    with sqlite3.connect(state_dir / "images.db") as db:
        return dict(db.execute("SELECT device_name, cleaned_at FROM orphaned_devices"))


def refused_tar() -> bytes:
    """An ordinary file, then a hardlink to a file the layer never made: the unpacker has
    written to the device when it refuses the layer. (A `../x` entry no longer serves:
    it is clamped inside the root, as containerd does.)"""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size, info.mtime = 4, 1_700_000_000
        tar.addfile(info, io.BytesIO(b"box\n"))
        link = tarfile.TarInfo("etc/link")
        link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "etc/missing", 1_700_000_000
        tar.addfile(link)
    return buffer.getvalue()


def leave_wal_of_a_crashed_writer(db: Path) -> None:
    """A process that allocates a thin id, commits and dies before closing: its frames stay
    in the WAL, and the next read-write connection to close would checkpoint them into the
    file. (An allocated id that is never used is harmless: ids are never reused.)"""
    script = ("import os, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
              "db.execute('UPDATE device_id_counter SET next_device_id = next_device_id + 1'); db.commit(); "
              "os._exit(0)")
    subprocess.run([sys.executable, "-c", script, str(db)], check=True, timeout=60)
    wal = db.with_name(db.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0


def tree_digest(device: str, target: Path) -> str:
    """Mount `device` read-only and hash every path, type, size and file content in it."""
    from demo.samples import snapshot_tree

    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "ro,nodev,nosuid,noload", device, str(target)], check=True, timeout=60)
    try:
        tree = snapshot_tree(target)
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60)
    assert tree, "the snapshot is empty"
    return hashlib.sha256(repr(sorted(tree.items())).encode()).hexdigest()


def teardown(state_dir: Path) -> None:
    """Release every loop device and mount the test's pool holds (the files stay)."""
    if not (state_dir / "pool").exists():
        return
    pool = pool_of(state_dir)
    if pool.get_pool_status().exists:
        for device in pool.list_devices():
            if device.active:
                pool.deactivate(device.device_id)
    pool.teardown_pool()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    try:
        yield directory
    finally:
        teardown(directory)


# --- orphans from an aborted unpack and from a crash; dry run, then force ---------------

@needs_root
def test_gc_finds_and_removes_exactly_the_orphans(state_dir: Path, tmp_path: Path, sample_bucket: SampleBucket,
                                                 s3_client: Any, make_bucket: Callable[..., str]) -> None:
    bucket = make_bucket("gc-hostile")
    s3_client.put_object(Bucket=bucket, Key="images/evil/1.tar", Body=refused_tar())

    hostile = process(state_dir, bucket, sample_bucket.endpoint_url, "images/evil/1.tar")
    assert hostile.returncode == 1, hostile.stderr[-3000:]
    assert fields(hostile.stdout)["state"] == "aborted"
    aborted_devices = set(orphan_rows(state_dir))
    assert len(aborted_devices) == 1 and aborted_devices <= device_names(state_dir)

    # The next job says there is something for gc, and still completes.
    good = process(state_dir, sample_bucket.name, sample_bucket.endpoint_url, GOOD_KEY)
    assert good.returncode == 0, good.stderr[-3000:]
    assert ORPHAN_HINT in good.stderr
    good_fields = fields(good.stdout)
    before_tree = tree_digest(good_fields["snapshot_device"], tmp_path / "mnt-before")

    # A crash between create and commit: a device in the pool, no row anywhere.
    crash_id = 9000
    pool_of(state_dir).create_thin(crash_id, 64 * 1024**2)
    orphans = aborted_devices | {f"thin-{crash_id}"}
    all_devices = device_names(state_dir)
    live = all_devices - orphans
    assert len(live) >= 2  # the good image's layer device and its snapshot

    db = state_dir / "images.db"
    leave_wal_of_a_crashed_writer(db)
    db_bytes = db.read_bytes()
    dry = gc(state_dir, "--dry-run")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert "Running in DRY RUN mode - no changes will be made" in dry.stdout
    assert {name for _, name, _, _ in FOUND.findall(dry.stdout)} == orphans
    # The aborted job's device is an unfinished intent; the one made behind our back has no record.
    assert {name: kind for _, name, _, kind in FOUND.findall(dry.stdout)} == {
        **{name: "unfinished-intent" for name in aborted_devices}, f"thin-{crash_id}": "no-record"}
    assert summary(dry.stdout) == {"cleaned": 0, "failed": 0, "orphaned": 2, "skipped": 0,
                                   "total_devices": len(all_devices)}
    assert re.search(rf"Found device records in database\s+count={len(live)}$", dry.stdout, re.MULTILINE)
    for line in ("DRY RUN: Skipping cleanup", "DRY RUN complete - no changes were made",
                 "Run with --force to actually clean up orphaned devices"):
        assert line in dry.stdout
    assert "Step 4" not in dry.stdout
    assert db.read_bytes() == db_bytes
    assert device_names(state_dir) == all_devices
    # A plain `gc` is a dry run too.
    assert summary(gc(state_dir).stdout)["cleaned"] == 0
    assert device_names(state_dir) == all_devices

    force = gc(state_dir, "--force", "--verbose")
    assert force.returncode == 0, force.stdout[-3000:]
    for line in ("Running in FORCE mode - orphaned devices will be deleted",
                 "IMPORTANT: Ensure no FSMs are currently running before proceeding",
                 "IMPORTANT: This command should only be run when the system is idle",
                 "Step 4: Cleaning up orphaned devices", "Garbage collection complete"):
        assert line in force.stdout
    for name in orphans:
        for step in ("Attempting to clean up orphaned device", "DEBUG[", "Successfully cleaned up orphaned device"):
            assert re.search(rf"{re.escape(step)}.*device_name={name}\b", force.stdout), (step, name)
    assert summary(force.stdout) == {"cleaned": 2, "failed": 0, "orphaned": 2, "skipped": 0,
                                     "total_devices": len(all_devices)}
    assert device_names(state_dir) == live
    assert all(cleaned_at is not None for cleaned_at in orphan_rows(state_dir).values())

    # The completed image is untouched: its snapshot still mounts with the same tree.
    assert tree_digest(good_fields["snapshot_device"], tmp_path / "mnt-after") == before_tree
    again = gc(state_dir, "--dry-run")
    assert summary(again.stdout)["orphaned"] == 0
    # No orphans left: the next job has nothing to say about gc.
    rerun = process(state_dir, sample_bucket.name, sample_bucket.endpoint_url, GOOD_KEY)
    assert rerun.returncode == 0 and ORPHAN_HINT not in rerun.stderr


@needs_root
def test_rows_of_devices_already_gone_are_skipped_and_marked(state_dir: Path, s3_client: Any,
                                                            make_bucket: Callable[..., str], s3_server: Any) -> None:
    bucket = make_bucket("gc-gone")
    s3_client.put_object(Bucket=bucket, Key="images/evil/1.tar", Body=refused_tar())
    assert process(state_dir, bucket, s3_server.endpoint_url, "images/evil/1.tar").returncode == 1
    (name,) = orphan_rows(state_dir)
    pool = pool_of(state_dir)
    device_id = int(name.removeprefix("thin-"))
    pool.deactivate(device_id)
    pool.delete(device_id)  # an operator removed it by hand

    dry = gc(state_dir, "--dry-run")
    assert summary(dry.stdout) == {"cleaned": 0, "failed": 0, "orphaned": 0, "skipped": 1, "total_devices": 0}
    assert orphan_rows(state_dir) == {name: None}
    force = gc(state_dir, "--force")
    assert force.returncode == 0, force.stdout[-2000:]
    assert summary(force.stdout)["skipped"] == 1
    assert orphan_rows(state_dir)[name] is not None
    assert summary(gc(state_dir, "--force").stdout)["skipped"] == 0


# --- a mkfs timeout is a hazard: the device is left active for gc ------------------------

@needs_root
def test_mkfs_timeout_leaves_an_active_device_for_gc(state_dir: Path, sample_bucket: SampleBucket) -> None:
    from devices import loop

    done = process(state_dir, sample_bucket.name, sample_bucket.endpoint_url, GOOD_KEY, "--log-format", "json",
                   env={"FLYIO_MKFS_TIMEOUT": "0.001"})
    assert done.returncode == 1, done.stderr[-3000:]
    assert fields(done.stdout)["state"] == "aborted"
    assert MKFS_FAILED in done.stderr
    # The guide's Log Analysis pattern, on the JSON line of the timeout itself.
    timeouts = [json.loads(line) for line in done.stderr.splitlines()
                if line.startswith("{") and json.loads(line)["msg"] == "command timed out"]
    assert timeouts and timeouts[0]["timed_out"] is True and timeouts[0]["argv"].startswith("mkfs"), done.stderr[-3000:]
    assert '"timed_out": true' in done.stderr
    rows = orphan_rows(state_dir)
    assert len(rows) == 1 and list(rows.values()) == [None]
    (name,) = rows
    (device,) = [d for d in pool_of(state_dir).list_devices() if d.name == name]
    assert device.active and device.path and device.path.startswith("/dev/loop")
    image_file = state_dir / "pool" / f"{name}.img"
    assert loop.find_backing(image_file) == [device.path]

    force = gc(state_dir, "--force")
    assert force.returncode == 0, force.stdout[-3000:]
    assert summary(force.stdout) == {"cleaned": 1, "failed": 0, "orphaned": 1, "skipped": 0, "total_devices": 1}
    assert device_names(state_dir) == set()
    assert not image_file.exists()
    assert device.path not in {d.device for d in loop.loop_devices()
                               if d.backing_file and d.backing_file.startswith(str(state_dir))}
    assert orphan_rows(state_dir)[name] is not None


# --- refusals -----------------------------------------------------------------------------

@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not us (Popen: it must outlive the call that starts it)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_force_is_refused_while_the_manager_lock_is_held(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    from migrations import upgrade_database
    from support.paths import database_path, lock_path

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    upgrade_database(database_path(state_dir))
    lock = lock_path(state_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    content = json.dumps({"pid": sleeper.pid, "timestamp": int(time.time()), "command": "process-image"})
    lock.write_text(content)

    refused = gc(state_dir, "--force")
    assert refused.returncode == 1
    error_lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, refused.stderr
    assert f"pid {sleeper.pid}" in error_lines[0] and "process-image" in error_lines[0]
    assert "Step 1" not in refused.stdout
    assert lock.read_text() == content


def test_force_is_refused_while_a_live_process_runs_a_job(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    from cli.app import open_store
    from fsm.ownership import Owner, boot_id

    state_dir = tmp_path / "state"
    store = open_store(state_dir)
    job, _ = store.create_or_get("image", "s3://b/images/x/1.tar", "downloading", {})
    store.claim(job.id, Owner(pid=sleeper.pid, boot_id=boot_id()), lease_seconds=600)

    refused = gc(state_dir, "--force")
    assert refused.returncode == 1
    assert re.search(rf"^error: job {job.id} \(downloading\) is being run by pid {sleeper.pid}", refused.stderr,
                     re.MULTILINE), refused.stderr
    assert "Step 1" not in refused.stdout
    assert not (state_dir / "fsm" / "flyio-manager.lock").exists()  # released after the refusal


def test_gc_without_a_database_refuses(tmp_path: Path) -> None:
    refused = gc(tmp_path / "empty", "--dry-run")
    assert refused.returncode == 1
    assert "does not exist" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "empty" / "images.db").exists()


def test_dry_run_and_force_exclude_each_other(tmp_path: Path) -> None:
    refused = gc(tmp_path, "--dry-run", "--force")
    assert refused.returncode == 1 and "exclude each other" in refused.stderr


# --- a cleanup that fails is counted, left alone, and cleaned by a later run -------------

@needs_root
def test_a_busy_mount_fails_its_cleanup_and_a_later_run_cleans_it(tmp_path: Path) -> None:
    from devices.filesystem import make_filesystem
    from migrations import upgrade_database

    state_dir = tmp_path / "state"
    target = tmp_path / "busy"
    target.mkdir()
    busy: subprocess.Popen[bytes] | None = None
    try:
        assert manager(state_dir, "setup-pool", "--backend", "blockfile", "--data-size", "512M").returncode == 0
        upgrade_database(state_dir / "images.db")
        pool = pool_of(state_dir)
        pool.create_thin(42, 64 * 1024**2)
        device = pool.activate(42, 64 * 1024**2)
        make_filesystem(device)
        subprocess.run(["mount", device, str(target)], check=True, timeout=60)
        # A process working inside the mount: umount says "target is busy" (Popen: it must
        # outlive this call).
        busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], cwd=target)

        failed = gc(state_dir, "--force")
        assert failed.returncode == 1, failed.stdout[-2000:]
        assert FOUND.findall(failed.stdout) == [("42", "thin-42", "true", "no-record")]
        assert summary(failed.stdout) == {"cleaned": 0, "failed": 1, "orphaned": 1, "skipped": 0,
                                          "total_devices": 1}
        assert "Some devices could not be cleaned - manual intervention may be required" in failed.stdout
        assert "Consider rebooting the system if devices are stuck in D-state" in failed.stdout
        assert "Garbage collection complete" not in failed.stdout
        assert "Successfully cleaned up" not in failed.stdout
        assert device_names(state_dir) == {"thin-42"}
        assert os.path.ismount(target)

        busy.kill()
        busy.wait(timeout=10)
        busy = None
        cleaned = gc(state_dir, "--force")
        assert cleaned.returncode == 0, cleaned.stdout[-2000:]
        assert summary(cleaned.stdout)["cleaned"] == 1
        assert not os.path.ismount(target)
        assert device_names(state_dir) == set()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait(timeout=10)
        if os.path.ismount(target):
            subprocess.run(["umount", str(target)], check=False, timeout=60)
        teardown(state_dir)


def test_a_device_held_open_fails_its_cleanup_with_timed_out_false(tmp_path: Path) -> None:
    """A process holding the loop device open: `losetup --detach` only marks it autoclear
    (the deactivate step passes, so no "deactivate failed or timed out"), the loop stays,
    and the delete step fails; its JSON line says `"timed_out": false`."""
    from migrations import upgrade_database

    state_dir = tmp_path / "state"
    holder: subprocess.Popen[bytes] | None = None
    try:
        assert manager(state_dir, "setup-pool", "--backend", "blockfile", "--data-size", "512M").returncode == 0
        upgrade_database(state_dir / "images.db")
        pool = pool_of(state_dir)
        pool.create_thin(43, 64 * 1024**2)
        device = pool.activate(43, 64 * 1024**2)
        # The child says "open" once it holds the device: gc runs only after that, under any load.
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); "
                                   "print('open', flush=True); time.sleep(120)", device], stdout=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        failed = manager(state_dir, "--log-format", "json", "gc", "--force", "--backend", "blockfile")
        assert failed.returncode == 1, failed.stdout[-2000:]
        lines = [json.loads(line) for line in failed.stdout.splitlines() if line.startswith("{")]
        (failure,) = [line for line in lines if line["msg"] == "failed to clean up orphaned device"]
        assert failure["step"] == "Step 3" and failure["timed_out"] is False, failure
        assert (failure["device_id"], failure["device_name"]) == (43, "thin-43")
        assert "is active" in failure["error"]
        assert not [line for line in lines if line["msg"] == "deactivate failed or timed out"]
        assert device_names(state_dir) == {"thin-43"}

        holder.kill()
        holder.wait(timeout=10)
        holder = None
        cleaned = gc(state_dir, "--force")
        assert cleaned.returncode == 0, cleaned.stdout[-2000:]
        assert device_names(state_dir) == set()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(timeout=10)
        teardown(state_dir)


# --- the guide's example output, line by line, on orphans made by real kills -------------

GUIDE = REPO.parent / "shared" / "seed" / "OPERATIONS.md"
# gc's own lines carry no `component=`; the lines that do come from the parts it calls
# (pool-manager: backend selected, device deactivated/deleted; operation-guard: operation
# started/finished) and are not in the guide's example, so they are left out of the comparison.
OTHER_COMPONENT = re.compile(r"\scomponent=\S+")


def guide_examples() -> list[str]:
    """The two `Example output:` blocks of the guide's Garbage Collection Procedure (dry run, force)."""
    if not GUIDE.exists():
        pytest.skip(f"the operations guide is not next to this checkout ({GUIDE})")
    text = GUIDE.read_text()
    section = text[text.index("### Garbage Collection Procedure"):text.index("### Handling Cleanup Failures")]
    blocks = re.findall(r"Example output:\n```\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, blocks
    return blocks


def normalised(report: str) -> list[str]:
    """gc's own lines (OTHER_COMPONENT dropped) with timestamps, ids, names and device counts
    replaced and runs of spaces made one (the guide's own padding is not consistent)."""
    lines = []
    for line in report.strip().splitlines():
        if OTHER_COMPONENT.search(line):
            continue
        line = re.sub(r"^(INFO|WARN|DEBUG|ERROR)\[\d+\]", r"\1[T]", line)
        line = re.sub(r"\b(device_id|device_name|count|total_devices)=\S+", r"\1=N", line)
        # Intended difference: each orphan line also says which of the guide's two kinds it is.
        line = re.sub(r" orphan=(no-record|unfinished-intent)$", "", line)
        lines.append(re.sub(r"\s+", " ", line))
    return lines


@needs_root
def test_gc_output_is_the_guides_example_on_orphans_left_by_kills(state_dir: Path, tmp_path: Path, s3_client: Any,
                                                                  make_bucket: Callable[..., str], s3_server: Any) -> None:
    """Two process-image runs SIGKILLed while a layer unpacks (the base layer; the third
    layer's snapshot device), each resumed: the interrupted devices are recorded as orphans,
    two of them, as in the guide. `gc --dry-run` and `gc --force --verbose` print the guide's
    example outputs line for line (timestamps, ids, names and device counts normalised)."""
    from tests.killpoints import Campaign, manager as cli, recorded_orphans, run_until

    campaign = Campaign(state_dir, tmp_path, s3_client, make_bucket("gc-guide"), s3_server.endpoint_url)
    for point, occurrence in (("image: into unpacking", 1), ("image: operation started unpack-image", 3)):
        image, _ = campaign.new_image()
        assert run_until(state_dir, campaign.image_args(image), point, occurrence).hit, point
        resumed = cli(state_dir, "fsm", "resume")
        assert resumed.returncode == 0 and "resumed 1 job(s)" in resumed.stdout, resumed.stderr[-3000:]
    orphans = recorded_orphans(state_dir)
    assert len(orphans) == 2, orphans
    dry_example, force_example = guide_examples()

    dry = gc(state_dir, "--dry-run")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert normalised(dry.stdout) == normalised(dry_example), dry.stdout
    assert {int(n) for n, _, _, _ in FOUND.findall(dry.stdout)} == orphans

    force = gc(state_dir, "--force", "--verbose")
    assert force.returncode == 0, force.stdout[-3000:]
    assert normalised(force.stdout) == normalised(force_example), force.stdout
    assert {int(n) for n, _, _, _ in FOUND.findall(force.stdout)} == orphans
    assert recorded_orphans(state_dir) == set() and not orphans & {d.device_id for d in pool_of(state_dir).list_devices()}
