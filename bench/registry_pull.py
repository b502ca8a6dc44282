"""The golang sample family pulled from a local OCI registry: `process-image --ref` against
`skopeo copy` plus GNU tar doing the same work, as a ratio of medians; beside it the same
family from S3 (what the registry path costs over the S3 one); and the repeat of a complete
image (one manifest request).

    sudo .venv/bin/python -m bench.registry_pull [--scale-mb 64] [--rounds 5] [--compression gzip]

Set-up: demo.samples' golang family (five layers) at `--scale-mb`, each layer compressed
(gzip by default, as `docker push` does; zstd with --compression zstd), written as an OCI
layout and pushed with `skopeo copy` to Debian's docker-registry on 127.0.0.1.

Each round, rotating which goes first:
* ours: `flyio-image-manager process-image --ref REF --plain-http` into a fresh state dir
  (blockfile backend) whose pool `setup-pool` made first, untimed (a host makes its pool
  once): resolve, download with digest and tar checks, a device per layer, mkfs.ext4,
  unpack each layer, a VM snapshot.
* s3: the same with `--image golang` from a local SeaweedFS holding the same layers
  (the same blobs: the registry's gzip ones, so both decompress the same bytes).
* baseline: `skopeo copy docker://REF oci:DIR` (downloads, checks digests), then an ext4
  file made with mkfs.ext4, loop-mounted, every layer extracted into it in order with GNU
  tar (`tar -xf`, which detects the compression), unmounted.
Both start from an empty local state: nothing cached. The ratio is ours / baseline (below
1 means faster). Then `process-image` of the complete image again, `--rounds` times: the
median beside the 0.3 s target.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo.registry import ImageSpec, make_layer, push_layout, start_registry, write_oci_layout
from demo.s3server import start_s3_server
from demo.samples import family_layers, write_layer
from support.proc import run_command

REPO = Path(__file__).resolve().parents[1]
REPEAT_TARGET_S = 0.3
BUCKET = "bench-registry"


def manager(state: Path, *args: str) -> float:
    """Wall seconds of one `flyio-image-manager` command (blockfile backend)."""
    started = time.perf_counter()
    run_command([sys.executable, "-m", "cli", "--quiet", "--state-dir", str(state), *args, "--backend", "blockfile"],
                timeout=1800)
    return time.perf_counter() - started


def ours(ref: str, state: Path, device_size: str) -> float:
    return manager(state, "process-image", "--ref", ref, "--plain-http", "--device-size", device_size)


def from_s3(endpoint: str, state: Path, device_size: str) -> float:
    return manager(state, "process-image", "--image", "golang", "--bucket", BUCKET, "--endpoint-url", endpoint,
                   "--device-size", device_size)


def baseline(ref: str, work: Path, device_size: str) -> float:
    layout, image, mnt = work / "oci", work / "fs.img", work / "mnt"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run_command(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:latest"], timeout=1800)
    run_command(["truncate", "-s", device_size, str(image)], timeout=60)
    run_command(["mkfs.ext4", "-q", "-F", str(image)], timeout=600)
    mnt.mkdir(parents=True, exist_ok=True)
    run_command(["mount", "-o", "loop", str(image), str(mnt)], timeout=60)
    try:
        import json

        index = json.loads((layout / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
        for layer in manifest["layers"]:
            blob = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
            run_command(["tar", "-xf", str(blob), "-C", str(mnt)], timeout=1800)
    finally:
        run_command(["umount", str(mnt)], timeout=120)
    return time.perf_counter() - started


def release(state: Path) -> None:
    """The loop devices and mounts of a bench state dir (the files go with the dir)."""
    from bench.space import teardown

    if state.exists():
        teardown(state, "blockfile")
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale-mb", type=float, default=64.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compression", choices=("gzip", "zstd"), default="gzip")
    parser.add_argument("--device-size", default="2G")
    parser.add_argument("--pool-size", default="4G")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    tars = [write_layer(spec, work / "tars" / f"{n}.tar")
            for n, spec in enumerate(family_layers("golang", args.scale_mb), start=1)]
    layers = tuple(make_layer(path.read_bytes(), f"tar+{args.compression}") for path in tars)
    tar_mb = sum(path.stat().st_size for path in tars) / 1e6
    blob_mb = sum(len(layer.blob) for layer in layers) / 1e6
    print(f"golang family at {args.scale_mb:g} MB scale: 5 layers, {tar_mb:.1f} MB of tar, {blob_mb:.1f} MB "
          f"{args.compression} blobs; {args.rounds} rounds, alternating")
    times: dict[str, list[float]] = {"ours": [], "s3": [], "baseline": []}
    with start_registry(work / "registry") as registry, start_s3_server(work / "s3") as s3:
        from images.source import make_s3_client

        client = make_s3_client(s3.endpoint_url, anonymous=True)
        client.create_bucket(Bucket=BUCKET)
        for n, layer in enumerate(layers, start=1):
            client.put_object(Bucket=BUCKET, Key=f"images/golang/{n}.tar", Body=layer.blob)
        ref = f"{registry.host}/bench/golang:1"
        push_layout(write_oci_layout(work / "layout", [ImageSpec(layers, {"Cmd": ["go"]})]), ref, registry)
        kinds = list(times)
        for round_no in range(args.rounds):
            for which in kinds[round_no % 3:] + kinds[:round_no % 3]:
                scratch = work / f"{which}-{round_no}"
                if which == "baseline":
                    times[which].append(baseline(ref, scratch, args.device_size))
                    shutil.rmtree(scratch, ignore_errors=True)
                    continue
                manager(scratch, "setup-pool", "--data-size", args.pool_size)
                run = ours if which == "ours" else from_s3
                times[which].append(run(ref if which == "ours" else s3.endpoint_url, scratch, args.device_size))
                if which == "s3" or round_no < args.rounds - 1:
                    release(scratch)
            print(f"round {round_no + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        kept = work / f"ours-{args.rounds - 1}"
        repeats = [ours(ref, kept, args.device_size) for _ in range(args.rounds)]
        release(kept)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"process-image --ref (median): {medians['ours']:.2f} s  ({tar_mb / medians['ours']:.0f} MB/s of tar)")
    print(f"process-image --image from S3, same blobs (median): {medians['s3']:.2f} s")
    print(f"skopeo copy + mkfs + GNU tar (median): {medians['baseline']:.2f} s  "
          f"({tar_mb / medians['baseline']:.0f} MB/s of tar)")
    print(f"ratio ours / baseline: {medians['ours'] / medians['baseline']:.2f}; "
          f"registry / S3: {medians['ours'] / medians['s3']:.2f}")
    print(f"repeat of the complete image (median of {len(repeats)}): {statistics.median(repeats):.3f} s "
          f"(target <= {REPEAT_TARGET_S} s)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
