"""images.source and images.blobstore against a real SeaweedFS on 127.0.0.1.

Failures are injected by a small real HTTP proxy in front of SeaweedFS (503s, a
connection cut mid-body); it also records what each request asked for (the Range header),
which is how these tests prove a download resumed instead of starting over.

fetch_blob makes one attempt per call; the job engine's retry of the downloading state is
the one retry layer. `until_done` stands in for it here: call again after a TransientError.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from images.blobstore import BlobStore
from images.source import (
    ObjectRef,
    family_prefix,
    fetch_blob,
    file_ref,
    head_object,
    list_family,
    make_s3_client,
    partial_path,
)
from images.verify import BlobCheck
from support.errors import PermanentError, TransientError
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- a real HTTP proxy that can misbehave ------------------------------------------------

@dataclass
class ProxyLog:
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    body_bytes_sent: int = 0


class FaultyProxy:
    """Forwards to `upstream`; fails the first `fail_first` GETs with `fail_status`, and cuts
    the connection of the first GET after `cut_after` body bytes when set."""

    def __init__(self, upstream: str, *, fail_first: int = 0, fail_status: int = 503, cut_after: int | None = None) -> None:
        self.upstream = urlparse(upstream)
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.cut_after = cut_after
        self.log = ProxyLog()
        self._lock = threading.Lock()
        self._gets = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_HEAD(self) -> None:
                proxy._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.log.requests.append((handler.command, handler.path, handler.headers.get("Range")))
            is_get = handler.command == "GET"
            number = self._gets
            if is_get:
                self._gets += 1
        if is_get and number < self.fail_first:
            body = b"<Error><Code>ServiceUnavailable</Code><Message>try again</Message></Error>"
            handler.send_response(self.fail_status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
        conn.request(handler.command, handler.path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_HEADERS | {"content-length"}:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        cut = is_get and number == self.fail_first and self.cut_after is not None
        payload = body[: self.cut_after] if cut else body
        handler.wfile.write(payload)
        handler.wfile.flush()
        with self._lock:
            self.log.body_bytes_sent += len(payload)
        if cut:
            handler.close_connection = True
            handler.connection.shutdown(2)

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log.requests if r[0] == "GET" and "list-type" not in r[1]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_factory(s3_server: Any) -> Iterator[Callable[..., FaultyProxy]]:
    proxies: list[FaultyProxy] = []

    def make(**kwargs: Any) -> FaultyProxy:
        proxy = FaultyProxy(s3_server.endpoint_url, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "state")


@pytest.fixture
def bucket(make_bucket: Callable[..., str]) -> str:
    return make_bucket("src")


def until_done(fetch: Callable[[], Any], attempts: int = 4) -> tuple[Any, int]:
    """(result, attempts made): what the engine does with the downloading state."""
    for attempt in range(1, attempts + 1):
        try:
            return fetch(), attempt
        except TransientError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def tar_of(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def put(client: Any, bucket: str, key: str, data: bytes) -> ObjectRef:
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return head_object(bucket, key, client)


# --- listing ----------------------------------------------------------------------------

def test_family_prefix() -> None:
    assert family_prefix("node") == "images/node/"
    with pytest.raises(PermanentError):
        family_prefix("../etc")


def test_list_family_orders_layers_numerically(s3_client: Any, bucket: str) -> None:
    for n in (1, 2, 10, 3, 11, 4, 5, 6, 7, 8, 9):
        s3_client.put_object(Bucket=bucket, Key=f"images/node/{n}.tar", Body=b"x" * n)
    s3_client.put_object(Bucket=bucket, Key="images/node/README.md", Body=b"ignored")
    s3_client.put_object(Bucket=bucket, Key="images/node/old/1.tar", Body=b"ignored: deeper")
    s3_client.put_object(Bucket=bucket, Key="images/nodejs/1.tar", Body=b"other family")

    refs = list_family(bucket, "images/node/", s3_client)

    assert [r.key for r in refs] == [f"images/node/{n}.tar" for n in range(1, 12)]
    assert [r.size for r in refs] == list(range(1, 12))
    assert all(r.etag and r.url.startswith(f"s3://{bucket}/") for r in refs)


def test_list_family_gap_is_an_error_naming_the_missing_key(s3_client: Any, bucket: str) -> None:
    for n in (1, 2, 4):
        s3_client.put_object(Bucket=bucket, Key=f"images/go/{n}.tar", Body=b"x")
    with pytest.raises(PermanentError, match=rf"s3://{bucket}/images/go/3.tar: missing layer"):
        list_family(bucket, "images/go/", s3_client)


def test_list_family_non_numeric_key_is_an_error_naming_it(s3_client: Any, bucket: str) -> None:
    for name in ("1", "2", "latest"):
        s3_client.put_object(Bucket=bucket, Key=f"images/py/{name}.tar", Body=b"x")
    with pytest.raises(PermanentError, match=rf"s3://{bucket}/images/py/latest.tar: layer name is not"):
        list_family(bucket, "images/py/", s3_client)


def test_list_family_empty_prefix_is_an_error(s3_client: Any, bucket: str) -> None:
    with pytest.raises(PermanentError, match="no layers"):
        list_family(bucket, "images/none/", s3_client)


# --- fetching ---------------------------------------------------------------------------

def test_fetch_blob_stores_by_digest_atomically(s3_client: Any, bucket: str, store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    ref = put(s3_client, bucket, "images/a/1.tar", data)

    info = fetch_blob(ref, store, s3_client)

    assert info.digest == sha256_of(data)
    assert info.size == len(data)
    assert info.path == store.path(info.digest) == store.blob_dir / info.digest.split(":")[1]
    assert info.path.read_bytes() == data
    assert store.has(info.digest)
    assert list(store.tmp_dir.iterdir()) == []  # the temp file was renamed, not copied


def test_fetch_of_a_present_digest_sends_no_request(
    s3_client: Any, bucket: str, store: BlobStore, proxy_factory: Callable[..., FaultyProxy]
) -> None:
    data = os.urandom(200_000)
    ref = put(s3_client, bucket, "images/a/2.tar", data)
    proxy = proxy_factory()
    client = make_s3_client(proxy.url, anonymous=True)
    first = fetch_blob(ref, store, client)
    mtime = first.path.stat().st_mtime_ns
    requests_after_first = len(proxy.log.requests)

    again = fetch_blob(ref, store, client, known_digest=first.digest)

    assert requests_after_first == 1
    assert len(proxy.log.requests) == 1  # nothing more went over the wire
    assert again.digest == first.digest and again.transferred == 0
    assert again.path.stat().st_mtime_ns == mtime


def test_partial_download_resumes_with_a_range_request(
    s3_client: Any, bucket: str, store: BlobStore, proxy_factory: Callable[..., FaultyProxy]
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    ref = put(s3_client, bucket, "images/a/3.tar", data)
    prefix = 1024 * 1024 + 3
    store.ensure_dirs()
    partial_path(store, ref).write_bytes(data[:prefix])
    proxy = proxy_factory()

    info = fetch_blob(ref, store, make_s3_client(proxy.url, anonymous=True))

    assert info.digest == sha256_of(data)
    assert info.transferred == len(data) - prefix
    assert proxy.gets() == [("GET", f"/{bucket}/images/a/3.tar", f"bytes={prefix}-")]
    assert proxy.log.body_bytes_sent == len(data) - prefix


def test_resume_with_a_wrong_prefix_is_caught_by_the_etag_and_restarted(
    s3_client: Any, bucket: str, store: BlobStore, proxy_factory: Callable[..., FaultyProxy]
) -> None:
    data = os.urandom(1024 * 1024)
    ref = put(s3_client, bucket, "images/a/4.tar", data)
    assert ref.etag is not None and "-" not in ref.etag  # single-part upload: ETag is the MD5
    store.ensure_dirs()
    bad_prefix = b"\0" * 1000
    partial_path(store, ref).write_bytes(bad_prefix)
    proxy = proxy_factory()
    client = make_s3_client(proxy.url, anonymous=True)

    # Without the MD5 check the ranged bytes are spliced onto the bad prefix: proof the
    # prefix was kept and only the rest was fetched.
    spliced = fetch_blob(ref, store, client, check_md5_etag=False)
    assert spliced.digest == sha256_of(bad_prefix + data[1000:]) != sha256_of(data)

    partial_path(store, ref).write_bytes(bad_prefix)
    proxy.log.requests.clear()
    info, attempts = until_done(lambda: fetch_blob(ref, store, client))

    assert info.digest == sha256_of(data)
    ranges = [r[2] for r in proxy.gets()]
    assert ranges == ["bytes=1000-", None]  # resumed, failed the MD5 check, restarted whole
    assert attempts == 2


def test_connection_cut_mid_body_is_resumed(
    s3_client: Any, bucket: str, store: BlobStore, proxy_factory: Callable[..., FaultyProxy]
) -> None:
    data = tar_of({"usr/lib/a": os.urandom(1536 * 1024), "usr/lib/b": os.urandom(1536 * 1024)})
    ref = put(s3_client, bucket, "images/a/5.tar", data)
    proxy = proxy_factory(cut_after=1024 * 1024 + 100)
    client = make_s3_client(proxy.url, anonymous=True)

    def fetch() -> Any:
        return fetch_blob(ref, store, client, check=BlobCheck)

    with pytest.raises(TransientError):
        fetch()
    assert list(store.blob_dir.iterdir()) == []  # no half-written blob, only the resumable temp file
    assert 0 < partial_path(store, ref).stat().st_size <= 1024 * 1024 + 100
    info = fetch()

    assert info.digest == sha256_of(data)
    assert info.findings.format == "tar" and info.findings.entries == 2  # checked across the resume
    gets = proxy.gets()
    assert len(gets) == 2 and gets[0][2] is None
    resumed_at = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1024 * 1024 + 100
    assert info.transferred == len(data) - resumed_at  # this attempt fetched only the rest


@pytest.mark.parametrize("damage", ["header checksum", "truncated", "not a tar"])
def test_a_blob_failing_its_streaming_checks_is_never_stored(
    s3_client: Any, bucket: str, store: BlobStore, damage: str
) -> None:
    """The checks run as the bytes arrive; a failure deletes the temp file at once and no
    file ever appears under the digest's name."""
    good = tar_of({"etc/a": os.urandom(700_000), "etc/b": os.urandom(900_000)})
    bad = bytearray(good)
    if damage == "header checksum":
        second = 512 + 700_000 + (-700_000 % 512)  # the header of etc/b
        bad[second + 148: second + 156] = b"0000000\0"
        reason = rf"bad header checksum at byte {second}"
    elif damage == "truncated":
        bad = bad[: len(good) // 2]
        reason = "truncated or corrupt tar"
    else:
        bad = bytearray(b"PK\x03\x04" + bytes(bad[4:]))
        reason = "unsupported format: zip archive"
    ref = put(s3_client, bucket, f"images/bad/{damage.replace(' ', '-')}.tar", bytes(bad))

    with pytest.raises(PermanentError, match=reason):
        fetch_blob(ref, store, s3_client, check=BlobCheck)
    assert list(store.blob_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_object_replaced_after_listing_is_a_permanent_error(s3_client: Any, bucket: str, store: BlobStore) -> None:
    s3_client.put_object(Bucket=bucket, Key="images/b/1.tar", Body=b"version one" * 1000)
    (ref,) = list_family(bucket, "images/b/", s3_client)
    s3_client.put_object(Bucket=bucket, Key="images/b/1.tar", Body=b"version two" * 1000)

    with pytest.raises(PermanentError, match="object changed while downloading"):
        fetch_blob(ref, store, s3_client)
    assert not partial_path(store, ref).exists()


def test_missing_object_is_a_clear_permanent_error(s3_client: Any, bucket: str, store: BlobStore) -> None:
    with pytest.raises(PermanentError, match=rf"^s3://{bucket}/images/none/1.tar: not found$"):
        fetch_blob(ObjectRef(f"s3://{bucket}/images/none/1.tar"), store, s3_client)
    listed = ObjectRef(f"s3://{bucket}/images/none/2.tar", size=10, etag='"0123456789abcdef0123456789abcdef"')
    with pytest.raises(PermanentError, match="not found"):
        fetch_blob(listed, store, s3_client)
    with pytest.raises(PermanentError, match="not found"):
        list_family("no-such-bucket-xyz", "images/node/", s3_client)


def test_a_503_is_one_transient_error_per_attempt(
    s3_client: Any, bucket: str, store: BlobStore, proxy_factory: Callable[..., FaultyProxy]
) -> None:
    data = os.urandom(300_000)
    ref = put(s3_client, bucket, "images/c/1.tar", data)
    proxy = proxy_factory(fail_first=3)
    client = make_s3_client(proxy.url, anonymous=True)

    info, attempts = until_done(lambda: fetch_blob(ref, store, client))

    assert info.digest == sha256_of(data)
    assert attempts == 4 and len(proxy.gets()) == 4  # three 503s, then the real answer


def test_fetch_blob_makes_exactly_one_attempt(
    s3_client: Any, bucket: str, store: BlobStore, proxy_factory: Callable[..., FaultyProxy]
) -> None:
    """No retry layer under the engine's: one call, one GET, whatever the error."""
    ref = put(s3_client, bucket, "images/c/2.tar", b"data" * 100)
    proxy = proxy_factory(fail_first=100)

    with pytest.raises(TransientError, match=r"server error 503"):
        fetch_blob(ref, store, make_s3_client(proxy.url, anonymous=True))
    assert len(proxy.gets()) == 1


def test_unreachable_endpoint_is_transient(store: BlobStore) -> None:
    client = make_s3_client("http://127.0.0.1:9", anonymous=True, connect_timeout=0.5, read_timeout=0.5)
    ref = ObjectRef("s3://bucket/images/x/1.tar", size=1, etag='"x"')
    with pytest.raises(TransientError, match="EndpointConnectionError"):
        fetch_blob(ref, store, client)


def test_file_source_is_copied_and_hashed(tmp_path: Path, store: BlobStore) -> None:
    source = tmp_path / "layer.tar"
    data = os.urandom(100_000)
    source.write_bytes(data)

    info = fetch_blob(file_ref(source), store, client=None)

    assert info.digest == sha256_of(data)
    assert info.path.read_bytes() == data
    with pytest.raises(PermanentError, match="not found"):
        file_ref(tmp_path / "missing.tar")


def test_changed_file_source_is_a_permanent_error(tmp_path: Path, store: BlobStore) -> None:
    source = tmp_path / "layer.tar"
    source.write_bytes(b"one")
    ref = file_ref(source)
    source.write_bytes(b"two, longer")
    with pytest.raises(PermanentError, match="object changed while downloading"):
        fetch_blob(ref, store, client=None)


def test_remove_stale_tmp(store: BlobStore) -> None:
    store.ensure_dirs()
    stale = store.tmp_path("old")
    stale.write_bytes(b"partial")
    assert store.remove_stale_tmp() == [stale]
    assert not stale.exists()


def test_digest_paths_are_validated(store: BlobStore) -> None:
    with pytest.raises(PermanentError, match="invalid digest"):
        store.path("sha256:../../etc/passwd")
    assert not store.has("sha256:" + "0" * 64)
