"""What a guest test does when the guest cannot be had: outside CI it skips with the
reason; under CI (`CI=true`) it fails with it, so the dm-thin and power-cut tests cannot
vanish from a green build because the kernel could not be fetched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from tests.vm.harness import REPO, AssetsUnavailable, VmAssets, ensure_assets

GUEST_SUITE = "tests/guest/"


def in_ci() -> bool:
    """True when the environment says CI (`CI=true`, as GitHub Actions and most runners set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with `reason`; under CI, fail with it instead."""
    if in_ci():
        pytest.fail(f"CI=true: a guest test cannot run, and CI does not skip it: {reason}", pytrace=False)
    pytest.skip(reason)


def require_guest() -> VmAssets:
    """The guest's kernel and initramfs, or skip_or_fail naming what is missing."""
    if os.geteuid() != 0:
        skip_or_fail("QEMU guest tests need root (9p passthrough of /, loop devices in the guest, apt-get)")
    try:
        return ensure_assets()
    except AssetsUnavailable as exc:
        missing = str(exc)  # failed outside the handler: the report shows the reason, not a chain
    skip_or_fail(f"guest assets unobtainable (the Debian kernel package, its modules, QEMU or busybox): {missing}")


def guest_suite_size(suite: str = GUEST_SUITE) -> int:
    """How many tests pytest collects in `suite` (collected on the host: nothing runs)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", suite],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    found = re.search(r"^(\d+) tests? collected", done.stdout, re.MULTILINE)
    assert done.returncode == 0 and found, done.stdout[-3000:] + done.stderr[-3000:]
    return int(found.group(1))
