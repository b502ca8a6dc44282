"""The kill campaign on the real workflows (tests/killpoints.py): `process-image` of a small
3-layer image and the per-VM `snapshot` job, each SIGKILLed at a named log event, then the
next start checked (fsm resume, one row per device, gc exactly the orphans, the snapshot's
tree, SQLite integrity, history). Blockfile backend: real loop devices, mkfs.ext4, mounts,
SeaweedFS over HTTP. bench/crash_campaign.py runs the same trials at random points."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.killpoints import KILL_POINTS, Campaign, format_table, table
from tests.test_process_image import teardown

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")]
KILLS_PER_POINT = 2
MIN_KILLS = 40


@pytest.fixture
def campaign(tmp_path: Path, s3_client: Any, make_bucket: Callable[..., str], s3_server: Any) -> Iterator[Campaign]:
    run = Campaign(tmp_path / "state", tmp_path, s3_client, make_bucket("kills"), s3_server.endpoint_url)
    yield run
    teardown(run.state_dir)


def schedule() -> list[tuple[str, int]]:
    """Every kill point twice: at its first occurrence and at its last (an upper layer's
    instance for the per-layer points), in the order of KILL_POINTS."""
    return [(name, 1 if kill == 0 else point.occurrences)
            for name, point in KILL_POINTS.items() for kill in range(KILLS_PER_POINT)]


def test_every_kill_point_twice_then_the_next_start_recovers(campaign: Campaign) -> None:
    """Each trial kills a fresh job at its point and checks the next start (Campaign.check_after_kill
    asserts inside every trial); here: every kill landed where it was aimed, every point at
    least twice, at least 40 kills, and some kills left orphans that gc then removed."""
    plan = schedule()
    assert len(plan) >= MIN_KILLS
    for name, occurrence in plan:
        trial = campaign.run(name, occurrence)
        assert trial.kill.hit, f"{name} #{occurrence} never appeared: the run finished first"
        assert KILL_POINTS[name].matches(trial.kill.event)
    rows = table(campaign.trials)
    print("\n" + format_table(rows))
    assert {name: hits for name, hits, _ in rows} == {name: KILLS_PER_POINT for name in KILL_POINTS}
    assert any("gc'd" in trial.outcome for trial in campaign.trials), "no kill left an orphan: gc was never tested"
