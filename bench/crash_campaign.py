"""The kill campaign at random points, for a person to run (CI runs every point twice:
tests/test_kill_campaign.py).

    sudo .venv/bin/python -m bench.crash_campaign [--kills 200] [--seed 1] [--round 50]

Starts a local SeaweedFS, then for each kill picks a kill point of tests/killpoints.py at
random (and which of its occurrences: the first, second or third layer's), runs a fresh
`process-image` of a small 3-layer image (or a new VM's `snapshot` job) on the blockfile
backend, SIGKILLs it there, and checks the next start (Campaign.check_after_kill). A
check that fails is counted as that trial's outcome and the campaign goes on. Every
`--round` kills the state directory is torn down and a new one started, so the number of
active loop devices stays bounded. Prints the table: kill point, times hit, outcome.
Exit status 1 when any trial failed its checks.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from demo.s3server import start_s3_server
from images.source import make_s3_client
from tests.killpoints import KILL_POINTS, Campaign, Kill, Trial, format_table, table
from tests.test_process_image import teardown


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.crash_campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200, help="how many trials (kills)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random choice of points")
    parser.add_argument("--round", type=int, default=50, help="kills per state directory")
    return parser.parse_args(argv)


def run_trial(campaign: Campaign, point: str, occurrence: int) -> Trial:
    """One trial; a failed check becomes the outcome instead of ending the campaign."""
    started = time.monotonic()
    campaign.last_kill = None
    try:
        return campaign.run(point, occurrence)
    except AssertionError as exc:
        first_line = (str(exc).strip().splitlines() or ["assertion failed"])[0][:200]
        kill = campaign.last_kill or Kill(point, occurrence, False, None, None)  # None: it failed before the kill
        trial = Trial(kill, f"FAILED: {first_line}", time.monotonic() - started)
        campaign.trials.append(trial)
        return trial


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rng = random.Random(args.seed)
    trials: list[Trial] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flyio-kills-") as tmp:
        work = Path(tmp)
        server = start_s3_server(work / "seaweedfs")
        try:
            client = make_s3_client(server.endpoint_url, anonymous=True)
            client.create_bucket(Bucket="kill-campaign")
            for first in range(0, args.kills, args.round):
                round_dir = work / f"round-{first // args.round}"
                campaign = Campaign(round_dir / "state", round_dir, client, "kill-campaign", server.endpoint_url,
                                    seed=f"bench-{args.seed}-{first}")
                try:
                    for n in range(first, min(first + args.round, args.kills)):
                        point = rng.choice(list(KILL_POINTS.values()))
                        occurrence = rng.randint(1, point.occurrences)
                        trial = run_trial(campaign, point.name, occurrence)
                        print(f"{n + 1:4d} {point.name} #{occurrence}: {trial.outcome} ({trial.seconds:.1f}s)",
                              flush=True)
                finally:
                    trials.extend(campaign.trials)
                    teardown(campaign.state_dir)
        finally:
            server.stop()
    wall = time.monotonic() - started
    failed = [t for t in trials if t.outcome.startswith("FAILED")]
    hit = sum(1 for t in trials if t.kill.hit)
    print()
    print(format_table(table(trials)))
    print(f"\nkills: {len(trials)}  landed at their point: {hit}  failed checks: {len(failed)}  "
          f"wall: {wall:.0f}s ({wall / max(1, len(trials)):.1f}s per kill)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
