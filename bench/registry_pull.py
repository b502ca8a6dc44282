"""The golang sample family pulled from a local OCI registry: `process-image --ref` against
`skopeo copy` plus GNU tar doing the same work, as a ratio of medians; and the repeat of a
complete image (one manifest request).

    sudo .venv/bin/python -m bench.registry_pull [--scale-mb 64] [--rounds 5] [--compression gzip]

Set-up: demo.samples' golang family (five layers) at `--scale-mb`, each layer compressed
(gzip by default, as `docker push` does; zstd with --compression zstd), written as an OCI
layout and pushed with `skopeo copy` to Debian's docker-registry on 127.0.0.1.

Each round, alternating which goes first:
* ours: `flyio-image-manager process-image --ref REF --plain-http` into a fresh state dir
  (blockfile backend): resolve, download with digest and tar checks, a device per layer,
  mkfs.ext4, unpack each layer, a VM snapshot.
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
from demo.samples import family_layers, write_layer
from support.proc import run_command

REPO = Path(__file__).resolve().parents[1]
REPEAT_TARGET_S = 0.3


def ours(ref: str, state: Path, device_size: str) -> float:
    started = time.perf_counter()
    run_command([sys.executable, "-m", "cli", "--quiet", "--state-dir", str(state), "process-image", "--ref", ref,
                 "--plain-http", "--backend", "blockfile", "--device-size", device_size], timeout=1800)
    return time.perf_counter() - started


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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    tars = [write_layer(spec, work / "tars" / f"{n}.tar")
            for n, spec in enumerate(family_layers("golang", args.scale_mb), start=1)]
    layers = tuple(make_layer(path.read_bytes(), f"tar+{args.compression}") for path in tars)
    tar_mb = sum(path.stat().st_size for path in tars) / 1e6
    blob_mb = sum(len(layer.blob) for layer in layers) / 1e6
    print(f"golang family at {args.scale_mb:g} MB scale: 5 layers, {tar_mb:.1f} MB of tar, {blob_mb:.1f} MB "
          f"{args.compression} blobs; {args.rounds} rounds, alternating")
    mine: list[float] = []
    theirs: list[float] = []
    with start_registry(work / "registry") as registry:
        ref = f"{registry.host}/bench/golang:1"
        push_layout(write_oci_layout(work / "layout", [ImageSpec(layers, {"Cmd": ["go"]})]), ref, registry)
        for round_no in range(args.rounds):
            order = ("ours", "baseline") if round_no % 2 == 0 else ("baseline", "ours")
            for which in order:
                scratch = work / f"{which}-{round_no}"
                try:
                    if which == "ours":
                        mine.append(ours(ref, scratch, args.device_size))
                    else:
                        theirs.append(baseline(ref, scratch, args.device_size))
                finally:
                    if which == "ours" and round_no < args.rounds - 1:
                        release(scratch)
                    elif which == "baseline":
                        shutil.rmtree(scratch, ignore_errors=True)
            print(f"round {round_no + 1}: ours {mine[-1]:.2f} s, skopeo+tar {theirs[-1]:.2f} s", flush=True)
        kept = work / f"ours-{args.rounds - 1}"
        repeats = [ours(ref, kept, args.device_size) for _ in range(args.rounds)]
        release(kept)
    ours_median, base_median = statistics.median(mine), statistics.median(theirs)
    print(f"process-image --ref (median): {ours_median:.2f} s  ({tar_mb / ours_median:.0f} MB/s of tar)")
    print(f"skopeo copy + mkfs + GNU tar (median): {base_median:.2f} s  ({tar_mb / base_median:.0f} MB/s of tar)")
    print(f"ratio ours / baseline: {ours_median / base_median:.2f}")
    print(f"repeat of the complete image (median of {len(repeats)}): {statistics.median(repeats):.3f} s "
          f"(target <= {REPEAT_TARGET_S} s)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
