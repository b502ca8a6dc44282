"""How long image eviction takes, and pool usage before and after.

    sudo python3 -m bench.eviction [--images 20] [--image-mb 8] [--backend blockfile] [--pool-size 1G]

Processes `--images` distinct single-layer images of `--image-mb` incompressible bytes
into a fresh pool with the real CLI (the usage policy's watermarks raised for the fill,
so nothing is evicted early), then times `gc --images --all --force`: every image goes,
through the device ledger, inside the Operation Guard. Prints one JSON object: images,
seconds (the command's wall time and the eviction's own), usage before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.space import REPO, teardown

MIB = 1024**2


def layer(seed: str, size: int) -> bytes:
    rng = random.Random(seed)
    body = b"".join(rng.randbytes(min(MIB, size - offset)) for offset in range(0, size, MIB))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(f"srv/{seed}.bin")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def cli(state_dir: Path, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLYIO_BACKEND": backend, "FLYIO_POOL_HIGH_PERCENT": "99", "FLYIO_POOL_LOW_PERCENT": "98"}
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr[-2000:]}")
    return done


def measure(work: Path, images: int, image_mb: int, backend: str, pool_size: str) -> dict[str, Any]:
    from demo.s3server import start_s3_server
    from images.source import make_s3_client

    state = work / "state"
    cli(state, backend, "setup-pool", "--data-size", pool_size)
    try:
        with start_s3_server(work / "s3", timeout=240) as server:
            client = make_s3_client(server.endpoint_url, anonymous=True)
            client.create_bucket(Bucket="evict")
            for n in range(images):
                client.put_object(Bucket="evict", Key=f"images/img-{n}/1.tar", Body=layer(f"img-{n}", image_mb * MIB))
                cli(state, backend, "--quiet", "process-image", "--image", f"img-{n}", "--bucket", "evict",
                    "--endpoint-url", server.endpoint_url, "--device-size", "64M")
        started = time.monotonic()
        done = cli(state, backend, "gc", "--images", "--all", "--force")
        wall = time.monotonic() - started
        summary = dict(re.findall(r"(\w+)=(\S+)", done.stdout.strip().splitlines()[-1]))
        finished = re.search(r"image eviction finished.*seconds=([\d.]+)", done.stdout)
        return {"backend": backend, "images": images, "image_mb": image_mb, "pool_size": pool_size,
                "evicted": int(summary["evicted"]), "command_seconds": round(wall, 2),
                "eviction_seconds": float(finished.group(1)) if finished else None,
                "data_before": summary["data_before"], "data_after": summary["data_after"]}
    finally:
        teardown(state, backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--image-mb", type=int, default=8)
    parser.add_argument("--backend", default="blockfile", choices=("blockfile", "devicemapper"))
    parser.add_argument("--pool-size", default="1G")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        print(json.dumps(measure(Path(work), args.images, args.image_mb, args.backend, args.pool_size), indent=2))


if __name__ == "__main__":
    main()
