"""The README's first command, run as written (plus a state dir of the test's own): it sets
up, serves the sample families from a local S3 server, and processes every one of them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_process_image import REPO, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for apt-get, loop devices, mkfs and mount")


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without comments."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert block, "README.md must open with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_the_demo_and_the_test_command() -> None:
    # As written, for root (where sudo may not exist) and for a user with sudo alike.
    assert readme_commands() == ["./scripts/demo", "./scripts/test"]
    assert "./scripts/test" in (REPO / ".ci" / "run").read_text()
    first_lines = (REPO / "README.md").read_text().split("```")[1]
    assert "as root, or a user with sudo" in first_lines


def run_as_nobody(script: str, path_prefix: str = "") -> subprocess.CompletedProcess[str]:
    """`script` of a world-readable copy of scripts/ run by the unprivileged user nobody."""
    return subprocess.run(["su", "nobody", "-s", "/bin/bash", "-c", f"PATH={path_prefix}$PATH {script} --scale-mb 2"],
                          capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def scripts_copy() -> Iterator[Path]:
    """scripts/ copied where nobody can reach it (pytest's tmp_path is root's alone)."""
    repo = Path(tempfile.mkdtemp(prefix="readme-scripts-"))
    subprocess.run(["cp", "-r", str(REPO / "scripts"), str(repo)], check=True)
    (repo / "bin").mkdir()
    subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
    yield repo
    shutil.rmtree(repo)


@pytest.mark.parametrize("script", ["demo", "test", "setup"])
def test_a_user_without_sudo_is_told_to_run_it_as_root(scripts_copy: Path, script: str) -> None:
    if subprocess.run(["bash", "-c", "command -v sudo"], capture_output=True).returncode == 0:
        pytest.skip("sudo is installed here: the no-sudo path needs a box without it")
    done = run_as_nobody(str(scripts_copy / "scripts" / script))
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {script} needs root: run it as root, or install sudo"


@pytest.mark.parametrize("script", ["demo", "test"])
def test_a_user_with_sudo_re_runs_it_through_sudo(scripts_copy: Path, script: str) -> None:
    """A sudo that only says how it was called stands in for the real one: the script
    hands itself, by absolute path and with its arguments, to sudo, and does nothing else."""
    fake = scripts_copy / "bin"
    (fake / "sudo").write_text('#!/bin/sh\necho "sudo $*"\n')
    (fake / "sudo").chmod(0o755)
    done = run_as_nobody(str(scripts_copy / "scripts" / script), f"{fake}:")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"sudo --preserve-env=FLYIO_STATE_DIR,FLYIO_BACKEND,AWS_ENDPOINT_URL "
                                   f"{scripts_copy / 'scripts' / script} --scale-mb 2")


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
        assert [job["state"] for job in jobs] == ["complete"] * 5, jobs  # four families, one registry pull
        assert jobs[-1]["key"].startswith("oci://127.0.0.1:") and "/demo/golang-app:1@" in jobs[-1]["key"], jobs
        assert re.search(r'"Cmd": \[\s*"/app/hello.sh"\s*\]', done.stdout), done.stdout[-3000:]  # its config
        assert re.search(r"Summary\s+cleaned=0 failed=0 orphaned=0", done.stdout + done.stderr)
    finally:
        teardown(state)
