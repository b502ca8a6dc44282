"""The `fsm` command group, run as operators run it (a real process, a real SQLite file)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.app import open_store
from states.submit import resolve_request
from fsm.definition import ABORTED, COMPLETE, OperatorEvent
from states.names import ImageEvent, ImageState
from states.workflow import WORKFLOW_NAME

REPO = Path(__file__).resolve().parents[1]


def fsm(state_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "fsm", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # One error line, last; log lines before it (e.g. "backend selected") are fine.
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def make_layer(path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        data = b"hello from a file:// layer\n"
        info = tarfile.TarInfo("etc/motd")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return path


def job_rows(state_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of jobs and job_events, in id order (a byte comparison would trip on WAL files)."""
    with sqlite3.connect(state_dir / "images.db") as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() for table in ("jobs", "job_events")}


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    if (directory / "pool_data").exists():
        from devices.base import PoolConfig
        from devices.blockfile import BlockfilePool

        BlockfilePool(PoolConfig(directory=str(directory))).teardown_pool()


def test_reads_on_an_empty_store_and_the_graph(state_dir: Path) -> None:
    listing = fsm(state_dir, "list", "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout) == []
    graph = fsm(state_dir, "graph")
    assert graph.returncode == 0
    for state in ImageState:
        assert state in graph.stdout
    assert ImageEvent.LAYER_UNPACKED in graph.stdout  # the per-layer loop is drawn from the definition


def test_the_graph_draws_the_operator_events(state_dir: Path) -> None:
    """abort, resume, retry and reopen are edges of the machine, drawn from the same table."""
    graph = fsm(state_dir, "graph").stdout
    S = ImageState
    for source in (S.PENDING, S.DOWNLOADING, S.VERIFYING, S.CREATING_DEVICE, S.MAKING_FS, S.UNPACKING, S.ACTIVATING,
                   S.SNAPSHOTTING):
        assert f"{source} --> {ABORTED}: {OperatorEvent.ABORT}" in graph, source
    assert f"{S.MAKING_FS} --> {S.CREATING_DEVICE}: {OperatorEvent.RESUME}" in graph
    assert f"{S.UNPACKING} --> {S.CREATING_DEVICE}: " in graph and f"| {OperatorEvent.RESUME}" in graph
    assert (f"{ABORTED} --> {S.CREATING_DEVICE}: {OperatorEvent.RETRY} "
            f"[aborted_in_{S.CREATING_DEVICE}_or_{S.MAKING_FS}_or_{S.UNPACKING}]") in graph
    assert f"{ABORTED} --> {S.PENDING}: {OperatorEvent.RETRY} [aborted_in_{S.PENDING}]" in graph
    assert f"{COMPLETE} --> {S.PENDING}: {OperatorEvent.REOPEN}" in graph
    snapshot = fsm(state_dir, "graph", "--workflow", "snapshot").stdout
    assert f"{COMPLETE} --> {S.PENDING}: {OperatorEvent.REOPEN}" in snapshot
    assert OperatorEvent.RESUME not in snapshot  # every snapshot state resumes in itself


def test_unknown_job_ids_are_one_line_errors(state_dir: Path) -> None:
    for command in (["show", "42"], ["history", "42"], ["abort", "42"], ["retry", "42"]):
        one_line_error(fsm(state_dir, *command), "job 42 not found")


def test_aborting_a_completed_job_is_refused_and_changes_nothing(state_dir: Path) -> None:
    store = open_store(state_dir)
    job, _ = store.create_or_get(WORKFLOW_NAME, "done-key", ImageState.PENDING, {})
    with store.transaction() as session:
        session.get(type(job), job.id).state = COMPLETE
    before = job_rows(state_dir)
    one_line_error(fsm(state_dir, "abort", str(job.id)), f"job {job.id} is complete", "only unfinished jobs")
    assert job_rows(state_dir) == before
    assert before["jobs"][0][0] == job.id and "complete" in before["jobs"][0]
    assert store.history(job.id) == []


def test_list_filters_by_state(state_dir: Path) -> None:
    store = open_store(state_dir)
    pending, _ = store.create_or_get(WORKFLOW_NAME, "still-pending", ImageState.PENDING, {})
    done, _ = store.create_or_get(WORKFLOW_NAME, "already-done", ImageState.PENDING, {})
    with store.transaction() as session:
        session.get(type(done), done.id).state = COMPLETE

    def listed(*args: str) -> list[tuple[int, str]]:
        result = fsm(state_dir, "list", *args, "--json")
        assert result.returncode == 0, result.stderr
        return [(job["id"], job["state"]) for job in json.loads(result.stdout)]

    assert sorted(listed()) == [(pending.id, ImageState.PENDING), (done.id, COMPLETE)]
    assert listed("--state", COMPLETE) == [(done.id, COMPLETE)]
    assert listed("--state", ImageState.PENDING) == [(pending.id, ImageState.PENDING)]
    assert listed("--state", ABORTED) == []
    text = fsm(state_dir, "list", "--state", COMPLETE)
    assert "already-done" in text.stdout and "still-pending" not in text.stdout


def test_graph_as_svg(state_dir: Path, tmp_path: Path) -> None:
    result = fsm(state_dir, "graph", "--format", "svg")
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("<?xml") and "<svg" in result.stdout
    for state in ImageState:
        assert f">{state}</text>" in result.stdout, state
    out = tmp_path / "graph.svg"
    written = fsm(state_dir, "graph", "--format", "svg", "--output", str(out))
    assert written.returncode == 0 and f"wrote {out}" in written.stdout
    assert out.read_text().strip() == result.stdout.strip()


def test_graph_as_png(state_dir: Path, tmp_path: Path) -> None:
    one_line_error(fsm(state_dir, "graph", "--format", "png"), "--format png needs --output FILE")
    out = tmp_path / "graph.png"
    result = fsm(state_dir, "graph", "--format", "png", "-o", str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_a_corrupt_database_is_a_one_line_error_and_is_left_alone(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    db = state_dir / "images.db"
    db.write_bytes(b"this is not a database" * 200)
    before = db.read_bytes()
    one_line_error(fsm(state_dir, "list"), "corrupt", str(db), "backup")
    assert db.read_bytes() == before


def test_a_locked_database_is_a_one_line_error(state_dir: Path) -> None:
    # A job to abort: the abort must write (reads do not wait for a writer in WAL mode).
    open_store(state_dir).create_or_get(WORKFLOW_NAME, "locked-db", "pending", {})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)"), str(state_dir / "images.db")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        result = fsm(state_dir, "abort", "1")
        one_line_error(result, "locked")
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_held_by_a_live_process_names_it_and_is_untouched(state_dir: Path) -> None:
    lock = state_dir / "fsm" / "flyio-manager.lock"
    lock.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        content = json.dumps({"pid": sleeper.pid, "timestamp": int(time.time()), "command": "process-image"})
        lock.write_text(content)
        one_line_error(fsm(state_dir, "resume"), f"pid {sleeper.pid}", "process-image", str(lock))
        assert lock.read_text() == content
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its holder is gone now: the lock is stale and the next command takes it.
    assert fsm(state_dir, "resume").returncode == 0
    assert not lock.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
def test_abort_history_retry_on_a_real_image_job(state_dir: Path, tmp_path: Path) -> None:
    layer = make_layer(tmp_path / "layer.tar")
    request = resolve_request(url=layer.as_uri())
    store = open_store(state_dir)
    job, _ = store.create_or_get(WORKFLOW_NAME, request.idempotency_key, ImageState.PENDING, request.job_context())

    aborted = fsm(state_dir, "abort", str(job.id), "--reason", "operator test")
    assert aborted.returncode == 0, aborted.stderr
    assert json.loads(fsm(state_dir, "show", str(job.id), "--json").stdout)["state"] == ABORTED

    retried = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "fsm", "retry", str(job.id)],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "FLYIO_BACKEND": "blockfile"})
    assert retried.returncode == 0, retried.stderr[-2000:]
    history = [row for row in json.loads(fsm(state_dir, "history", str(job.id), "--json").stdout)
               if row["kind"] == "transition"]
    assert [e["event"] for e in history][:2] == [OperatorEvent.ABORT, OperatorEvent.RETRY]
    assert history[-1]["to"] == COMPLETE
    assert all(e["duration_ms"] >= 0 for e in history)
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    text = fsm(state_dir, "history", str(job.id))
    assert ImageEvent.LAYER_UNPACKED in text.stdout and ImageEvent.SNAPSHOTTED in text.stdout
    with sqlite3.connect(state_dir / "images.db") as db:
        assert db.execute("SELECT activation_status FROM images").fetchall() == [("active",)]
    for row in store.list_jobs():
        assert row.owner_pid is None


def test_the_fsm_console_script_is_the_same_group(state_dir: Path) -> None:
    script = Path(sys.executable).with_name("fsm")
    if not script.exists():
        pytest.skip(f"{script} not installed (run scripts/setup: pip install -e .)")
    result = subprocess.run([str(script), "--state-dir", str(state_dir), "list", "--json"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_abort_wait_on_a_job_that_does_not_stop_in_time_is_one_line_and_the_request_stays(state_dir: Path) -> None:
    """A live owner that never reaches a safe point (as a step inside a kernel operation):
    the request is recorded, `--wait` gives up after its timeout, `fsm show` says it is pending."""
    store = open_store(state_dir)
    job, _ = store.create_or_get(WORKFLOW_NAME, "busy-key", ImageState.UNPACKING, {})
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with sqlite3.connect(state_dir / "images.db") as db:
            db.execute("UPDATE jobs SET owner_pid=?, owner_boot_id=?, lease_expires_at=datetime('now','+120 seconds') "
                       "WHERE id=?", (owner.pid, Path("/proc/sys/kernel/random/boot_id").read_text().strip(), job.id))
        result = fsm(state_dir, "abort", str(job.id), "--reason", "operator test", "--wait", "--timeout", "1")
        assert f"abort requested: job {job.id} (pid {owner.pid}) stops at its next safe point" in result.stdout
        one_line_error(result, f"job {job.id} not aborted within 1s", "still unpacking", "stays pending")
        shown = json.loads(fsm(state_dir, "show", str(job.id), "--json").stdout)
        assert shown["state"] == ImageState.UNPACKING and shown["owner_alive"] is True
        assert shown["abort_pending"]["reason"] == "operator test" and shown["abort_pending"]["requested_by_pid"]
        text = fsm(state_dir, "show", str(job.id)).stdout
        assert "abort pending:    operator test (asked by pid" in text, text
        history = json.loads(fsm(state_dir, "history", str(job.id), "--json").stdout)
        assert [row["kind"] for row in history] == ["abort-request"]
    finally:
        owner.kill()
        owner.wait()
