"""Host-side tests that boot a QEMU guest with a real device-mapper kernel (tests/vm/).

TCG emulation is slow, so guests are few and their work is small: each test boots one
guest for one focused scenario; everything that does not need dm-thin runs on the host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vm import AssetsUnavailable, ensure_assets, run_in_guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")


@pytest.fixture(scope="module")
def guest_ready() -> None:
    """Skip unless we are root and the guest's kernel/initramfs can be obtained."""
    if os.geteuid() != 0:
        pytest.skip("QEMU guest tests need root (9p passthrough, loop devices in the guest)")
    try:
        ensure_assets()
    except AssetsUnavailable as exc:
        pytest.skip(f"guest assets unobtainable: {exc}")


def test_guest_has_thin_pool_target(guest_ready: None, tmp_path: Path) -> None:
    """The guest boots, sees the host's tools, and its kernel offers dm-thin."""
    result = run_in_guest(["dmsetup", "targets"], share_dir=tmp_path, timeout=180)
    assert not result.timed_out, result.output[-2000:]
    assert result.returncode == 0, result.output[-2000:]
    targets = {line.split()[0] for line in result.output.splitlines() if " v" in line and line.split()}
    assert {"thin-pool", "thin"} <= targets, result.output[-2000:]


def test_guest_share_is_writable_and_persists(guest_ready: None, tmp_path: Path) -> None:
    """What the guest writes to the share is on the host afterwards; the rest of / is read-only."""
    marker = tmp_path / "from-guest.txt"
    script = f"echo written-in-guest > {marker} && ! touch /usr/flyio-should-fail 2>/dev/null"
    result = run_in_guest(["sh", "-c", script], share_dir=tmp_path, timeout=180)
    assert result.returncode == 0, result.output[-2000:]
    assert marker.read_text() == "written-in-guest\n"
