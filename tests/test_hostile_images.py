"""Hostile layers end to end: uploaded to SeaweedFS as S3 objects, run through
`process-image` (a real child process, blockfile backend, real loop devices, mkfs.ext4,
mounts and SQLite). A refused layer aborts its job with exit 1 and a reason naming the
problem; a layer whose paths resolve inside the root (issue 13: a lower layer's `bin ->
usr/bin`, `lib -> /usr/lib`, symlinks planted to escape) completes, and the mounted
snapshot shows where each entry landed. Either way every device in the pool is named by a
catalog row, and nothing is written outside the state dir (a canary directory beside it,
the probe paths and the system files are compared before and after)."""

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
from collections.abc import Callable, Iterator, Sequence
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


def symlink_loop() -> bytes:
    return _tar(*_ok_files(), _entry("etc/a", tarfile.SYMTYPE, linkname="b"),
                _entry("etc/b", tarfile.SYMTYPE, linkname="a"), _entry(f"etc/a/{PROBE}", data=b"pwned\n"))


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


# `..` traversal and writing through an `etc/link -> /etc` symlink were refused here before
# issue 13; both now land inside the root (the unit corpus's dotdot_traversal and
# symlink_abs_then_write_through run end to end below, and test_lower_layer_symlinks_*).
CASES = [
    E2ECase("symlink-loop", symlink_loop, re.compile(r"etc/a/.*more than 40 symlinks resolving 'etc/a'"), True),
    E2ECase("hardlink-escape", hardlink_escape, re.compile(r"etc/pw.*'/etc/passwd' does not exist"), True),
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
    (this file's and the corpus's own) and system files an escape would aim at, plus
    every path of the state dir `skip` outside its mounts but the files the product
    legitimately writes there (`state_dir_files`)."""
    from tests.hostile_tars import PROBE_PATHS as CORPUS_PROBE_PATHS

    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            result[str(full)] = _describe(full)
    for path in (*PROBE_PATHS, *CORPUS_PROBE_PATHS, *SYSTEM_FILES):
        if os.path.lexists(path):
            result[str(path)] = _describe(path)
    result.update(state_dir_files(skip))
    return result


# What process-image legitimately writes in its state dir (relative paths). Everything else
# there is compared before and after: a `../` from a mount point (state/mnt/<job>) lands in
# state/mnt, `../../` in the state dir itself.
STATE_FILES = {"images.db", "images.db-wal", "images.db-shm", "images.db.migrate.lock",
               "pool_data", "pool_meta",  # the pool's device files (the XFS image and its size record)
               "fsm/kmsg.cursor"}
STATE_DIRS = {"mnt", "pool", "fsm"}  # the directories themselves (their contents are checked)
STATE_TREES = {"blobs", "records", "loops"}  # the blob store, the device records (catalog/device_records.py), the loop index (devices/loop.py), whole


def _legitimate(rel: str, full: Path) -> bool:
    if rel in STATE_FILES or rel in STATE_DIRS or rel.split("/", 1)[0] in STATE_TREES:
        return True
    if rel.startswith("fsm/") and rel.count("/") == 1 and (rel.endswith(".lock") or rel.endswith(".lock.mutex")):
        return True
    # a job's mount point: a directory directly under mnt/ (its contents are checked when not mounted)
    return rel.startswith("mnt/") and rel.count("/") == 1 and full.is_dir() and not full.is_symlink()


def state_dir_files(state_dir: Path) -> Snapshot:
    """Every path in the state dir outside mounts (the pool's XFS, a job's ext4) but the
    product's own files, described as snapshot_outside does."""
    result: Snapshot = {}
    if not state_dir.is_dir():
        return result
    for dirpath, dirnames, filenames in os.walk(state_dir, followlinks=False):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(Path(dirpath, d))]
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(state_dir))
            if not _legitimate(rel, full):
                result[f"state:{rel}"] = _describe(full)
    return result


def plant_state_canaries(state_dir: Path) -> None:
    """Secrets where `../outside/secret` from a mount point (state/mnt/<job>) and from one
    level up would land: state/mnt/outside/secret and state/outside/secret."""
    for base in (state_dir / "mnt", state_dir):
        (base / "outside").mkdir(parents=True, exist_ok=True)
        (base / "outside" / "secret").write_text("state secret\n")


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


def process_hostile(name: str, layers: bytes | Sequence[bytes], state_dir: Path, tmp_path: Path, s3_client: Any,
                    bucket: str, endpoint_url: str) -> tuple[subprocess.CompletedProcess[str], Snapshot]:
    """Upload `layers` (one: a one-layer image by --s3-key; several: images/<name>/<n>.tar,
    by --image), plant a secret beside the state dir, and run process-image on it; (its
    result, what was outside the state dir before)."""
    many = not isinstance(layers, bytes)
    for n, layer in enumerate([layers] if isinstance(layers, bytes) else layers, start=1):
        s3_client.put_object(Bucket=bucket, Key=f"images/{name}/{n}.tar", Body=layer)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret\n")
    plant_state_canaries(state_dir)
    before = snapshot_outside(tmp_path, state_dir)
    source = ["--image", name] if many else ["--s3-key", f"images/{name}/1.tar"]
    done = manager(state_dir, "process-image", *source, "--bucket", bucket,
                   "--endpoint-url", endpoint_url, "--backend", "blockfile", "--device-size", "64M")
    return done, before


def assert_pool_accounted(state_dir: Path) -> None:
    """Every device in the pool is named by a catalog row."""
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
    unnamed = {device.name for device in pool.list_devices()} - rows_naming_devices(state_dir / "images.db")
    assert unnamed == set(), f"devices no row names: {unnamed}"


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def check_snapshot(done: subprocess.CompletedProcess[str], tmp_path: Path, check: Callable[[Path], None]) -> None:
    """The job completed; mount its VM snapshot read-only and run `check` on the tree."""
    from tests.test_process_image import mount_snapshot

    last = last_line(done)
    assert done.returncode == 0 and re.search(r"\bstate=complete\b", last), (last, done.stderr[-2000:])
    root = tmp_path / "mnt"
    device = dict(pair.split("=", 1) for pair in last.split())["snapshot_device"]
    mount_snapshot(device, root)
    try:
        check(root)
    finally:
        subprocess.run(["umount", str(root)], check=True, timeout=60)


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
# (huge_declared_size: the structure scan's wording, or the stream guard's where it is caught first)
VERIFY_REASONS = {"garbage_bytes": "not a tar",
                  "huge_declared_size": "extends past the end of the archive|entry too large: 'huge'"}


@needs_root
@pytest.mark.parametrize("case", _single_layer_cases(), ids=lambda case: case.name)
def test_corpus_case_end_to_end(case: Any, state_dir: Path, tmp_path: Path, s3_client: Any,
                                hostile_bucket: str, s3_server: Any) -> None:
    """A rejected layer aborts the job with its reason; a handled one completes and the
    mounted snapshot passes the case's check. Either way every device in the pool is named
    by a row and nothing outside the state dir changed."""
    done, before = process_hostile(case.name, case.build(), state_dir, tmp_path, s3_client,
                                   hostile_bucket, s3_server.endpoint_url)
    last = last_line(done)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before
    assert_pool_accounted(state_dir)
    if case.expect == "reject":
        assert done.returncode == 1 and re.search(r"\bstate=aborted\b", last), (last, done.stderr[-2000:])
        expected = VERIFY_REASONS.get(case.name, re.escape(case.reason))
        assert re.search(expected, last.split("error=", 1)[-1]), last
    else:
        check_snapshot(done, tmp_path, case.check)


def _layered_cases() -> list[Any]:
    from tests.hostile_tars import HOSTILE_CASES

    return [case for case in HOSTILE_CASES if case.lower is not None and case.limits is None]


@needs_root
@pytest.mark.parametrize("case", _layered_cases(), ids=lambda case: case.name)
def test_corpus_layered_case_end_to_end(case: Any, state_dir: Path, tmp_path: Path, s3_client: Any,
                                        hostile_bucket: str, s3_server: Any) -> None:
    """Every corpus case with a lower layer, as a two-layer image (`--image`: lower, then
    the case's layer) on real devices: the outcome and the check of test_corpus_case_end_to_end."""
    done, before = process_hostile(f"layered-{case.name}", [case.lower(), case.build()], state_dir, tmp_path,
                                   s3_client, hostile_bucket, s3_server.endpoint_url)
    last = last_line(done)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before
    assert_pool_accounted(state_dir)
    if case.expect == "reject":
        assert done.returncode == 1 and re.search(r"\bstate=aborted\b", last), (last, done.stderr[-2000:])
        assert case.reason in last.split("error=", 1)[-1], last
    else:
        check_snapshot(done, tmp_path, case.check)


# --- issue 13: parents resolved inside the root, across layers -------------------------------

def _dir(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info, data = _entry(name, tarfile.DIRTYPE)
    info.mode = 0o755
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    return _entry(name, kind, linkname=target)


def _is_file(root: Path, rel: str, data: bytes) -> None:
    assert stat.S_ISREG(os.lstat(root / rel).st_mode), rel
    assert (root / rel).read_bytes() == data, rel


def _is_symlink(root: Path, rel: str, target: str) -> None:
    assert stat.S_ISLNK(os.lstat(root / rel).st_mode) and os.readlink(root / rel) == target, rel


def _gone(root: Path, rel: str) -> None:
    assert not os.path.lexists(root / rel), rel


def _merged_usr() -> list[bytes]:
    """Debian's merged /usr: layer 1 makes bin -> usr/bin, layer 2 installs into bin/."""
    return [_tar(_dir("usr"), _dir("usr/bin"), _entry("usr/bin/sh", data=b"sh\n"), _link("bin", "usr/bin")),
            _tar(_entry("bin/newtool", data=b"new tool\n"))]


def _check_merged_usr(root: Path) -> None:
    _is_file(root, "usr/bin/newtool", b"new tool\n")
    _is_symlink(root, "bin", "usr/bin")
    _is_file(root, "usr/bin/sh", b"sh\n")


def _absolute_lib() -> list[bytes]:
    return [_tar(_dir("usr"), _dir("usr/lib"), _link("lib", "/usr/lib")),
            _tar(_entry("lib/libx.so", data=b"\x7fELF libx\n"))]


def _check_absolute_lib(root: Path) -> None:
    _is_file(root, "usr/lib/libx.so", b"\x7fELF libx\n")
    _is_symlink(root, "lib", "/usr/lib")


def _whiteout_through_bin() -> list[bytes]:
    return [_tar(_dir("usr"), _dir("usr/bin"), _entry("usr/bin/old", data=b"old\n"),
                 _entry("usr/bin/kept", data=b"kept\n"), _link("bin", "usr/bin")),
            _tar(_entry("bin/.wh.old"))]


def _check_whiteout_through_bin(root: Path) -> None:
    _gone(root, "usr/bin/old")
    _is_file(root, "usr/bin/kept", b"kept\n")
    _is_symlink(root, "bin", "usr/bin")


def _hardlink_through_symlinked_dir() -> list[bytes]:
    return [_tar(_dir("usr"), _dir("usr/lib"), _entry("usr/lib/libz.so.1", data=b"libz\n"), _link("lib", "usr/lib")),
            _tar(_dir("opt"), _link("opt/libz.so.1", "lib/libz.so.1", tarfile.LNKTYPE))]


def _check_hardlink_through_symlinked_dir(root: Path) -> None:
    link, target = os.lstat(root / "opt/libz.so.1"), os.lstat(root / "usr/lib/libz.so.1")
    assert (link.st_ino, link.st_nlink) == (target.st_ino, 2)
    _is_file(root, "opt/libz.so.1", b"libz\n")


RESOLVED_CASES = {
    "merged-usr": (_merged_usr, _check_merged_usr),
    "absolute-lib": (_absolute_lib, _check_absolute_lib),
    "whiteout-through-bin": (_whiteout_through_bin, _check_whiteout_through_bin),
    "hardlink-through-symlinked-dir": (_hardlink_through_symlinked_dir, _check_hardlink_through_symlinked_dir),
}


@needs_root
@pytest.mark.parametrize("name", RESOLVED_CASES)
def test_layers_through_lower_symlinks_apply_inside_the_root(name: str, state_dir: Path, tmp_path: Path,
                                                               s3_client: Any, hostile_bucket: str,
                                                               s3_server: Any) -> None:
    """What containerd applies and this unpacker refused before issue 13."""
    build, check = RESOLVED_CASES[name]
    done, before = process_hostile(name, build(), state_dir, tmp_path, s3_client, hostile_bucket,
                                   s3_server.endpoint_url)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before  # before the test's own mount point exists
    assert_pool_accounted(state_dir)
    check_snapshot(done, tmp_path, check)


@needs_root
def test_a_41_symlink_chain_is_a_clean_error(state_dir: Path, tmp_path: Path, s3_client: Any,
                                             hostile_bucket: str, s3_server: Any) -> None:
    """Layer 1: l0 -> l1 -> ... -> l40 -> usr (41 symlinks); layer 2 writes l0/x."""
    chain = [_link(f"l{i}", f"l{i + 1}") for i in range(40)] + [_link("l40", "usr")]
    layers = [_tar(_dir("usr"), *chain), _tar(_entry("l0/x", data=b"x\n"))]
    done, before = process_hostile("symlink-chain-41", layers, state_dir, tmp_path, s3_client, hostile_bucket,
                                   s3_server.endpoint_url)
    last = last_line(done)
    assert done.returncode == 1 and re.search(r"\bstate=aborted\b", last), (last, done.stderr[-2000:])
    assert "entry 'l0/x': more than 40 symlinks resolving 'l0'" in last, last
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert_pool_accounted(state_dir)
    assert snapshot_outside(tmp_path, state_dir) == before


# Symlinks planted by a lower layer, aimed at the canary directory beside the state dir: one by
# its absolute host path, one by enough `../` to climb out of any mount point. Inside the root
# both resolve to <root>/<the canary's path>, which layer 1 also fills, so each use has
# something to land on.
def _escape_links(canary: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    inner = str(canary).lstrip("/")
    parts = inner.split("/")
    made = [_dir("/".join(parts[: i + 1])) for i in range(len(parts))]
    return [*made, _entry(f"{inner}/secret", data=b"in-root secret\n"), _entry(f"{inner}/other", data=b"other\n"),
            _link("hostabs", str(canary)), _link("dotdot", "../" * 40 + inner)]


def _write_use(inner: str) -> tuple[bytes, Callable[[Path], None]]:
    def check(root: Path) -> None:
        _is_file(root, f"{inner}/secret", b"pwned by hostabs\n")
        _is_file(root, f"{inner}/new", b"pwned by dotdot\n")

    return _tar(_entry("hostabs/secret", data=b"pwned by hostabs\n"), _entry("dotdot/new", data=b"pwned by dotdot\n")), check


def _whiteout_use(inner: str) -> tuple[bytes, Callable[[Path], None]]:
    def check(root: Path) -> None:
        _gone(root, f"{inner}/secret")
        _gone(root, f"{inner}/other")
        _is_symlink(root, "hostabs", "/" + inner)

    return _tar(_entry("hostabs/.wh.secret"), _entry("dotdot/.wh.other")), check


def _opaque_use(inner: str) -> tuple[bytes, Callable[[Path], None]]:
    def check(root: Path) -> None:
        assert sorted(os.listdir(root / inner)) == ["mine"]
        _is_symlink(root, "dotdot", "../" * 40 + inner)

    return _tar(_entry("hostabs/.wh..wh..opq"), _entry("dotdot/.wh..wh..opq"), _entry("dotdot/mine", data=b"m\n")), check


def _hardlink_use(inner: str) -> tuple[bytes, Callable[[Path], None]]:
    def check(root: Path) -> None:
        for link in ("h1", "h2"):
            assert os.lstat(root / link).st_ino == os.lstat(root / inner / "secret").st_ino, link
        _is_file(root, "h1", b"in-root secret\n")

    return _tar(_link("h1", "hostabs/secret", tarfile.LNKTYPE), _link("h2", "/dotdot/secret", tarfile.LNKTYPE)), check


ESCAPE_USES = {"write": _write_use, "whiteout": _whiteout_use, "opaque": _opaque_use, "hardlink": _hardlink_use}


@needs_root
@pytest.mark.parametrize("resolver", ["openat2", "walk"])
@pytest.mark.parametrize("use", ESCAPE_USES)
def test_lower_layer_symlinks_to_the_host_stay_inside_the_root(use: str, resolver: str, state_dir: Path,
                                                               tmp_path: Path, s3_client: Any, hostile_bucket: str,
                                                               s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lower layer's `hostabs -> /<canary>` and `dotdot -> ../../..<canary>`, used by the
    upper layer to write, white out, place an opaque marker and hardlink: every one lands
    in the root's own copy of the canary's path; the canary itself is untouched. The child
    process-image inherits FLYIO_UNPACK_RESOLVER, so both resolvers run end to end."""
    monkeypatch.setenv("FLYIO_UNPACK_RESOLVER", resolver)
    canary = tmp_path / "outside"
    inner = str(canary).lstrip("/")
    upper, check = ESCAPE_USES[use](inner)
    layers = [_tar(*_escape_links(canary)), upper]
    done, before = process_hostile(f"escape-{use}-{resolver}", layers, state_dir, tmp_path, s3_client,
                                   hostile_bucket, s3_server.endpoint_url)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before  # before the test's own mount point exists
    assert (canary / "secret").read_text() == "secret\n" and sorted(os.listdir(canary)) == ["secret"]
    assert_pool_accounted(state_dir)
    check_snapshot(done, tmp_path, check)


# --- issue 10: hostile image archives (OCI layout, docker save) through process-image ----------

@needs_root
@pytest.mark.parametrize("kind", ["oci:digest-traversal", "docker:symlink-layer"])
def test_hostile_archive_is_refused_end_to_end(kind: str, state_dir: Path, tmp_path: Path, s3_client: Any,
                                               hostile_bucket: str, s3_server: Any) -> None:
    """An OCI layout whose layer digest is `sha256:../../../../etc/passwd` and a docker save
    whose layer.tar is a symlink to /etc/shadow, uploaded as one S3 object each: the job
    aborts with formats.py's reason, and nothing outside the state dir (or in it) changed."""
    from tests.test_formats import OCI_REFUSALS, hostile_docker_save, hostile_oci, layer_tar

    fmt, what = kind.split(":")
    archive = hostile_oci(what) if fmt == "oci" else hostile_docker_save(what, [layer_tar(1), layer_tar(2)])
    reason = OCI_REFUSALS[what] if fmt == "oci" else "layer.tar is not a regular file"
    done, before = process_hostile(f"archive-{fmt}-{what}", archive, state_dir, tmp_path, s3_client, hostile_bucket,
                                   s3_server.endpoint_url)
    last = last_line(done)
    assert done.returncode == 1 and re.search(r"\bstate=aborted\b", last), (last, done.stderr[-2000:])
    assert re.search(reason, last.split("error=", 1)[-1]), last
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before
    assert_pool_accounted(state_dir)


@needs_root
def test_docker_save_of_hostile_layers_applies_inside_the_root(state_dir: Path, tmp_path: Path, s3_client: Any,
                                                               hostile_bucket: str, s3_server: Any) -> None:
    """A docker save archive whose layer 1 plants `l -> ../../../outside` (the target in a pax
    linkpath; from the mount point state/mnt/<job> it names the real canary) and whose
    layer 2 writes `l/secret` and hardlinks it: both land in the root's own outside/."""
    from tests.hostile_tars import hard, pax_linkpath, reg, sym, tar_of
    from tests.test_formats import hostile_docker_save

    layers = [tar_of(pax_linkpath(sym("l", "placeholder"), "../../../outside")),
              tar_of(reg("l/secret", b"pwned\n"), hard("h", "l/secret"))]
    done, before = process_hostile("archive-docker-hostile-layers", hostile_docker_save("plain", layers), state_dir,
                                   tmp_path, s3_client, hostile_bucket, s3_server.endpoint_url)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert snapshot_outside(tmp_path, state_dir) == before
    assert (tmp_path / "outside" / "secret").read_text() == "secret\n"
    assert_pool_accounted(state_dir)

    def check(root: Path) -> None:
        _is_symlink(root, "l", "../../../outside")
        _is_file(root, "outside/secret", b"pwned\n")
        assert os.lstat(root / "h").st_ino == os.lstat(root / "outside/secret").st_ino

    check_snapshot(done, tmp_path, check)


def test_the_state_dir_snapshot_sees_writes_beside_the_mount_points(tmp_path: Path) -> None:
    """The filter keeps the product's own files out and everything else in: a file a `../`
    from a mount point would write (state/mnt/x, state/x, state/fsm/x) is seen, the
    catalog, blobs, locks and mount point directories are not."""
    state = tmp_path / "state"
    for rel in ("images.db", "images.db-wal", "blobs/sha256/ab", "fsm/flyio-manager.lock.mutex", "pool_data"):
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / rel).write_bytes(b"product\n")
    (state / "mnt" / "job-1").mkdir(parents=True)
    assert state_dir_files(state) == {}
    for rel in ("mnt/x", "x", "fsm/x", "mnt/job-1/x"):
        (state / rel).write_bytes(b"escaped\n")
    assert set(state_dir_files(state)) == {"state:mnt/x", "state:x", "state:fsm/x", "state:mnt/job-1/x"}
