"""What an operator sees: JSON logs, --quiet, and progress bars only on a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SampleBucket
from tests.test_process_image import REPO, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    teardown(directory)


def command(state_dir: Path, bucket: SampleBucket, key: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "process-image", "--state-dir", str(state_dir), "--bucket", bucket.name,
            "--endpoint-url", bucket.endpoint_url, "--backend", "blockfile", "--device-size", "64M",
            "--s3-key", key, *extra]


def test_json_logs_are_one_object_per_line_with_the_guides_messages(state_dir: Path, sample_bucket: SampleBucket) -> None:
    done = subprocess.run(command(state_dir, sample_bucket, "images/node/5.tar", "--log-format", "json"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.strip().splitlines()]
    messages = [e["msg"] for e in events]
    assert {"level": "info", "msg": "safeguards initialized"}.items() <= events[messages.index("safeguards initialized")].items()
    creating = events[messages.index("pool does not exist, attempting to create")]
    assert creating["component"] == "pool-manager"
    assert "thin pool created successfully" in messages
    assert all({"level", "msg", "time"} <= e.keys() for e in events)


def test_quiet_prints_only_the_result(state_dir: Path, sample_bucket: SampleBucket) -> None:
    done = subprocess.run(command(state_dir, sample_bucket, "images/python/5.tar", "--quiet"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    assert done.stdout.startswith("job_id=") and "state=complete" in done.stdout


def run_on_a_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a pseudo-terminal; return its exit code and screen bytes."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.environ["COLUMNS"] = "120"
        os.execv(argv[0], argv)
    output = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_progress_bars_on_a_terminal_and_none_with_quiet(state_dir: Path, sample_bucket: SampleBucket) -> None:
    code, screen = run_on_a_terminal(command(state_dir, sample_bucket, "images/golang/4.tar"))
    assert code == 0, screen[-2000:]
    assert "download 4.tar" in screen and "unpack layer 1" in screen
    assert "━" in screen  # rich's bar

    code, screen = run_on_a_terminal(command(state_dir, sample_bucket, "images/golang/5.tar", "--quiet"))
    assert code == 0, screen[-2000:]
    assert "download" not in screen and "━" not in screen
    assert "state=complete" in screen
