"""process-image on OCI layouts, `docker save` archives and compressed layers, end to end:
the format is found from the content (names lie), the layers inside are applied in order."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.test_formats import _docker_archive, _oci_archive
from tests.test_process_image import REPO, fields, mount_snapshot, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


def layer(files: dict[str, bytes], deletions: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for name in deletions:
            head, _, leaf = name.rpartition("/")
            info = tarfile.TarInfo(f"{head}/.wh.{leaf}" if head else f".wh.{leaf}")
            tar.addfile(info)
    return buf.getvalue()


BASE = layer({"etc/os-release": b"ID=base\n", "etc/old.conf": b"old\n", "usr/bin/tool": b"#!/bin/sh\n"})
TOP = layer({"etc/os-release": b"ID=top\n", "app/main.py": b"print('hi')\n"}, deletions=("etc/old.conf",))
EXPECTED = {"etc/os-release": b"ID=top\n", "usr/bin/tool": b"#!/bin/sh\n", "app/main.py": b"print('hi')\n"}


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    teardown(directory)


def process_file(state_dir: Path, path: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image",
                           "--url", path.as_uri(), "--backend", "blockfile", "--device-size", "64M"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return fields(done.stdout)


def files_in(device: str, target: Path) -> dict[str, bytes]:
    mount_snapshot(device, target)
    try:
        return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*")
                if p.is_file() and "lost+found" not in p.parts}
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60)


@pytest.mark.parametrize("kind", ["oci-layout", "docker-save"])
def test_image_archives_apply_their_layers_in_order(kind: str, state_dir: Path, tmp_path: Path) -> None:
    archive = _oci_archive([BASE, gzip.compress(TOP)]) if kind == "oci-layout" else _docker_archive([BASE, TOP], new_style=True)
    path = tmp_path / "image.bin"  # the name says nothing: the content decides
    path.write_bytes(archive)
    result = process_file(state_dir, path)
    assert result["state"] == "complete"
    assert files_in(result["snapshot_device"], tmp_path / "mnt") == EXPECTED


@pytest.mark.parametrize("compress", [gzip.compress, lambda d: zstandard.ZstdCompressor().compress(d)], ids=["gzip", "zstd"])
def test_compressed_single_layers(compress, state_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"  # a compressed blob named .tar
    path.write_bytes(compress(BASE))
    result = process_file(state_dir, path)
    assert files_in(result["snapshot_device"], tmp_path / "mnt") == {
        "etc/os-release": b"ID=base\n", "etc/old.conf": b"old\n", "usr/bin/tool": b"#!/bin/sh\n"}


def test_a_zip_is_rejected_before_any_device_exists(state_dir: Path, tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "image.tar"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("etc/passwd", "x")
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image",
                           "--url", path.as_uri(), "--backend", "blockfile"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert "state=aborted" in done.stdout and "unsupported format" in done.stdout and "zip" in done.stdout
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    assert BlockfilePool(PoolConfig(directory=str(state_dir))).list_devices() == []
