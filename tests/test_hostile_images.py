"""Hostile layers end to end: uploaded to SeaweedFS as S3 objects, run through
`process-image --s3-key` (a real child process, blockfile backend, real loop devices,
mkfs.ext4, mounts and SQLite). Each job must abort with exit 1 and a reason naming the
problem, every device in the pool must be named by a catalog row, and nothing may be
written outside the state dir."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "flyio-hostile-e2e-probe"
PROBE_PATHS = (Path("/etc") / PROBE, Path("/tmp") / PROBE, Path("/") / PROBE, Path("/etc/passwd.flyio-probe"))
SYSTEM_FILES = (Path("/etc/passwd"), Path("/etc/shadow"))

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


# --- the layers (built here, so this test does not depend on the unit corpus's helpers) --

def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, 0o644, 1_700_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _ok_files() -> list[tuple[tarfile.TarInfo, bytes]]:
    """Ordinary entries first, so the unpacker has written something when it refuses."""
    return [_entry("etc", tarfile.DIRTYPE), _entry("etc/hostname", data=b"box\n"),
            _entry("usr", tarfile.DIRTYPE), _entry("usr/bin", tarfile.DIRTYPE), _entry("usr/bin/tool", data=b"x" * 5000)]


def traversal() -> bytes:
    return _tar(*_ok_files(), _entry(f"usr/../../../../{PROBE}", data=b"pwned\n"))


def symlink_write_through() -> bytes:
    return _tar(*_ok_files(), _entry("etc/link", tarfile.SYMTYPE, linkname="/etc"),
                _entry(f"etc/link/{PROBE}", data=b"pwned\n"))


def hardlink_escape() -> bytes:
    return _tar(*_ok_files(), _entry("etc/pw", tarfile.LNKTYPE, linkname="/etc/passwd"))


def truncated_tar() -> bytes:
    whole = _tar(*_ok_files(), _entry("big", data=bytes(range(256)) * 400))
    return whole[: len(whole) // 2]


def truncated_gzip() -> bytes:
    whole = gzip.compress(_tar(*_ok_files(), _entry("big", data=os.urandom(200_000))))
    return whole[: len(whole) * 2 // 3]


@dataclass(frozen=True)
class E2ECase:
    name: str
    build: Callable[[], bytes]
    reason: re.Pattern[str]  # what the job's error must say
    at_unpacking: bool  # refused by the unpacker (a device exists, orphaned), not by verification


CASES = [
    E2ECase("traversal", traversal, re.compile(r"'\.\.' component"), True),
    E2ECase("symlink-write-through", symlink_write_through, re.compile(r"etc/link.*symlink"), True),
    E2ECase("hardlink-escape", hardlink_escape, re.compile(r"etc/pw.*absolute path"), True),
    E2ECase("truncated-tar", truncated_tar, re.compile(r"truncated|corrupt"), False),
    E2ECase("truncated-gzip", truncated_gzip, re.compile(r"truncated|corrupt|gzip", re.IGNORECASE), False),
]


# --- harness ---------------------------------------------------------------------------

def manager(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def teardown(state_dir: Path) -> None:
    """Release every loop device and mount the test's pool holds."""
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
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


Snapshot = dict[str, tuple[str, int, int, str]]


def snapshot_outside(top: Path, skip: Path) -> Snapshot:
    """Every path under `top` but `skip` (type, size, mtime, hash), plus the probe paths
    and system files an escape would aim at."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            result[str(full)] = _describe(full)
    for path in (*PROBE_PATHS, *SYSTEM_FILES):
        if os.path.lexists(path):
            result[str(path)] = _describe(path)
    return result


def _describe(path: Path) -> tuple[str, int, int, str]:
    st = os.lstat(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
    return stat.filemode(st.st_mode), st.st_size, st.st_mtime_ns, digest


def rows_naming_devices(db_path: Path) -> set[str]:
    with sqlite3.connect(db_path) as db:
        names: set[str] = set()
        for table in ("unpacked_images", "snapshots", "orphaned_devices"):
            names |= {row[0] for row in db.execute(f"SELECT device_name FROM {table}")}
    return names


@pytest.fixture(scope="module")
def hostile_bucket(make_bucket: Callable[..., str]) -> str:
    """One bucket for every case (keys differ by case name): each bucket costs SeaweedFS a
    volume of its own, and the session's server has a few dozen."""
    return make_bucket("hostile")


def process_hostile(name: str, layer: bytes, state_dir: Path, tmp_path: Path, s3_client: Any, bucket: str,
                    endpoint_url: str) -> tuple[subprocess.CompletedProcess[str], Snapshot]:
    """Upload `layer` as a one-layer image, plant a secret beside the state dir, and run
    process-image on it; (its result, what was outside the state dir before)."""
    key = f"images/{name}/1.tar"
    s3_client.put_object(Bucket=bucket, Key=key, Body=layer)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret\n")
    before = snapshot_outside(tmp_path, state_dir)
    done = manager(state_dir, "process-image", "--s3-key", key, "--bucket", bucket,
                   "--endpoint-url", endpoint_url, "--backend", "blockfile", "--device-size", "64M")
    return done, before


@needs_root
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_hostile_image_aborts_cleanly(case: E2ECase, state_dir: Path, tmp_path: Path, s3_client: Any,
                                      hostile_bucket: str, s3_server: Any) -> None:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    done, before = process_hostile(case.name, case.build(), state_dir, tmp_path, s3_client,
                                   hostile_bucket, s3_server.endpoint_url)

    assert done.returncode == 1, (done.stdout, done.stderr[-2000:])
    last = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\bstate=aborted\b", last), last
    error = last.split("error=", 1)[1] if "error=" in last else ""
    assert case.reason.search(error), last
    assert "Traceback" not in done.stderr, done.stderr[-2000:]

    listed = manager(state_dir, "fsm", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    assert [job["state"] for job in jobs] == ["aborted"], jobs

    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
    devices = {device.name for device in pool.list_devices()}
    unnamed = devices - rows_naming_devices(state_dir / "images.db")
    assert unnamed == set(), f"devices no row names: {unnamed}"
    if case.at_unpacking:  # the half-unpacked device is kept for gc, never reused
        with sqlite3.connect(state_dir / "images.db") as db:
            orphans = {row[0] for row in db.execute("SELECT device_name FROM orphaned_devices")}
        assert devices and devices <= orphans, (devices, orphans)
    else:  # refused at verifying, before any device was made
        assert devices == set(), devices

    assert snapshot_outside(tmp_path, state_dir) == before


# --- the whole unit corpus (tests/hostile_tars.py), each one-layer case through real devices --

def _single_layer_cases() -> list[Any]:
    from tests.hostile_tars import HOSTILE_CASES

    return [case for case in HOSTILE_CASES if case.lower is None and case.limits is None]


# Refused by verification (format sniffing, the structure scan) before the unpacker sees
# them, in verification's own words.
VERIFY_REASONS = {"garbage_bytes": "not a tar", "huge_declared_size": "extends past the end of the archive"}


@needs_root
@pytest.mark.parametrize("case", _single_layer_cases(), ids=lambda case: case.name)
def test_corpus_case_end_to_end(case: Any, state_dir: Path, tmp_path: Path, s3_client: Any,
                                hostile_bucket: str, s3_server: Any) -> None:
    """A rejected layer aborts the job with its reason; a handled one completes and the
    mounted snapshot passes the case's check. Either way every device in the pool is named
    by a row and nothing outside the state dir changed."""
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool
    from tests.test_process_image import mount_snapshot

    done, before = process_hostile(case.name, case.build(), state_dir, tmp_path, s3_client,
                                   hostile_bucket, s3_server.endpoint_url)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before
    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
    unnamed = {device.name for device in pool.list_devices()} - rows_naming_devices(state_dir / "images.db")
    assert unnamed == set(), f"devices no row names: {unnamed}"
    if case.expect == "reject":
        assert done.returncode == 1 and re.search(r"\bstate=aborted\b", last), (last, done.stderr[-2000:])
        assert VERIFY_REASONS.get(case.name, case.reason) in last.split("error=", 1)[-1], last
    else:
        assert done.returncode == 0 and re.search(r"\bstate=complete\b", last), (last, done.stderr[-2000:])
        root = tmp_path / "mnt"
        device = dict(pair.split("=", 1) for pair in last.split())["snapshot_device"]
        mount_snapshot(device, root)
        try:
            case.check(root)
        finally:
            subprocess.run(["umount", str(root)], check=True, timeout=60)
