"""The daemon on real parts: a real subprocess on a unix socket, SeaweedFS over HTTP, real
SQLite, loop devices, mkfs and mounts (blockfile backend), Prometheus over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.protocol import DaemonNotRunning, request, socket_path
from tests.conftest import SampleBucket
from tests.test_process_image import teardown

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
DEVICE_SIZE = "64M"
JOBS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manager(state_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


class DaemonProcess:
    """`python -m cli daemon` as a real child. Popen, not run_command: it is long-running and
    the test signals it; the fixture kills it if a test fails half-way."""

    def __init__(self, state_dir: Path, metrics_port: int, log_path: Path) -> None:
        self.state_dir, self.metrics_port, self.log_path = state_dir, metrics_port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "--state-dir", str(self.state_dir), "daemon", "--metrics-port",
             str(self.metrics_port), "--backend", "blockfile", "--device-size", DEVICE_SIZE, "--health-interval", "2"],
            cwd=REPO, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                request(self.state_dir, {"op": "status"}, timeout=5)
                return
            except DaemonNotRunning:
                time.sleep(0.2)
        raise AssertionError("daemon did not answer within 60s:\n" + self.log())

    def wait(self, timeout: float = 150) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    directory.mkdir()
    yield directory
    teardown(directory)


@pytest.fixture
def daemon(state_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(state_dir, free_port(), tmp_path / "daemon.log")
    try:
        yield process
    finally:
        process.kill()


def small_layer(name: str) -> bytes:
    """A tiny single-layer image of our own: a few files whose content names the layer."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, body in ((f"srv/{name}/README", f"layer {name}\n".encode()), ("etc/hostname", name.encode())):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(body), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def distinct_keys(bucket: SampleBucket, s3_client: Any, count: int) -> list[str]:
    """`count` single-layer images with distinct contents: the sample objects whose bytes
    differ (families share their base layers), topped up with small objects of our own.
    Identical contents are avoided on purpose: see the report on concurrent identical chains."""
    seen: set[str] = set()
    keys: list[str] = []
    for family, paths in sorted(bucket.layers.items()):
        for path in paths:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                keys.append(f"images/{family}/{path.name}")
    keys = keys[:count]
    for n in range(count - len(keys)):
        key = f"daemon-test/extra-{n}.tar"
        s3_client.put_object(Bucket=bucket.name, Key=key, Body=small_layer(f"extra-{n}"))
        keys.append(key)
    return keys


def scrape(port: int) -> tuple[dict[str, list[Any]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    started = time.monotonic()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    elapsed = time.monotonic() - started
    return {family.name: family.samples for family in text_string_to_metric_families(body)}, elapsed


def scrape_until(port: int, ready: Callable[[dict[str, list[Any]]], bool],
                 timeout: float = 60) -> tuple[dict[str, list[Any]], float]:
    """Scrape until `ready(metrics)` holds (a sample not there yet counts as not ready);
    the last scrape when the deadline passes, for the assertions to say what is missing."""
    deadline = time.monotonic() + timeout
    while True:
        metrics, seconds = scrape(port)
        try:
            if ready(metrics):
                return metrics, seconds
        except (AssertionError, KeyError):
            pass
        if time.monotonic() > deadline:
            return metrics, seconds
        time.sleep(0.2)


def sample_value(metrics: dict[str, list[Any]], family: str, sample: str | None = None, **labels: str) -> float:
    for s in metrics[family]:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {family}{labels} in {metrics.get(family)}")


def job_states(state_dir: Path) -> dict[str, int]:
    with sqlite3.connect(state_dir / "images.db", timeout=10) as db:
        return dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())


def overlapped(log_lines: list[str], state: str) -> bool:
    """Whether, by the order of the transition log lines, one job was in `state` while
    another job was in the middle of its own steps (neither queued nor finished)."""
    current: dict[str, str] = {}
    for line in log_lines:
        job = re.search(r"\bjob_id=(\d+)", line)
        moved = re.search(r"\bto_state=(\w+)", line)
        if not (job and moved):
            continue
        current[job.group(1)] = moved.group(1)
        active = {j for j, s in current.items() if s not in ("complete", "aborted")}
        if any(s == state for j, s in current.items() if j in active) and len(active) >= 2:
            return True
    return False


EARLY_STATES = ("downloading", "verifying", "creating_device", "making_fs", "unpacking")


def job_history(state_dir: Path, job_id: int) -> list[tuple[int, str | None, str]]:
    """(seq, from_state, to_state) of every transition of the job, in order."""
    with sqlite3.connect(state_dir / "images.db") as db:
        return db.execute("SELECT seq, from_state, to_state FROM job_events WHERE job_id = ? ORDER BY seq",
                          (job_id,)).fetchall()


@needs_root
@pytest.mark.slow
def test_twenty_jobs_survive_sigterm_and_finish_after_restart(state_dir: Path, daemon: DaemonProcess,
                                                              sample_bucket: SampleBucket, s3_client: Any) -> None:
    keys = distinct_keys(sample_bucket, s3_client, JOBS)
    assert len(set(keys)) == JOBS
    daemon.start()
    sock = socket_path(state_dir)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    started = time.monotonic()
    request_ids = []
    for key in keys:
        reply = request(state_dir, {"op": "process-image", "s3_key": key, "bucket": sample_bucket.name,
                                    "endpoint_url": sample_bucket.endpoint_url, "device_size": DEVICE_SIZE})
        assert reply["state"] == "queued" and reply["job_id"] is None
        request_ids.append(reply["id"])
    assert request_ids == list(range(1, JOBS + 1))
    submit_seconds = time.monotonic() - started

    # The CLI's process-image is refused while the daemon holds the manager lock.
    refused = manager(state_dir, "process-image", "--s3-key", keys[0], "--bucket", sample_bucket.name,
                      "--endpoint-url", sample_bucket.endpoint_url, "--backend", "blockfile")
    assert refused.returncode == 1
    assert f"pid {daemon.proc.pid}, command daemon" in refused.stderr, refused.stderr

    # Let a few finish, then SIGTERM while another is in the middle of its steps (not at its
    # last one, which would simply finish), so it must stop at its next safe point.
    deadline = time.monotonic() + 300
    while True:
        states = job_states(state_dir)
        if states.get("complete", 0) >= 2 and any(states.get(s) for s in EARLY_STATES):
            break
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.01)
    daemon.proc.send_signal(signal.SIGTERM)
    stop_started = time.monotonic()
    assert daemon.wait() == 0, daemon.log()
    stop_seconds = time.monotonic() - stop_started

    states = job_states(state_dir)
    assert "aborted" not in states, states
    assert states.get("complete", 0) < JOBS, states
    assert not sock.exists()
    assert not (state_dir / "fsm" / "flyio-manager.lock").exists()
    # At least one job was in flight when SIGTERM landed and stopped at a safe point
    # (fsm/runner.py logs it with the job id), left unfinished with its history so far.
    stopped = {int(m) for m in re.findall(r"job stopped at a safe point.*?job_id=(\d+)", daemon.log_path.read_text())}
    assert stopped, daemon.log()
    seq_before = {job_id: max([seq for seq, _, _ in job_history(state_dir, job_id)], default=0) for job_id in stopped}
    with sqlite3.connect(state_dir / "images.db") as db:
        for job_id in stopped:
            (state,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            assert state not in ("complete", "aborted"), (job_id, state)

    daemon.start()
    deadline = time.monotonic() + 600
    while True:
        status = request(state_dir, {"op": "status"})
        if status["requests"].get("done", 0) == JOBS:
            break
        assert status["requests"].get("failed", 0) == 0, (status, daemon.log())
        assert time.monotonic() < deadline, (status, daemon.log())
        time.sleep(0.5)
    wall_seconds = time.monotonic() - started
    states = job_states(state_dir)
    assert states == {"complete": JOBS}, states
    # ... and after the restart each stopped job went on from there to complete.
    for job_id in stopped:
        after = [event for event in job_history(state_dir, job_id) if event[0] > seq_before[job_id]]
        assert after and after[-1][2] == "complete", (job_id, job_history(state_dir, job_id))
    one = request(state_dir, {"op": "job", "id": request_ids[-1]})
    assert one["job_state"] == "complete" and one["final"] is True
    # Device operations ran one at a time while other jobs' downloads went on beside them.
    log_lines = daemon.log_path.read_text().splitlines()
    guard_events = [m.group(1) for line in log_lines
                    if (m := re.search(r"\boperation (started|finished|failed)\b", line)) and "operation-guard" in line]
    ends = ["started" if event == "started" else "ended" for event in guard_events]
    assert ends and ends == ["started", "ended"] * (len(ends) // 2), guard_events[:40]
    assert overlapped(log_lines, "downloading"), "no download ran beside another job's steps"
    assert "snapshot_device_id" in json.loads(one["context"])

    # Housekeeping (every 2 s) observes the transitions since the restart: poll for it.
    metrics, scrape_seconds = scrape_until(daemon.metrics_port, lambda m: (
        sample_value(m, "flyio_jobs", state="complete") == JOBS
        and sample_value(m, "flyio_transition_duration_seconds", "flyio_transition_duration_seconds_count",
                         from_state="snapshotting", to_state="complete") >= 1))
    assert sample_value(metrics, "flyio_jobs", state="complete") == JOBS
    assert sample_value(metrics, "flyio_jobs", state="aborted") == 0
    assert sample_value(metrics, "flyio_orphaned_devices") == 0
    assert sample_value(metrics, "flyio_pool_exists") == 1
    assert sample_value(metrics, "flyio_pool_data_used_ratio") > 0
    assert sample_value(metrics, "flyio_transition_duration_seconds", "flyio_transition_duration_seconds_count",
                        from_state="snapshotting", to_state="complete") >= 1
    assert sample_value(metrics, "flyio_health_checks", "flyio_health_checks_total") >= 1
    assert {s.labels["check"] for s in metrics["flyio_health_check_passed"]} == {
        "dstate", "pool", "kernel_log", "memory_pressure", "io_wait"}

    # `shutdown` stops it too, and says so.
    done = manager(state_dir, "shutdown")
    assert done.returncode == 0, done.stderr
    assert f"daemon pid {daemon.proc.pid} stopped" in done.stdout
    assert daemon.wait() == 0
    assert not sock.exists()
    print(f"\nMEASURED jobs={JOBS} submit={submit_seconds:.2f}s wall={wall_seconds:.1f}s "
          f"sigterm_stop={stop_seconds:.1f}s scrape={scrape_seconds * 1000:.1f}ms")


def test_shutdown_without_a_daemon_is_one_clear_line(tmp_path: Path) -> None:
    done = manager(tmp_path / "state", "shutdown")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no daemon is running"), done.stderr


def test_bad_requests_get_one_line_errors(state_dir: Path, daemon: DaemonProcess) -> None:
    """No root needed for this part? The daemon ensures the pool, so it does: skip without root."""
    if os.geteuid() != 0:
        pytest.skip("the daemon sets up the pool: needs root and loop devices")
    daemon.start()
    from safeguards.manager_lock import read_lock

    held = read_lock(state_dir / "fsm" / "flyio-manager.lock")
    assert held is not None and held.pid == daemon.proc.pid and held.command == "daemon"
    assert time.time() - held.timestamp < 10  # refreshed by housekeeping, never near the 5 min staleness
    for message, expected in (({"op": "nope"}, "unknown op"),
                              ({"op": "process-image"}, "exactly one of"),
                              ({"op": "process-image", "s3_key": "a", "image": "b"}, "exactly one of"),
                              ({"op": "job", "id": 999}, "request 999 not found")):
        with pytest.raises(Exception, match=expected):
            request(state_dir, message)
    # A line that is not JSON, on a raw connection.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(socket_path(state_dir)))
        raw.sendall(b"{not json\n")
        reply = json.loads(raw.makefile().readline())
    assert reply["ok"] is False and "not JSON" in reply["error"]
    second = manager(state_dir, "daemon", "--backend", "blockfile", "--metrics-port", "0")
    assert second.returncode == 1 and f"pid {daemon.proc.pid}, command daemon" in second.stderr
    assert manager(state_dir, "shutdown").returncode == 0
    assert daemon.wait() == 0


@needs_root
@pytest.mark.slow
def test_images_sharing_base_layers_run_at_once_and_all_complete(state_dir: Path, daemon: DaemonProcess,
                                                                 sample_bucket: SampleBucket) -> None:
    """golang, node and python share layers 1-3: with two workers, one job waits for the
    chain another is unpacking (ChainBusy, retried) and then reuses it, instead of aborting."""
    daemon.start()
    ids = [request(state_dir, {"op": "process-image", "image": family, "bucket": sample_bucket.name,
                               "endpoint_url": sample_bucket.endpoint_url, "device_size": DEVICE_SIZE})["id"]
           for family in ("golang", "node", "python")]
    deadline = time.monotonic() + 300
    while request(state_dir, {"op": "status"})["requests"].get("done", 0) < len(ids):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.5)
    assert job_states(state_dir) == {"complete": 3}, daemon.log()
    with sqlite3.connect(state_dir / "images.db") as db:
        reused = db.execute("SELECT count(*) FROM job_events WHERE event='layer_reused'").fetchone()[0]
        orphans = db.execute("SELECT count(*) FROM orphaned_devices").fetchone()[0]
    assert reused >= 6 and orphans == 0

    # `submit --wait` prints process-image's result line: for a new image, and for one done already.
    for args in (["--s3-key", "images/whiteout/3.tar"], ["--image", "node"]):
        done = manager(state_dir, "submit", *args, "--bucket", sample_bucket.name, "--endpoint-url",
                       sample_bucket.endpoint_url, "--device-size", DEVICE_SIZE, "--wait")
        assert done.returncode == 0, (done.stderr, daemon.log())
        result = dict(pair.split("=", 1) for pair in done.stdout.strip().splitlines()[-1].split())
        assert result["state"] == "complete" and result["snapshot"].startswith("thin-"), done.stdout
        assert result["snapshot_device"] and result["device"].startswith("thin-")
    node_job = request(state_dir, {"op": "job", "id": ids[1]})["job_id"]
    assert result["job_id"] == str(node_job) and result["image"] == "node"  # the job node already had
    # A VM's snapshot through the socket: the same job as `snapshot node --vm`, once per VM.
    snaps = [manager(state_dir, "submit", "--snapshot", "node", "--vm", "vm-d", "--wait") for _ in range(2)]
    for done in snaps:
        assert done.returncode == 0, (done.stderr, daemon.log())
    first, again = (dict(p.split("=", 1) for p in d.stdout.strip().splitlines()[-1].split()) for d in snaps)
    assert first["state"] == "complete" and first["vm"] == "vm-d" and first["snapshot"].startswith("thin-")
    assert again["snapshot"] == first["snapshot"] and again["job_id"] == first["job_id"]
    refused = manager(state_dir, "submit", "--snapshot", "no-such-image", "--vm", "vm-d")
    assert refused.returncode == 1 and refused.stderr.strip() == "error: image 'no-such-image' not found; `images` lists them"
    queued = manager(state_dir, "submit", "--image", "python", "--bucket", sample_bucket.name,
                     "--endpoint-url", sample_bucket.endpoint_url)
    # Snapshot requests take no request id (their job is the durable request): 5 before this one.
    assert queued.returncode == 0 and queued.stdout.strip() == "request=6 state=queued", queued.stdout
    snap = manager(state_dir, "submit", "--snapshot", "node", "--vm", "vm-e")
    assert snap.returncode == 0 and re.fullmatch(r"job=\d+ state=queued", snap.stdout.strip()), snap.stdout
    request(state_dir, {"op": "shutdown"})
    assert daemon.wait() == 0
