"""Shared fixtures: one real S3-compatible server (SeaweedFS) per test session on 127.0.0.1,
buckets with unique names, and a bucket holding the sample image families."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from demo.s3server import S3Server, S3ServerError, find_weed, start_s3_server

SAMPLE_SCALE_MB = 3.0


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running `weed mini` for the whole session (skipped when `weed` is not installed)."""
    try:
        find_weed()
    except S3ServerError as exc:
        pytest.skip(f"no local S3 server: {exc}")
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server: S3Server) -> Any:
    """An anonymous boto3 client of the session's server (weed mini has no identities)."""
    from images.source import make_s3_client

    return make_s3_client(s3_server.endpoint_url, anonymous=True)


@pytest.fixture(scope="session")
def make_bucket(s3_client: Any) -> Callable[..., str]:
    """Create a bucket with a unique name (S3 wants 3-63 lowercase characters); returns its name."""

    def create(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3_client.create_bucket(Bucket=name)
        return name

    return create


@dataclass(frozen=True)
class SampleBucket:
    """A bucket laid out like production: images/<family>/<n>.tar for every sample family."""

    name: str
    endpoint_url: str
    local_dir: Path
    layers: dict[str, list[Path]]
    scale_mb: float


@pytest.fixture(scope="session")
def sample_bucket(
    s3_server: S3Server, s3_client: Any, make_bucket: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> SampleBucket:
    """The sample families (demo.samples at SAMPLE_SCALE_MB) uploaded to a fresh bucket."""
    from demo.samples import build_families, upload_families

    local_dir = tmp_path_factory.mktemp("samples")
    layers = build_families(local_dir, SAMPLE_SCALE_MB)
    bucket = make_bucket("samples")
    upload_families(s3_client, bucket, local_dir)
    return SampleBucket(bucket, s3_server.endpoint_url, local_dir, layers, SAMPLE_SCALE_MB)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running distribution registry (Debian's docker-registry) on 127.0.0.1, anonymous,
    for the whole session (skipped when it or skopeo is not installed)."""
    from demo.registry import RegistryError, find_registry, find_skopeo, start_registry

    try:
        find_registry(), find_skopeo()
    except RegistryError as exc:
        pytest.skip(f"no local registry: {exc}")
    server = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The same registry asking for Basic auth (htpasswd, bcrypt): user "ann", password "s3cret"."""
    import shutil

    from demo.registry import RegistryError, find_registry, find_skopeo, start_registry

    try:
        find_registry(), find_skopeo()
    except RegistryError as exc:
        pytest.skip(f"no local registry: {exc}")
    if shutil.which("htpasswd") is None:
        pytest.skip("no htpasswd (apt-get install apache2-utils)")
    server = start_registry(tmp_path_factory.mktemp("auth-registry"), users={"ann": "s3cret"})
    try:
        yield server
    finally:
        server.stop()
