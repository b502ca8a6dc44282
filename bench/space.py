"""Pool bytes used per byte of unique layer content, on the production-shaped families.

    sudo python3 -m bench.space [--scale-mb 650] [--backend blockfile] [--pool-size 2G]
                                [--data-block-size 1M] [--metadata-size 1M]   (devicemapper)

Builds golang, node and python (demo.samples: layers 1-3 shared by all) at `--scale-mb`
(roughly one family's size; 650 gives the production replica's 1.4 GB of unique
content), serves them from a local SeaweedFS, and processes each into a fresh pool with
the real CLI. Unique content is the sum of the distinct layer tars' sizes. Used is the
pool's data usage after all three, minus the empty pool's. Then one tiny single-file
image (one 4 KB file) measures the fixed cost of a distinct base image (its device's
mkfs, its first snapshot and that snapshot's journal). Prints one JSON object.

FLYIO_LAYER_BLOCK_SIZE=2K (or 1K) measures layers made with smaller ext4 blocks.
`--backend devicemapper` needs a device-mapper kernel (run it inside the QEMU guest).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("golang", "node", "python")
MIB = 1024**2


def cli(state_dir: Path, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "--quiet", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "FLYIO_BACKEND": backend})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr[-2000:]}")
    return done


def used_bytes(state_dir: Path, backend: str) -> int:
    from devices.select import open_pool

    status = open_pool(state_dir, backend).get_pool_status()
    return status.used_data_blocks * status.data_block_bytes


def metadata_used_bytes(state_dir: Path, backend: str) -> int:
    """dm-thin's used metadata blocks in bytes (on blockfile metadata counts inodes: not bytes)."""
    from devices.devicemapper import METADATA_BLOCK
    from devices.select import open_pool

    return open_pool(state_dir, backend).get_pool_status().used_metadata_blocks * METADATA_BLOCK


def unique_content(layers: dict[str, list[Path]]) -> int:
    digests = {hashlib.sha256(path.read_bytes()).hexdigest(): path.stat().st_size
               for paths in layers.values() for path in paths}
    return sum(digests.values())


def tiny_layer() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("etc/tiny")
        info.size = 4096
        tar.addfile(info, io.BytesIO(b"t" * 4096))
    return buffer.getvalue()


def teardown(state_dir: Path, backend: str) -> None:
    from devices.select import open_pool

    pool: Any = open_pool(state_dir, backend)
    for device in pool.list_devices():
        if device.active:
            pool.deactivate(device.device_id)
    pool.teardown_pool()


def measure(work: Path, scale_mb: float, backend: str, pool_size: str, device_size: str,
            data_block_size: str = "1M", metadata_size: str = "1M") -> dict[str, Any]:
    from demo.s3server import start_s3_server
    from demo.samples import build_families, upload_families
    from images.source import make_s3_client

    layers = build_families(work / "samples", scale_mb, families=FAMILIES)
    content = unique_content(layers)
    state = work / "state"
    cli(state, backend, "setup-pool", "--data-size", pool_size, "--data-block-size", data_block_size,
        "--metadata-size", metadata_size)
    try:
        empty = used_bytes(state, backend)
        result: dict[str, Any] = {"backend": backend, "scale_mb": scale_mb, "pool_size": pool_size,
                                  "device_size": device_size, "data_block_size": data_block_size,
                                  "metadata_size": metadata_size,
                                  "layer_block_size": os.environ.get("FLYIO_LAYER_BLOCK_SIZE", "4K (mke2fs)"),
                                  "unique_content_bytes": content,
                                  "empty_pool_used_bytes": empty, "families": {}}
        with start_s3_server(work / "s3", timeout=240) as server:
            client = make_s3_client(server.endpoint_url, anonymous=True)
            client.create_bucket(Bucket="space")
            upload_families(client, "space", work / "samples")
            client.put_object(Bucket="space", Key="images/tiny/1.tar", Body=tiny_layer())
            previous = empty
            for family in FAMILIES:
                started = time.monotonic()
                cli(state, backend, "process-image", "--image", family, "--bucket", "space", "--endpoint-url",
                    server.endpoint_url, "--device-size", device_size)
                now = used_bytes(state, backend)
                result["families"][family] = {"added_bytes": now - previous, "seconds": round(time.monotonic() - started, 1),
                                              "metadata_used_bytes": metadata_used_bytes(state, backend)}
                previous = now
            used = previous - empty
            cli(state, backend, "process-image", "--image", "tiny", "--bucket", "space", "--endpoint-url",
                server.endpoint_url, "--device-size", device_size)
            result["fixed_cost_per_base_image_bytes"] = used_bytes(state, backend) - previous - 4096
        from devices.select import open_pool

        status = open_pool(state, backend).get_pool_status()
        result.update(used_bytes=used, ratio=round(used / content, 3),
                      metadata_used_fraction=round(status.metadata_used_fraction, 3),
                      pool_used_fraction_after_families=round((used + empty) / (status.total_data_blocks *
                                                                                 status.data_block_bytes), 3))
        return result
    finally:
        teardown(state, backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale-mb", type=float, default=650.0)
    parser.add_argument("--backend", default="blockfile", choices=("blockfile", "devicemapper"))
    parser.add_argument("--pool-size", default="2G")
    parser.add_argument("--device-size", default="4G")
    parser.add_argument("--data-block-size", default="1M", help="devicemapper: the new pool's data block size")
    parser.add_argument("--metadata-size", default="1M", help="the new pool's metadata size")
    parser.add_argument("--work-dir", default=None, help="Where samples and the pool go (default: a temp dir).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        result = measure(Path(work), args.scale_mb, args.backend, args.pool_size, args.device_size,
                         args.data_block_size, args.metadata_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
