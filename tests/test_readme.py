"""The README's first command, run as written (plus a state dir of the test's own): it sets
up, serves the sample families from a local S3 server, and processes every one of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_process_image import REPO, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for apt-get, loop devices, mkfs and mount")


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without `sudo` and comments."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert block, "README.md must open with a bash block of commands"
    return [line.split("#")[0].strip().removeprefix("sudo ") for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_demo_and_the_test_command() -> None:
    assert readme_commands() == ["./scripts/demo", "./scripts/test"]
    assert "./scripts/test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_the_demo_processes_every_sample_family(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    try:
        done = subprocess.run([str(REPO / "scripts" / "demo"), "--state-dir", str(state), "--scale-mb", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        listed = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state), "fsm", "list", "--json"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        jobs = json.loads(listed.stdout)
        assert [job["state"] for job in jobs] == ["complete"] * 4, jobs
        assert re.search(r"Summary\s+cleaned=0 failed=0 orphaned=0", done.stdout + done.stderr)
    finally:
        teardown(state)
