"""Where blobs come from: S3 objects (through boto3's botocore client) and local files, fetched into the blob store.

    client = make_s3_client(endpoint_url=None, anonymous=None)   # public bucket: unsigned
    refs = list_family("flyio-platform-hiring-challenge", family_prefix("node"), client)
    infos = [fetch_blob(ref, store, client) for ref in refs]

A download streams into a temp file named after (url, ETag) while sha256 is computed
and the blob's streaming checks (`check`, images.verify.BlobCheck) run on the same bytes,
so an interrupted one resumes with an HTTP Range request from the temp file's length.
Every GET is pinned to the ETag seen when listing (If-Match): an object replaced
mid-download is a PermanentError, never a blob spliced from two versions.

Each call here is one attempt. Transient failures (5xx, throttling, resets, timeouts)
raise TransientError and leave the partial temp file; the one retry layer is the job
engine's retry of the downloading state (states/workflow.py NETWORK_RETRY: bounded,
backoff and jitter, one history row per attempt), whose next attempt resumes by Range.
botocore's own retries are off, so nothing retries underneath it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from images.blobstore import CHUNK_SIZE, BlobInfo, BlobStore, BlobWriter, StreamCheck
from support.errors import ManagerError, PermanentError, TransientError
from support.log import get_logger

log = get_logger("images.source", component="source")

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]  # (bytes in the temp file so far, total size)
CheckFactory = Callable[[int], StreamCheck]  # the streaming checks of a blob of this size

LAYER_NAME = re.compile(r"^[1-9][0-9]*$")  # 1, 2, ... 10; no "01", no "0"
MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "503",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "403", "AllAccessDisabled"})


def network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the network (not the request) failed: worth a retry.
    botocore loads here, not at import: commands that never reach S3 start fast."""
    import urllib3.exceptions
    from botocore.exceptions import (ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                                     HTTPClientError, IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)

    return (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
            ResponseStreamingError, IncompleteReadError, HTTPClientError, urllib3.exceptions.HTTPError,
            ConnectionError, socket.timeout)


@dataclass(frozen=True)
class ObjectRef:
    """One object: "s3://bucket/key" or "file:///abs/path", its size and ETag when known."""

    url: str
    size: int | None = None
    etag: str | None = None

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def key(self) -> str:
        return urlparse(self.url).path.lstrip("/")

    @property
    def local_path(self) -> Path:
        return Path(unquote(urlparse(self.url).path))


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def family_prefix(family: str) -> str:
    """The key prefix of an image family: "node" -> "images/node/"."""
    family = family.strip("/")
    if not family or ".." in family.split("/"):
        raise PermanentError(f"invalid image family name: {family!r}")
    return f"images/{family}/"


@functools.cache
def process_s3_client(endpoint_url: str | None) -> Any:
    """The process's one client for `endpoint_url` (boto3 clients are thread-safe, and making
    one costs ~0.15 s of botocore's service model): the request's HEAD or LIST, the job's
    downloads and the prefetch worker all use it."""
    return make_s3_client(endpoint_url=endpoint_url)


def make_s3_client(
    endpoint_url: str | None = None,
    anonymous: bool | None = None,
    *,
    region: str | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
) -> Any:
    """An S3 client: the botocore client boto3's `client("s3")` is, made without boto3's
    session layer (which imports s3transfer for upload_file/download_file, never used here:
    ~60 ms of every S3 command's start). `endpoint_url` falls back to $AWS_ENDPOINT_URL;
    `anonymous=None` means unsigned requests exactly when no AWS credentials are configured
    (the production bucket is public). botocore's retries are off: the job engine's retry
    of the downloading state is the one retry layer."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    session = botocore.session.Session()
    if anonymous is None:
        anonymous = session.get_credentials() is None
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        # boto3 >= 1.36 adds CRC checksums that S3-compatible servers may not speak.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}
    if anonymous:
        options["signature_version"] = UNSIGNED
    try:
        config = Config(**options)
    except TypeError:  # botocore < 1.36 knows no checksum options, and needs none
        options.pop("request_checksum_calculation")
        options.pop("response_checksum_validation")
        config = Config(**options)
    return session.create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region or session.get_config_variable("region") or "us-east-1",
        config=config,
    )


def classify_error(exc: BaseException, url: str) -> ManagerError:
    """Map a boto3/network exception to TransientError or PermanentError, one clear line."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ManagerError):
        return exc
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = str(exc.response.get("Error", {}).get("Message", "")).strip()
        if status == 404 or code in NOT_FOUND_CODES:
            return PermanentError(f"{url}: not found")
        if status == 403 or code in DENIED_CODES:
            return PermanentError(f"{url}: access denied")
        if status == 412 or code == "PreconditionFailed":
            return PermanentError(f"{url}: object changed while downloading")
        if status >= 500 or status == 429 or code in THROTTLING_CODES:
            return TransientError(f"{url}: server error {status} {code}".rstrip())
        return PermanentError(f"{url}: {code or status}: {message}".rstrip(": "))
    if isinstance(exc, network_errors()):
        return TransientError(f"{url}: {type(exc).__name__}: {exc}")
    if isinstance(exc, BotoCoreError):
        return PermanentError(f"{url}: {exc}")
    raise exc


def _s3_call(fn: Callable[[], T], url: str) -> T:
    try:
        return fn()
    except Exception as exc:  # classified: anything unknown is re-raised unchanged
        raise classify_error(exc, url) from exc


def head_object(bucket: str, key: str, client: Any) -> ObjectRef:
    """The ObjectRef (size, ETag) of one S3 object (one attempt: TransientError or PermanentError)."""
    url = s3_url(bucket, key)
    head = _s3_call(lambda: client.head_object(Bucket=bucket, Key=key), url)
    return ObjectRef(url=url, size=int(head["ContentLength"]), etag=head.get("ETag"))


def file_ref(path: Path) -> ObjectRef:
    """The ObjectRef of a local file; its "ETag" is mtime and size, enough to notice a change."""
    path = Path(path).resolve()
    url = path.as_uri()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PermanentError(f"{url}: not found") from None
    except PermissionError:
        raise PermanentError(f"{url}: access denied") from None
    return ObjectRef(url=url, size=st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}")


def list_family(bucket: str, prefix: str, client: Any) -> list[ObjectRef]:
    """The layers `<prefix><n>.tar` of an image family, in numeric order (10 after 2).

    Deeper keys and keys not ending in .tar are ignored; a .tar key whose name is not a
    number, numbering that does not start at 1, or a gap is a PermanentError naming the key.
    """
    where = s3_url(bucket, prefix)

    def list_all() -> list[dict[str, Any]]:
        paginator = client.get_paginator("list_objects_v2")
        objects: list[dict[str, Any]] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
        return objects

    objects = _s3_call(list_all, where)
    numbered: dict[int, ObjectRef] = {}
    for obj in objects:
        key: str = obj["Key"]
        name = key[len(prefix):]
        if "/" in name or not name.endswith(".tar"):
            continue
        stem = name[: -len(".tar")]
        if not LAYER_NAME.match(stem):
            raise PermanentError(f"{s3_url(bucket, key)}: layer name is not a layer number (1, 2, 3, ...)")
        numbered[int(stem)] = ObjectRef(url=s3_url(bucket, key), size=int(obj["Size"]), etag=obj.get("ETag"))
    if not numbered:
        raise PermanentError(f"{where}: no layers (<n>.tar) found")
    for expected, number in enumerate(sorted(numbered), start=1):
        if number != expected:
            raise PermanentError(
                f"{s3_url(bucket, f'{prefix}{expected}.tar')}: missing layer "
                f"(found {', '.join(str(n) for n in sorted(numbered))})"
            )
    return [numbered[n] for n in sorted(numbered)]


def _temp_name(ref: ObjectRef, etag: str) -> str:
    # Stable per (url, version): a retry resumes it; a new version never reuses its bytes.
    return hashlib.sha256(f"{ref.url}\n{etag}".encode()).hexdigest()[:40]


def partial_path(store: BlobStore, ref: ObjectRef) -> Path:
    """The temp file an interrupted download of `ref` (with its ETag known) resumes from."""
    if ref.etag is None:
        raise ValueError(f"{ref.url}: ETag unknown")
    return store.tmp_path(_temp_name(ref, ref.etag))


class _Transfer:
    """Counts the bytes received over the wire by one fetch."""

    def __init__(self) -> None:
        self.received = 0


def _download_once(
    ref: ObjectRef, etag: str, size: int, store: BlobStore, client: Any,
    transfer: _Transfer, on_progress: ProgressCallback | None, check_md5: bool, check: CheckFactory | None,
    *, stream: Callable[..., None] | None = None, expected_digest: str | None = None,
) -> BlobInfo:
    """One attempt at `ref` into the store, resuming its temp file. `stream` is the transport
    (S3's GET by default, images.registry's for oci:// refs); `expected_digest` the digest
    the bytes must have (a registry names it), checked before the blob is stored."""
    stream = stream or _stream_object
    try:
        writer = store.writer(_temp_name(ref, etag), resume=True, with_md5=check_md5,
                              check=(lambda: check(size)) if check else None)
    except PermanentError as exc:  # the kept prefix failed the checks (and is deleted)
        raise TransientError(f"{ref.url}: resumed download failed its checks ({exc}); restarting") from exc
    resumed_from = writer.offset
    try:
        if writer.offset > size:
            writer.restart()
        if writer.offset < size or size == 0:
            stream(ref, etag, size, client, writer, transfer, on_progress)
        if writer.size != size:
            raise TransientError(f"{ref.url}: got {writer.size} bytes, expected {size}")
        md5 = writer.md5_hex()
        etag_md5 = MD5_ETAG.match(etag)
        if check_md5 and md5 is not None and etag_md5 and md5 != etag_md5.group(1):
            raise PermanentError(f"checksum mismatch: {ref.url}: md5 {md5} does not match ETag {etag}")
        info = writer.commit(expected_digest, transferred=transfer.received)
    except TransientError:
        writer.keep()
        raise
    except PermanentError as exc:
        writer.abort()
        if resumed_from:
            # The kept prefix may be what is wrong (a crash before it reached the disk): the
            # next attempt starts from zero and judges the object's own bytes.
            raise TransientError(f"{ref.url}: resumed download failed ({exc}); restarting") from exc
        raise
    except BaseException:
        writer.keep()  # interrupted (e.g. KeyboardInterrupt): leave the bytes for a resume
        raise
    return info


def _stream_object(
    ref: ObjectRef, etag: str, size: int, client: Any, writer: BlobWriter,
    transfer: _Transfer, on_progress: ProgressCallback | None,
) -> None:
    request: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key, "IfMatch": etag}
    if writer.offset:
        request["Range"] = f"bytes={writer.offset}-"
    response = _s3_call(lambda: client.get_object(**request), ref.url)
    status = response["ResponseMetadata"]["HTTPStatusCode"]
    if writer.offset and status != 206:
        writer.restart()  # the server sent the whole object instead of the range
    got_etag = response.get("ETag")
    if got_etag and got_etag != etag:
        raise PermanentError(f"{ref.url}: object changed while downloading")
    body = response["Body"]
    try:
        while True:
            chunk = _s3_call(lambda: body.read(CHUNK_SIZE), ref.url)
            if not chunk:
                break
            writer.write(chunk)
            transfer.received += len(chunk)
            if writer.size > size:
                raise PermanentError(f"{ref.url}: object changed while downloading (longer than {size} bytes)")
            if on_progress is not None:
                on_progress(writer.size, size)
    finally:
        body.close()


def _copy_local(ref: ObjectRef, store: BlobStore, on_progress: ProgressCallback | None,
                check: CheckFactory | None) -> BlobInfo:
    before = file_ref(ref.local_path)
    if ref.etag is not None and ref.etag != before.etag:
        raise PermanentError(f"{ref.url}: object changed while downloading")
    size = before.size or 0
    with store.writer(check=(lambda: check(size)) if check else None) as writer, open(ref.local_path, "rb") as src:
        while chunk := src.read(CHUNK_SIZE):
            writer.write(chunk)
            if on_progress is not None:
                on_progress(writer.size, size)
        if file_ref(ref.local_path).etag != before.etag or writer.size != size:
            raise PermanentError(f"{ref.url}: object changed while downloading")
        return writer.commit(transferred=0)


def fetch_blob(
    ref: ObjectRef,
    store: BlobStore,
    client: Any,
    *,
    known_digest: str | None = None,
    on_progress: ProgressCallback | None = None,
    check: CheckFactory | None = None,
    check_md5_etag: bool = True,
) -> BlobInfo:
    """Fetch `ref` into the store and return its BlobInfo (digest "sha256:<hex>", size, path,
    and the `check`'s findings). One attempt; the caller (the job engine) retries.

    * `known_digest` (from the catalog's layers table) already in the store: no request at all.
    * `check(size)` makes the blob's streaming checks (images.verify.BlobCheck), fed every
      byte as it arrives: a failure stops the download at once, deletes the temp file and
      raises PermanentError; the blob is stored under its digest only once they all passed.
    * A partial temp file from an earlier attempt is resumed with a Range request (its
      bytes are re-hashed and re-checked from the disk).
    * The GET is pinned with If-Match to the ETag from the listing (or a HEAD when unknown).
    * When the ETag is a plain MD5 (single-part upload) the bytes are checked against it;
      a resumed download that fails that check is a TransientError after deleting the
      temp file, so the next attempt starts from zero.
    * 5xx, throttling and network errors are TransientErrors (the temp file kept for a
      resume); 403/404/412 are PermanentErrors.
    """
    if known_digest is not None:
        present = store.info(known_digest)
        if present is not None:
            return present
    if ref.scheme == "file":
        return _copy_local(ref, store, on_progress, check)
    if ref.scheme == "oci":
        from images.registry import stream_blob

        if ref.etag is None or ref.size is None:
            raise PermanentError(f"{ref.url}: a registry blob needs its digest and size from the manifest")
        info = _download_once(ref, ref.etag, ref.size, store, client, _Transfer(), on_progress, False, check,
                              stream=stream_blob, expected_digest=ref.etag)
        log.info("blob fetched", source=ref.url, digest=info.digest, size=info.size, transferred=info.transferred)
        return info
    if ref.scheme != "s3":
        raise PermanentError(f"{ref.url}: unsupported source (expected s3://, file:// or oci://)")
    if ref.etag is None or ref.size is None:
        ref = head_object(ref.bucket, ref.key, client)
    assert ref.etag is not None and ref.size is not None
    info = _download_once(ref, ref.etag, ref.size, store, client, _Transfer(), on_progress, check_md5_etag, check)
    log.info("blob fetched", source=ref.url, digest=info.digest, size=info.size, transferred=info.transferred)
    return info
