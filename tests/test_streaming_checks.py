"""A corrupt blob is caught while it streams in, through a real process-image (SeaweedFS
over HTTP, real SQLite, the blockfile pool on real loop devices): the job aborts with the
reason before any device is created, and nothing of the blob is left in the store. A good
first layer goes first, so the failure is the download's, not an empty pool's."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_formats import _oci_archive, layer_tar
from tests.test_process_image import DEVICE_SIZE, REPO, manager, needs_root, state_dir  # noqa: F401 (fixture)


def corrupt_layer(damage: str) -> bytes:
    good = layer_tar(-1)  # random contents: what a real layer looks like to a compressor
    if damage == "bad digest":
        # An OCI layout whose first layer's bytes no longer match the digest that names it:
        # one byte of a file's contents changed, its tar structure still sound.
        archive = bytearray(_oci_archive([layer_tar(1), layer_tar(2)]))
        at = archive.index(b"\x01" * 2000)
        archive[at] = 2
        return bytes(archive)
    if damage == "truncated tar":
        return good[: len(good) // 2]
    assert damage == "bad header checksum"
    bad = bytearray(good)
    second = 512  # file0 is empty: the second header follows the first
    bad[second + 148: second + 156] = b"0000000\0"
    return bytes(bad)


REASONS = {"bad digest": "checksum mismatch", "truncated tar": "truncated or corrupt tar",
           "bad header checksum": "bad header checksum at byte 512"}


@needs_root
@pytest.mark.parametrize("damage", sorted(REASONS))
def test_a_corrupt_blob_aborts_the_job_before_any_device(state_dir: Path, s3_client: Any,  # noqa: F811
                                                          make_bucket: Callable[..., str], s3_server: Any,
                                                          damage: str) -> None:
    bucket = make_bucket("corrupt")
    family = damage.replace(" ", "-")
    s3_client.put_object(Bucket=bucket, Key=f"images/{family}/1.tar", Body=layer_tar(-1))
    s3_client.put_object(Bucket=bucket, Key=f"images/{family}/2.tar", Body=corrupt_layer(damage))

    done = manager(state_dir, "process-image", "--bucket", bucket, "--endpoint-url", s3_server.endpoint_url,
                   "--device-size", DEVICE_SIZE, "--backend", "blockfile", "--image", family)

    assert done.returncode != 0
    assert REASONS[damage] in done.stderr, done.stderr[-3000:]
    listed = manager(state_dir, "fsm", "list", "--json")
    (job,) = json.loads(listed.stdout)
    assert job["state"] == "aborted", job
    history = manager(state_dir, "fsm", "history", str(job["id"]), "--json")
    states = [row["to"] for row in json.loads(history.stdout) if row["kind"] == "transition"]
    assert "creating_device" not in states and "verifying" not in states, states
    devices = [p for p in (state_dir / "pool").rglob("*") if p.is_file()] if (state_dir / "pool").exists() else []
    assert devices == [], devices  # no device file in the pool
    blobs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (state_dir / "blobs" / "sha256").iterdir()}
    # Layer 1 (and, for the OCI layout, the sound archive itself): the layer that failed is not there.
    assert len(blobs) == (2 if damage == "bad digest" else 1), sorted(blobs)
    assert all(name == digest for name, digest in blobs.items())
    assert list((state_dir / "blobs" / "tmp").iterdir()) == []
