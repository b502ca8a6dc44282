"""The README's first command: a local S3 server holding sample image families, each one
processed end to end by `flyio-image-manager process-image` into one pool; then a local
OCI registry holding one image (the first family's layers, zstd-compressed, plus an app
layer and a runtime config), pulled with `process-image --ref`.

    python -m demo [--state-dir ./demo-state] [--scale-mb 8] [--families golang,node,python]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from demo.s3server import start_s3_server
from demo.samples import ALL_FAMILIES, build_families, upload_families
from images.source import make_s3_client

BUCKET = "demo-images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path("demo-state"))
    parser.add_argument("--scale-mb", type=float, default=8.0)
    parser.add_argument("--families", default=",".join(ALL_FAMILIES))
    parser.add_argument("--device-size", default="1G")
    args = parser.parse_args()
    state_dir = args.state_dir.resolve()
    work = state_dir.parent / f"{state_dir.name}-s3"
    families = [f for f in args.families.split(",") if f]
    print(f"== building sample families {families} at {args.scale_mb} MB scale", flush=True)
    samples = work / "samples"
    build_families(samples, args.scale_mb, families=tuple(families))
    with start_s3_server(work / "seaweedfs") as server:
        print(f"== local S3 server at {server.endpoint_url} (started in {server.started_in:.1f}s)", flush=True)
        client = make_s3_client(server.endpoint_url, anonymous=True)
        if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=BUCKET)
        upload_families(client, BUCKET, samples)
        cli = [sys.executable, "-m", "cli", "--state-dir", str(state_dir)]
        for family in families:
            print(f"== process-image --image {family}", flush=True)
            done = subprocess.run([*cli, "process-image", "--image", family, "--bucket", BUCKET,
                                   "--endpoint-url", server.endpoint_url, "--device-size", args.device_size])
            if done.returncode != 0:
                return done.returncode
        code = pull_from_registry(cli, work, samples, families[0], args.device_size)
        if code != 0:
            return code
        for listing in (["images"], ["snapshots"], ["fsm", "list"], ["gc", "--dry-run"]):
            print(f"== flyio-image-manager {' '.join(listing)}", flush=True)
            subprocess.run([*cli, *listing])
    print(f"== state in {state_dir}; snapshots stay active for VMs (see `flyio-image-manager snapshots`)")
    return 0


def pull_from_registry(cli: list[str], work: Path, samples: Path, family: str, device_size: str) -> int:
    """Push `family`'s layers (zstd) and an app layer to a local registry with skopeo, then
    pull the image by reference; its runtime config shows in `images --json`."""
    import io
    import tarfile

    from demo.registry import ImageSpec, make_layer, push_layout, start_registry, write_oci_layout

    layers = [make_layer(path.read_bytes(), "tar+zstd") for path in sorted(samples.glob(f"images/{family}/*.tar"),
                                                                          key=lambda p: int(p.stem))]
    app = io.BytesIO()
    with tarfile.open(fileobj=app, mode="w", format=tarfile.PAX_FORMAT) as tar:
        body = b"#!/bin/sh\necho hello from the registry demo\n"
        info = tarfile.TarInfo("app/hello.sh")
        info.size, info.mode = len(body), 0o755
        tar.addfile(info, io.BytesIO(body))
    layers.append(make_layer(app.getvalue(), "tar+gzip"))
    config = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/app/hello.sh"], "WorkingDir": "/app",
              "ExposedPorts": {"8080/tcp": {}}}
    with start_registry(work / "registry") as registry:
        ref = f"{registry.host}/demo/{family}-app:1"
        print(f"== local OCI registry at {registry.host}; skopeo copy -> {ref}", flush=True)
        push_layout(write_oci_layout(work / "layout", [ImageSpec(tuple(layers), config)]), ref, registry)
        print(f"== process-image --ref {ref} --plain-http", flush=True)
        done = subprocess.run([*cli, "process-image", "--ref", ref, "--plain-http", "--device-size", device_size])
        if done.returncode == 0:
            print("== flyio-image-manager images --json (the registry image's config)", flush=True)
            subprocess.run([*cli, "images", "--json"])
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
