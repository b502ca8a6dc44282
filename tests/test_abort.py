"""`fsm abort` reaches a job wherever it waits, through the real CLI and a real
`process-image` child (blockfile pool, real loop devices, the session's SeaweedFS):
on a failing health threshold, on the Operation Guard's lock held by another process, and
in a retry back-off. Latency is measured from the abort request's row to the abort's row,
both read from the database. And the history of a 5-layer run names every layer."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fsm.definition import ABORTED, COMPLETE, OperatorEvent
from fsm.models import WaitOutcome
from states.names import ImageEvent, ImageState, SnapshotState
from tests.conftest import SampleBucket
from tests.test_fsm_cli import fsm
from tests.test_process_image import DEVICE_SIZE, REPO, teardown
from tests.test_safeguards import pool_state_dir  # noqa: F401  (a fixture: a state dir with a pool)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
T = TypeVar("T")
ABORT_WITHIN_S = 2.0  # the bound for the test; the engine's slice is 0.25 s


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    teardown(directory)


def start_process_image(state_dir: Path, bucket: SampleBucket, *source: str,
                        env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image",
                             "--bucket", bucket.name, "--endpoint-url", bucket.endpoint_url, "--backend", "blockfile",
                             "--device-size", DEVICE_SIZE, *source], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def query(state_dir: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows of `sql`, or [] while the database does not exist yet or is being migrated."""
    db = state_dir / "images.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # no such table yet: the child is still migrating
        return []


def poll(condition: Callable[[], T | None], what: str, proc: subprocess.Popen[str] | None = None,
         timeout: float = 120, every: float = 0.02) -> T:
    """The first truthy value of `condition()`, polled until `timeout` (fails naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process-image ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def job_state(state_dir: Path) -> tuple[int, str, str | None] | None:
    rows = query(state_dir, "SELECT id, state, error FROM jobs ORDER BY id LIMIT 1")
    return rows[0] if rows else None


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.removesuffix("Z"))


def abort_latency(history: list[dict[str, Any]]) -> float:
    """Seconds from the (last) abort request to the abort, both as the database has them."""
    request = [row for row in history if row["kind"] == "abort-request"][-1]
    abort = history[-1]
    assert (abort["kind"], abort["event"]) == ("transition", OperatorEvent.ABORT), history[-3:]
    return (parse(abort["finished_at"]) - parse(request["requested_at"])).total_seconds()


def abort_through_the_cli(state_dir: Path, job_id: int, pid: int, reason: str) -> list[dict[str, Any]]:
    """`fsm abort` (exit 0, the requested line), then the job's history once it is aborted."""
    asked = fsm(state_dir, "abort", str(job_id), "--reason", reason)
    assert asked.returncode == 0, asked.stderr
    assert f"abort requested: job {job_id} (pid {pid}) stops at its next safe point" in asked.stdout
    poll(lambda: (job_state(state_dir) or (0, ""))[1] == ABORTED, "the abort", timeout=30, every=0.01)
    return json.loads(fsm(state_dir, "history", str(job_id), "--json").stdout)


def finish(proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(timeout=60)
    return err


def orphans_of(state_dir: Path, job_id: int) -> list[tuple[Any, ...]]:
    return query(state_dir, "SELECT device_id, reason FROM orphaned_devices WHERE job_id = ?", job_id)


def test_a_job_kept_waiting_by_a_failing_threshold_is_aborted_at_once(state_dir: Path,
                                                                       sample_bucket: SampleBucket) -> None:
    proc = start_process_image(state_dir, sample_bucket, "--image", "golang",
                               env={"FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT": "99.9"})
    try:
        job_id, state, _ = poll(lambda: (row := job_state(state_dir)) and (row[2] or "").startswith("waiting:") and row,
                                "the job to wait", proc)
        shown = fsm(state_dir, "show", str(job_id))
        assert f"owner:            pid {proc.pid} (alive)" in shown.stdout, shown.stdout
        assert "waiting:          since " in shown.stdout and "memory_pressure" in shown.stdout, shown.stdout
        history = abort_through_the_cli(state_dir, job_id, proc.pid, "operator test")
    finally:
        err = finish(proc)
    latency = abort_latency(history)
    print(f"threshold wait: abort landed {latency:.3f}s after the request")
    assert latency < ABORT_WITHIN_S
    assert (history[-1]["from"], history[-1]["error"]) == (state, "operator test")
    wait, request = [row for row in history if row["kind"] != "transition"]  # the wait began first
    assert (request["kind"], request["reason"], request["state"]) == ("abort-request", "operator test", state)
    assert request["requested_by_pid"] not in (None, proc.pid)  # the fsm process asked
    assert (wait["kind"], wait["state"], wait["event"], wait["outcome"]) == ("guard-wait", state, ImageEvent.VERIFIED,
                                                                               WaitOutcome.ABORTED)
    assert any("memory_pressure" in reason for reason in wait["reasons"])
    assert orphans_of(state_dir, job_id) == []  # held before any device was made
    assert "FSM aborted" in err
    assert fsm(state_dir, "show", str(job_id), "--json").returncode == 0


def test_a_job_waiting_for_the_operation_guards_lock_is_aborted_at_once(state_dir: Path,
                                                                         sample_bucket: SampleBucket) -> None:
    proc = start_process_image(state_dir, sample_bucket, "--image", "golang")
    lock = state_dir / "fsm" / "dm-operations.lock"
    fd: int | None = None
    try:
        poll(lambda: (job_state(state_dir) or (0, ""))[1] == ImageState.MAKING_FS, "the base layer's making_fs", proc,
             every=0.002)
        # Take the lock between the job's operations: it then waits with the base layer's
        # device made but not yet unpacked (an orphan once aborted).
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        poll(lambda: _try_flock(fd), "the Operation Guard's lock", proc, every=0.001)
        job_id = job_state(state_dir)[0]  # type: ignore[index]
        history = abort_through_the_cli(state_dir, job_id, proc.pid, "lock wait test")
    finally:
        if fd is not None:
            os.close(fd)
        err = finish(proc)
    latency = abort_latency(history)
    print(f"lock wait: abort landed {latency:.3f}s after the request")
    assert latency < ABORT_WITHIN_S
    # Held before make-filesystem or before unpack-image: either way the base device is unfinished.
    assert history[-1]["from"] in (ImageState.MAKING_FS, ImageState.UNPACKING) and history[-1]["error"] == "lock wait test"
    assert history[-1]["detail"]["text"].startswith("layer 1/5 sha256:")
    assert [reason for _, reason in orphans_of(state_dir, job_id)] == ["lock wait test"]
    assert "wait for the guard given up" in err and "AbortRequested" in err


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def test_a_job_in_a_retry_back_off_is_aborted_at_once_and_abort_wait_returns(state_dir: Path,
                                                                              sample_bucket: SampleBucket) -> None:
    """ChainBusy: another job is making this layer chain's device, so creating_device is
    retried with back-off (up to ~10 min); `fsm abort --wait` ends it at once."""
    from cli.app import open_store
    from images.chain import chain_ids

    digest = "sha256:" + _sha256(sample_bucket.layers["golang"][0])
    store = open_store(state_dir)
    other, _ = store.create_or_get("image", "another image sharing the base layer", ImageState.CREATING_DEVICE, {})
    # The other job's intent row, as the device ledger writes it before create_thin.
    with sqlite3.connect(state_dir / "images.db") as db:
        db.execute("INSERT INTO unpacked_images (chain_id, layer_digest, device_id, device_name, size_bytes, state, "
                   "job_id, created_at, updated_at) VALUES (?, ?, 900, 'thin-900', ?, 'creating', ?, "
                   "datetime('now'), datetime('now'))", (chain_ids([digest])[0], digest, 64 * 1024**2, other.id))
    proc = start_process_image(state_dir, sample_bucket, "--s3-key", "images/golang/1.tar")
    try:
        rows = poll(lambda: query(state_dir, "SELECT id FROM jobs WHERE error LIKE 'retrying:%being unpacked by job%' "
                                             "AND waiting_since IS NOT NULL"), "a retry back-off", proc)
        job_id = rows[0][0]
        started = time.monotonic()
        done = fsm(state_dir, "abort", str(job_id), "--reason", "chain busy test", "--wait", "--timeout", "30")
        waited = time.monotonic() - started
    finally:
        err = finish(proc)
    assert done.returncode == 0, done.stderr
    assert f"abort requested: job {job_id} (pid {proc.pid})" in done.stdout
    assert f"job {job_id} aborted: chain busy test" in done.stdout
    history = json.loads(fsm(state_dir, "history", str(job_id), "--json").stdout)
    latency = abort_latency(history)
    print(f"retry back-off: abort landed {latency:.3f}s after the request; fsm abort --wait took {waited:.2f}s")
    assert latency < ABORT_WITHIN_S
    retry = [row for row in history if row["kind"] == "retry-wait"]
    assert [(r["state"], r["outcome"]) for r in retry] == [(ImageState.CREATING_DEVICE, WaitOutcome.ABORTED)]
    assert f"being unpacked by job {other.id}" in retry[0]["reasons"][0]
    assert orphans_of(state_dir, job_id) == []
    assert "step failed, retrying" in err


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_history_of_a_five_layer_run_names_every_layer_in_order_and_a_forced_wait(
        pool_state_dir: Path, sample_bucket: SampleBucket) -> None:
    """A real run (in-process, real pool) whose health guard fails twice at the start, then
    the real `fsm history` and `fsm show` of it."""
    state_dir = pool_state_dir
    from cli.app import open_store
    from fsm.runner import Runner
    from states.registry import all_workflows, build_services
    from states.submit import resolve_request
    from states.workflow import WORKFLOW_NAME

    services = build_services(state_dir, backend="blockfile", device_size_bytes=64 * 1024**2)
    failures = iter(["forced: test says wait", "forced: test says wait"])
    flaky = dataclasses.replace(services, health_guard=lambda: next(failures, None))
    request = resolve_request(bucket=sample_bucket.name, image="golang", endpoint_url=sample_bucket.endpoint_url)
    job = Runner(open_store(state_dir), all_workflows(flaky)).start(WORKFLOW_NAME, request.idempotency_key,
                                                                    request.job_context())
    assert job.state == COMPLETE, job.error
    history = json.loads(fsm(state_dir, "history", str(job.id), "--json").stdout)
    loop = [row for row in history if row["kind"] == "transition" and row["event"] in (ImageEvent.LAYER_UNPACKED, ImageEvent.LAYER_REUSED)]
    digests = [row["detail"]["digest"] for row in loop]
    expected = ["sha256:" + _sha256(path) for path in sample_bucket.layers["golang"]]
    assert digests == expected and len(set(digests)) == 5
    assert [row["detail"]["layer"] for row in loop] == [1, 2, 3, 4, 5]
    assert all(row["detail"]["outcome"] in ("unpacked", "reused") for row in loop)
    waits = [row for row in history if row["kind"] == "guard-wait"]
    assert [(w["state"], w["event"], w["waits"], w["reasons"], w["outcome"]) for w in waits] == [
        (ImageState.VERIFYING, ImageEvent.VERIFIED, 2, ["forced: test says wait"], WaitOutcome.PASSED)]
    text = fsm(state_dir, "history", str(job.id)).stdout
    assert f"layer 3/5 {expected[2][:11]}… unpacked" in text, text
    assert "guard-wait" in text and "verified, passed: forced: test says wait" in text, text
    shown = fsm(state_dir, "show", str(job.id), "--json")
    now = json.loads(shown.stdout)
    assert now["state"] == COMPLETE and now["waiting"] is None and now["abort_pending"] is None
    assert len(now["now"]["devices"]) == 5 and now["now"]["snapshot_device_id"]


def test_a_snapshot_job_waiting_for_the_operation_guards_lock_is_aborted_within_a_second(
        state_dir: Path, sample_bucket: SampleBucket) -> None:
    """The snapshot workflow's steps are built as the image workflow's (states/steps.py): a
    VM's snapshot queued on the Operation Guard gives the wait up on `fsm abort`."""
    made = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--s3-key",
                           "images/node/5.tar", "--bucket", sample_bucket.name, "--endpoint-url",
                           sample_bucket.endpoint_url, "--backend", "blockfile", "--device-size", DEVICE_SIZE],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    lock = state_dir / "fsm" / "dm-operations.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's device step holds the guard
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "snapshot",
                             "images/node/5.tar", "--vm", "vm-held", "--backend", "blockfile"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = poll(lambda: (rows := query(state_dir, "SELECT id FROM jobs WHERE workflow = 'snapshot' AND "
                                                        "state = 'snapshotting'")) and rows[0][0],
                      "the snapshot job to queue on the guard", proc, every=0.002)
        asked = fsm(state_dir, "abort", str(job_id), "--reason", "snapshot lock wait test")
        assert asked.returncode == 0, asked.stderr
        poll(lambda: query(state_dir, "SELECT state FROM jobs WHERE id = ?", job_id)[0][0] == ABORTED,
             "the abort", timeout=30, every=0.01)
        history = json.loads(fsm(state_dir, "history", str(job_id), "--json").stdout)
    finally:
        os.close(fd)
        err = finish(proc)
    latency = abort_latency(history)
    print(f"snapshot lock wait: abort landed {latency:.3f}s after the request")
    assert latency < 1.0
    assert history[-1]["from"] == SnapshotState.SNAPSHOTTING and history[-1]["error"] == "snapshot lock wait test"
    assert "wait for the guard given up" in err and proc.returncode == 1
    # Nothing was made while it waited: no device, no orphan.
    assert orphans_of(state_dir, job_id) == [] and query(state_dir, "SELECT count(*) FROM snapshots") == [(1,)]
