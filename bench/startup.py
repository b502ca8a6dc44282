"""Start-up and repeat-run times of whole commands, as an operator types them.

    sudo .venv/bin/python -m bench.startup [--runs 7] [--extra-jobs 1000]

Sets up a state dir the way a host has one: a local SeaweedFS serving a one-layer image and
a three-layer family (demo.samples, small), both processed once with the real CLI
(blockfile backend), and a single-layer file:// image; then `--extra-jobs` more job rows
(complete, each with a context like a real image job's), so the listings read a database
of that size. Then each command is run `--runs` times as a new process (the installed
console scripts, `subprocess` timed with perf_counter), the commands interleaved round by
round, and the median of each printed beside its target (issue 9). Repeat runs of a
complete image are the idempotent path: nothing is fetched but the HEAD (or the LIST and
HEADs of a family) that the image's identity needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.space import teardown
from demo.s3server import start_s3_server
from demo.samples import build_families, family_layers, upload_families, write_layer
from images.source import make_s3_client

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "bench-startup"


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one child process; a failing command stops the bench."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-1000:]}")
    return wall


def add_jobs(state: Path, count: int) -> None:
    """`count` complete image jobs beside the real ones, with a real job's context."""
    from cli.app import open_store
    from states.names import IMAGE_WORKFLOW

    store = open_store(state)
    context = json.loads(store.list_jobs()[0].context)
    for index in range(count):
        store.create_or_get(IMAGE_WORKFLOW, f"s3://{BUCKET}/images/extra-{index}/@{index:016x}", "complete", context)
    store.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--extra-jobs", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    state = work / "state"
    env = {**os.environ, "FLYIO_STATE_DIR": str(state), "FLYIO_BACKEND": "blockfile"}
    cli = [str(BIN / "flyio-image-manager"), "--quiet"]
    try:
        with start_s3_server(work / "s3") as server:
            client = make_s3_client(server.endpoint_url, anonymous=True)
            client.create_bucket(Bucket=BUCKET)
            build_families(work / "samples", 1.0, families=("node",))
            upload_families(client, BUCKET, work / "samples")
            single = write_layer(family_layers("golang", 1.0)[4], work / "single.tar")
            with open(single, "rb") as body:
                client.put_object(Bucket=BUCKET, Key="single/5.tar", Body=body)
            s3 = ["--bucket", BUCKET, "--endpoint-url", server.endpoint_url, "--device-size", "256M"]
            repeats = {
                "process-image again, --url file://": [*cli, "process-image", "--url", f"file://{single}",
                                                       "--device-size", "256M"],
                "process-image again, --s3-key (one HEAD)": [*cli, "process-image", "--s3-key", "single/5.tar", *s3],
                "process-image again, --image (LIST + HEADs)": [*cli, "process-image", "--image", "node", *s3],
            }
            for argv in repeats.values():
                timed(argv, env)  # the first run processes the image
            add_jobs(state, args.extra_jobs)
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "flyio-image-manager --help": [str(BIN / "flyio-image-manager"), "--help"],
                f"fsm list ({args.extra_jobs + 3} jobs)": [str(BIN / "fsm"), "list"],
                "images": [*cli, "images"],
                "snapshots": [*cli, "snapshots"],
                **repeats,
            }
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, argv in commands.items():
                    times[name].append(timed(argv, env))
            print(f"median of {args.runs} whole-process runs each (load {os.getloadavg()[0]:.1f}):")
            for name, values in times.items():
                print(f"  {name:<46} {statistics.median(values):6.3f} s   (min {min(values):.3f}, max {max(values):.3f})")
    finally:
        if state.exists():
            teardown(state, "blockfile")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
