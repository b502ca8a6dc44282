"""process-image against the bare shell pipeline it replaces, on a family shaped like the
production golang image.

    sudo .venv/bin/python -m bench.pipeline [--scale 1.0] [--rounds 3]

--scale 1 is half production scale: 5 layers of 72, 25, 95, 122 and 131 MB of ~60 KB
incompressible files (demo.samples' builder). The family is served by a local SeaweedFS
(demo.s3server). Each round, alternating, in a fresh state:

* `process-image --image fam` (blockfile backend) as a child process (odd rounds first, even
  rounds second), then its per-step
  times from `fsm history --json` (summed per state left);
* the same work as one bash script: boto3 download_file of each layer, sha256sum, a 2 GB
  XFS reflink=1 pool file on a loop mount, truncate -s 4G, losetup, mkfs.ext4 -E
  nodiscard,lazy_itable_init=0,lazy_journal_init=0, mount, tar -xpf --numeric-owner
  --xattrs, sync -f, umount, cp --reflink for each upper layer and for the snapshot.

Prints each round, both medians, the ratio (process-image / shell) and the median step times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from demo.s3server import start_s3_server
from demo.samples import LayerSpec, _LayerBuilder, write_layer
from devices.base import PoolConfig
from devices.blockfile import BlockfilePool
from images.source import make_s3_client

REPO = Path(__file__).resolve().parents[1]
LAYER_MB = (72, 25, 95, 122, 131)  # production golang at half scale
FILE_BYTES = 60 * 1024
BUCKET = "bench-pipeline"

SHELL_PIPELINE = r"""
set -euo pipefail
work=$1; endpoint=$2; python=$3; shift 3
cd "$work"
"$python" - "$endpoint" "$@" <<'PY'
import sys
import boto3
from botocore import UNSIGNED
from botocore.config import Config
client = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                      config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
for key in sys.argv[2:]:
    client.download_file("bench-pipeline", key, key.rsplit("/", 1)[-1])
PY
sha256sum [0-9]*.tar > /dev/null
truncate -s 2G pool.img
mkfs.xfs -q -m reflink=1 pool.img
mkdir -p pool mnt
mount -o loop pool.img pool
previous=""
for n in $(ls [0-9]*.tar | sort -n); do
  image=pool/layer-${n%.tar}.img
  if [ -z "$previous" ]; then
    truncate -s 4G "$image"
  else
    cp --reflink=always "$previous" "$image"
  fi
  dev=$(losetup --find --show "$image")
  [ -z "$previous" ] && mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$dev"
  mount "$dev" mnt
  tar -xpf "$n" --numeric-owner --xattrs -C mnt
  sync -f mnt
  umount mnt
  losetup -d "$dev"
  previous=$image
done
cp --reflink=always "$previous" pool/snapshot.img
umount pool
"""


def golang_like_family(scale: float) -> list[LayerSpec]:
    """Five layers of ~60 KB incompressible files, LAYER_MB * scale megabytes each."""
    layers = []
    for number, megabytes in enumerate(LAYER_MB, start=1):
        builder = _LayerBuilder(f"fam-{number}", "bench")
        budget = max(FILE_BYTES, int(megabytes * scale * 1_000_000))
        for index in range(budget // FILE_BYTES):
            builder.file(f"usr/lib/fam{number}/d{index // 500:03d}/f{index:05d}", FILE_BYTES, compressible=0.0)
        layers.append(builder.build())
    return layers


def run_process_image(state: Path, endpoint: str) -> tuple[float, dict[str, float]]:
    """(wall seconds, milliseconds per state left) of one process-image in a fresh state."""
    cli = [sys.executable, "-m", "cli", "--quiet", "--state-dir", str(state)]
    started = time.perf_counter()
    subprocess.run([*cli, "process-image", "--image", "fam", "--bucket", BUCKET, "--endpoint-url", endpoint,
                    "--backend", "blockfile", "--device-size", "4G"], cwd=REPO, check=True, timeout=3600,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    listed = json.loads(subprocess.run([*cli, "fsm", "list", "--json"], cwd=REPO, check=True, capture_output=True,
                                       text=True, timeout=120).stdout)
    history = json.loads(subprocess.run([*cli, "fsm", "history", str(listed[0]["id"]), "--json"], cwd=REPO,
                                        check=True, capture_output=True, text=True, timeout=120).stdout)
    steps: dict[str, float] = defaultdict(float)
    for row in history:
        if row.get("kind") == "transition" and row.get("duration_ms") is not None:
            steps[row["from"] or "start"] += row["duration_ms"]
    BlockfilePool(PoolConfig(directory=str(state))).teardown_pool()
    shutil.rmtree(state)
    return wall, dict(steps)


def run_shell(work: Path, endpoint: str, keys: list[str]) -> float:
    work.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run(["bash", "-c", SHELL_PIPELINE, "bench", str(work), endpoint, sys.executable, *keys], cwd=REPO,
                   check=True, timeout=3600, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    shutil.rmtree(work)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1 = half production scale (72-131 MB layers)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        with start_s3_server(work / "s3") as server:
            client = make_s3_client(server.endpoint_url, anonymous=True)
            client.create_bucket(Bucket=BUCKET)
            keys = []
            for number, spec in enumerate(golang_like_family(args.scale), start=1):
                layer = write_layer(spec, work / f"{number}.tar")
                keys.append(f"images/fam/{number}.tar")
                with open(layer, "rb") as body:
                    client.put_object(Bucket=BUCKET, Key=keys[-1], Body=body)
                layer.unlink()
            total_mb = sum(o["Size"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]) / 1e6
            print(f"family: {len(keys)} layers, {total_mb:.1f} MB (scale {args.scale:g}), {args.rounds} rounds")
            ours, shell, steps = [], [], defaultdict(list)
            for round_ in range(1, args.rounds + 1):
                if round_ % 2 == 0:  # alternate which goes first: neither always meets a warm cache
                    shell.append(run_shell(work / f"shell-{round_}", server.endpoint_url, keys))
                wall, step_ms = run_process_image(work / f"state-{round_}", server.endpoint_url)
                ours.append(wall)
                for name, ms in step_ms.items():
                    steps[name].append(ms)
                if round_ % 2 == 1:
                    shell.append(run_shell(work / f"shell-{round_}", server.endpoint_url, keys))
                print(f"round {round_}: process-image {ours[-1]:.2f} s, shell pipeline {shell[-1]:.2f} s")
            ours_median, shell_median = statistics.median(ours), statistics.median(shell)
            print(f"median process-image: {ours_median:.2f} s")
            print(f"median shell pipeline: {shell_median:.2f} s")
            print(f"ratio process-image / shell: {ours_median / shell_median:.2f}")
            print("process-image steps (median ms, summed per state left):")
            for name, values in steps.items():
                print(f"  {name:<16} {statistics.median(values):>9.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
