"""Peak memory and wall time of `process-image` on one large layer, for growing layer sizes.

    sudo .venv/bin/python -m bench.process_image [--sizes-mb 50,200,800]

For each size: the node family's 4th layer (its largest) built at that scale by demo.samples,
uploaded to a local SeaweedFS, then `process-image --s3-key` run as a child process in a
fresh state dir; prints the layer size, wall seconds, MB/s and the child's peak RSS
(ru_maxrss from wait4). Streaming means the peak RSS must not grow with the layer.
Then the same command again on the complete image ("again s": nothing to download or
unpack), beside the start-up floor of the CLI itself (`--help`, printed once).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo.s3server import start_s3_server
from demo.samples import family_layers, write_layer
from devices.base import PoolConfig
from devices.blockfile import BlockfilePool
from images.source import make_s3_client

REPO = Path(__file__).resolve().parents[1]


def run_child(argv: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS in KiB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="50,200,800", help="family scales in MB (the layer is ~40%% of it)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-process-"))
    _, floor, _ = run_child([sys.executable, "-m", "cli", "--help"])
    print(f"CLI start-up (--help): {floor:.2f} s")
    print(f"{'layer MB':>9} {'wall s':>8} {'MB/s':>7} {'peak RSS MB':>12} {'again s':>8}")
    with start_s3_server(work / "s3") as server:
        client = make_s3_client(server.endpoint_url, anonymous=True)
        client.create_bucket(Bucket="bench")
        for scale in [float(s) for s in args.sizes_mb.split(",")]:
            layer = write_layer(family_layers("node", scale)[3], work / f"layer-{scale:g}.tar")
            key = f"bench/{layer.name}"
            with open(layer, "rb") as body:
                client.put_object(Bucket="bench", Key=key, Body=body)
            state = work / f"state-{scale:g}"
            argv = [sys.executable, "-m", "cli", "--quiet", "--state-dir", str(state), "process-image", "--s3-key", key,
                    "--bucket", "bench", "--endpoint-url", server.endpoint_url, "--backend", "blockfile",
                    "--device-size", f"{max(256, int(scale * 2))}M"]
            code, wall, peak_kib = run_child(argv)
            again_code, again, _ = run_child(argv)
            size_mb = layer.stat().st_size / 1e6
            print(f"{size_mb:>9.1f} {wall:>8.2f} {size_mb / wall:>7.1f} {peak_kib / 1024:>12.1f} {again:>8.2f}"
                  + ("" if code == again_code == 0 else f"  (exit {code}, {again_code})"))
            pool = BlockfilePool(PoolConfig(directory=str(state)))
            pool.teardown_pool()


if __name__ == "__main__":
    main()
