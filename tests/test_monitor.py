"""`monitor` in a real terminal (tmux) and `monitor --once` as plain text, against a state
dir holding one completed image (real SeaweedFS, SQLite, loop devices, blockfile pool)."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from states.names import ImageEvent, ImageState
from tests.conftest import SampleBucket
from tests.test_process_image import manager, teardown

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to drive a real terminal")


@pytest.fixture(scope="module")
def completed_state(tmp_path_factory: pytest.TempPathFactory, sample_bucket: SampleBucket) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices, mkfs and mount")
    state_dir = tmp_path_factory.mktemp("monitor") / "state"
    try:
        done = manager(state_dir, "process-image", "--s3-key", "images/node/5.tar", "--bucket", sample_bucket.name,
                       "--endpoint-url", sample_bucket.endpoint_url, "--device-size", "64M", "--backend", "blockfile")
        assert done.returncode == 0, done.stderr[-3000:]
        yield state_dir
    finally:
        teardown(state_dir)


def db_files(state_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of the database file: monitor must not write it."""
    st = (state_dir / "images.db").stat()
    return {"images.db": (st.st_size, st.st_mtime_ns)}


def title_clock(screen: str) -> str | None:
    """The time in the dashboard's title line (the transitions table has times too)."""
    found = re.search(r"^flyio-image-manager monitor  (\S+ \S+) UTC", screen, re.M)
    return found.group(1) if found else None


@needs_root
@needs_tmux
def test_live_dashboard_in_a_terminal(completed_state: Path) -> None:
    session = f"monitor-{uuid.uuid4().hex[:8]}"
    before = db_files(completed_state)
    # The size must come from the terminal, not from a COLUMNS/LINES the test runner may export.
    command = (f"cd {REPO} && env -u COLUMNS -u LINES FLYIO_BACKEND=blockfile {sys.executable} -m cli --state-dir {completed_state} "
               f"monitor --interval 0.5")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", command], check=True, timeout=30)
    try:
        screen = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.5)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                                    check=True, timeout=30).stdout
            if "Health checks" in screen and "memory_pressure" in screen:
                break
        # A later frame has a later clock in the title: it is live, not one print. (Polled:
        # a frame includes a health check, slower on a loaded machine than the interval.)
        first_clock, later_clock = title_clock(screen), title_clock(screen)
        deadline = time.monotonic() + 20
        while first_clock and later_clock == first_clock and time.monotonic() < deadline:
            time.sleep(0.5)
            later_clock = title_clock(subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                                     capture_output=True, text=True, check=True, timeout=30).stdout)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)
    assert "Pool" in screen and "backend=blockfile" in screen, screen
    assert re.search(r"data\s+\[█+░*\]\s+\d+\.\d% used", screen), screen
    lines = screen.splitlines()
    header = next(i for i, line in enumerate(lines) if "Jobs by state" in line)
    assert ImageState.COMPLETE in lines[header + 1] and lines[header + 2].strip("│ ") == "1", screen
    assert max(len(line) for line in lines) == 160, screen  # drawn to the terminal's width
    assert "Recent transitions" in screen and ImageEvent.SNAPSHOTTED in screen, screen
    assert "Orphaned devices (0)" in screen, screen
    for check in ("dstate", "pool", "kernel_log", "memory_pressure", "io_wait"):
        assert re.search(rf"{check}\s+(PASS|FAIL)", screen), (check, screen)
    assert "Traceback" not in screen and "INFO[" not in screen, screen
    assert first_clock and later_clock and later_clock > first_clock, (first_clock, later_clock)
    assert db_files(completed_state) == before


@needs_root
def test_once_prints_one_plain_frame(completed_state: Path) -> None:
    before = db_files(completed_state)
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(completed_state), "monitor", "--once",
                           "--backend", "blockfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b[" not in out  # plain text: no escape sequences when stdout is a pipe
    data = re.search(r"^data\s+\[(#*)(-*)\]\s+([\d.]+)% used", out, re.M)
    assert data, out
    assert float(data.group(3)) > 0 and len(data.group(1)) + len(data.group(2)) == 30
    assert re.search(r"^jobs: complete=1$", out, re.M), out
    assert "running jobs: 0" in out and "orphaned devices: 0" in out
    transitions = re.findall(r"^  job 1 (\S+) -> (\S+) \((\w+)\)", out, re.M)
    with sqlite3.connect(completed_state / "images.db") as db:
        events = db.execute("SELECT from_state, to_state, event FROM job_events ORDER BY id DESC LIMIT 10").fetchall()
    assert transitions == [(f or "-", t, e) for f, t, e in events] and len(events) >= 8
    health = dict(re.findall(r"^  (\w+)\s+(PASS|FAIL)\s", out, re.M))
    assert set(health) == {"dstate", "pool", "kernel_log", "memory_pressure", "io_wait"}
    assert health["pool"] == "PASS" and health["memory_pressure"] == "PASS"
    assert db_files(completed_state) == before


def test_once_without_a_database_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(tmp_path / "none"), "monitor", "--once",
                           "--backend", "blockfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: database ") and "does not exist" in done.stderr
    assert not (tmp_path / "none" / "images.db").exists()


@needs_root
def test_once_shows_a_waiting_job_with_its_step_and_age_and_an_orphan(tmp_path: Path) -> None:
    """A real aborted job leaves an orphan; a real job kept waiting by a failing health check
    is running: the frame shows both, with the job's state, age and reason."""
    import io
    import tarfile

    state_dir = tmp_path / "state"
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        ok = tarfile.TarInfo("etc/hostname")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"box\n"))
        link = tarfile.TarInfo("etc/link")  # refused after etc/hostname is written: a hardlink to nothing
        link.type, link.linkname = tarfile.LNKTYPE, "etc/missing"
        tar.addfile(link)
    waiting: subprocess.Popen[str] | None = None
    try:
        aborted = manager(state_dir, "process-image", "--url", f"file://{hostile}", "--device-size", "64M",
                          "--backend", "blockfile")
        assert aborted.returncode == 1, aborted.stdout + aborted.stderr[-2000:]
        calm = tmp_path / "calm.tar"
        with tarfile.open(calm, "w") as tar:
            tar.addfile(ok, io.BytesIO(b"box\n"))
        waiting = subprocess.Popen(
            [sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--url", f"file://{calm}",
             "--device-size", "64M", "--backend", "blockfile"], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT": "100"})
        deadline = time.monotonic() + 120
        while True:
            with sqlite3.connect(state_dir / "images.db", timeout=10) as db:
                row = db.execute("SELECT id, state FROM jobs WHERE error LIKE 'waiting:%'").fetchone()
            if row:
                break
            assert waiting.poll() is None and time.monotonic() < deadline, "the job never waited"
            time.sleep(0.2)
        done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "monitor", "--once",
                               "--backend", "blockfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "running jobs: 1" in out, out
        job_line = re.search(rf"^  job {row[0]} state={row[1]} age=\S+ updated=\S+ ago pid={waiting.pid} "
                             r"note=waiting: .*memory", out, re.M)
        assert job_line, out
        assert "orphaned devices: 1" in out, out
        assert re.search(r"^  thin-1 job=1 detected=\S+ \S+ reason=.*hardlink target 'etc/missing' does not exist", out, re.M), out
    finally:
        if waiting is not None:
            waiting.kill()
            waiting.wait(timeout=30)
        teardown(state_dir)
