"""A corrupt blob is caught while it streams in, through a real process-image (SeaweedFS
over HTTP, real SQLite, the blockfile pool on real loop devices): the job aborts with the
reason before any device is made for it, and nothing of the blob is left in the store. A
good first layer goes first: the corrupt second one downloads in the background while the
first is unpacked, so this is also the failure "while the next layer downloads": it leaves
no half-written blob, and the only device is layer 1's, ready and named by its row."""

from __future__ import annotations

import hashlib
import json
import sqlite3
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
def test_a_corrupt_blob_aborts_the_job_before_its_device(state_dir: Path, s3_client: Any,  # noqa: F811
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
    rows = [row for row in json.loads(history.stdout) if row["kind"] == "transition"]
    layer_two = [row for row in rows if (row["detail"] or {}).get("layer") == 2]
    assert rows[-1]["to"] == "aborted" and REASONS[damage] in rows[-1]["error"], rows[-1]
    assert [row["event"] for row in layer_two] == ["abort"], layer_two  # nothing made for layer 2
    with sqlite3.connect(state_dir / "images.db") as db:
        chains = db.execute("SELECT device_name, state FROM unpacked_images").fetchall()
        orphans = db.execute("SELECT count(*) FROM orphaned_devices").fetchone()[0]
    assert len(chains) == 1 and chains[0][1] == "ready" and orphans == 0, (chains, orphans)
    devices = sorted(p.stem for p in (state_dir / "pool").glob("thin-*.img"))
    assert devices == [chains[0][0]], devices  # layer 1's device, named by its row, reusable
    blobs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (state_dir / "blobs" / "sha256").iterdir()}
    # Layer 1 (and, for the OCI layout, the sound archive itself): the layer that failed is not there.
    assert len(blobs) == (2 if damage == "bad digest" else 1), sorted(blobs)
    assert all(name == digest for name, digest in blobs.items())
    assert list((state_dir / "blobs" / "tmp").iterdir()) == []
