"""The content-addressed blob store: `<state-dir>/blobs/sha256/<hex>`, written atomically.

A blob is written to `<state-dir>/blobs/tmp/<name>.part` while its sha256 is computed,
fsynced, renamed to its digest's path, and the directory fsynced: a file under
`sha256/` is therefore always complete and its name is its checksum.

Which source (s3 url + ETag) holds which digest is not kept here: the catalog's
`layers` table (digest, source, etag, verified_at) is that index. The workflow looks
the source up there and passes the known digest to `fetch_blob`, which then asks only
`BlobStore.has(digest)`. One index, in one database transaction with the rest of the
catalog, instead of a JSON sidecar that could drift from it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from support.durable import fsync_dir
from support.errors import PermanentError
from support.log import get_logger
from support.paths import blob_dir

log = get_logger("images.blobstore", component="blobstore")

DIGEST_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK_SIZE = 1024 * 1024


class StreamCheck(Protocol):
    """Checks fed every byte of a blob once, as it is written (images.verify.BlobCheck):
    `feed` may raise PermanentError at once; `finish` raises or returns the findings."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> object: ...


@dataclass(frozen=True)
class BlobInfo:
    """A blob in the store. `transferred` counts the bytes fetched over the wire for it
    by the call that returned this (0 when it was already present); `findings` is what the
    writer's StreamCheck found (None when there was none, or the blob was already present)."""

    digest: str
    size: int
    path: Path
    transferred: int = 0
    findings: object | None = None


def check_digest(digest: str) -> str:
    """`digest` if it is "sha256:<64 lowercase hex>", else PermanentError."""
    if not DIGEST_PATTERN.match(digest):
        raise PermanentError(f"invalid digest: {digest!r}")
    return digest


def hash_file(path: Path, *, limit: int | None = None) -> tuple[str, int]:
    """("sha256:<hex>", bytes read) of the file's first `limit` bytes (all when None)."""
    hasher = hashlib.sha256()
    total = 0
    with open(path, "rb") as fh:
        while limit is None or total < limit:
            want = CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - total)
            chunk = fh.read(want)
            if not chunk:
                break
            hasher.update(chunk)
            total += len(chunk)
    return "sha256:" + hasher.hexdigest(), total


class BlobStore:
    """Blobs by digest under `<state_dir>/blobs/`; temp files under `blobs/tmp/`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.blob_dir = blob_dir(self.state_dir)
        self.tmp_dir = self.state_dir / "blobs" / "tmp"

    def ensure_dirs(self) -> None:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob with `digest` lives (whether or not it is there)."""
        return self.blob_dir / check_digest(digest).split(":", 1)[1]

    def has(self, digest: str) -> bool:
        """True when the complete blob is in the store (files there are complete by construction)."""
        return self.path(digest).is_file()

    def info(self, digest: str) -> BlobInfo | None:
        """The stored blob's BlobInfo, or None when it is absent."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return BlobInfo(digest=digest, size=size, path=path)

    def tmp_path(self, name: str) -> Path:
        """A temp file path for a download; a stable `name` lets a retry resume it."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad temp name {name!r}")
        return self.tmp_dir / f"{name}.part"

    def writer(self, name: str | None = None, *, resume: bool = False, with_md5: bool = False,
               check: Callable[[], StreamCheck] | None = None) -> BlobWriter:
        """A BlobWriter on temp file `name` (a fresh unique one when None), its bytes fed to
        a StreamCheck made by `check` (a new one when the writer restarts)."""
        self.ensure_dirs()
        return BlobWriter(self, self.tmp_path(name or uuid.uuid4().hex), resume=resume, with_md5=with_md5,
                          check=check)

    def remove_stale_tmp(self, older_than_seconds: float = 0.0) -> list[Path]:
        """Delete temp files not modified for `older_than_seconds`; returns what was removed.
        Call it at startup, when no download is running."""
        removed: list[Path] = []
        if not self.tmp_dir.is_dir():
            return removed
        cutoff = time.time() - older_than_seconds
        for entry in self.tmp_dir.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    removed.append(entry)
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed stale temp files", count=len(removed))
        return removed


class BlobWriter:
    """Streams bytes into a temp file while hashing them (and feeding its StreamCheck);
    `commit()` moves the result into the store under its digest once both pass. With
    `resume=True` an existing temp file is kept and its bytes re-hashed (and re-checked),
    so writing continues at `offset`."""

    def __init__(self, store: BlobStore, tmp_path: Path, *, resume: bool, with_md5: bool = False,
                 check: Callable[[], StreamCheck] | None = None) -> None:
        self.store = store
        self.tmp_path = tmp_path
        self._with_md5 = with_md5
        self._make_check = check
        self._check = check() if check else None
        self._hasher = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
        self.offset = 0
        self.written = 0  # bytes written by this writer (excludes a resumed prefix)
        if resume and tmp_path.exists():
            self._fh: BinaryIO = open(tmp_path, "ab")  # noqa: SIM115 - closed in commit/abort
            try:
                with open(tmp_path, "rb") as fh:
                    while chunk := fh.read(CHUNK_SIZE):
                        self._update(chunk)
                        self.offset += len(chunk)
            except BaseException:
                self.abort()  # a kept prefix that fails the checks is worth nothing
                raise
        else:
            self._fh = open(tmp_path, "wb")  # noqa: SIM115

    @property
    def size(self) -> int:
        return self.offset + self.written

    def _update(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        if self._check is not None:
            self._check.feed(chunk)

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._update(chunk)
        self.written += len(chunk)

    def restart(self) -> None:
        """Throw away everything written so far (e.g. the server ignored a Range request)."""
        self._fh.seek(0)
        self._fh.truncate()
        self._hasher = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if self._with_md5 else None
        self._check = self._make_check() if self._make_check else None
        self.offset = 0
        self.written = 0

    def md5_hex(self) -> str | None:
        """The MD5 of everything written (S3's ETag of a single-part upload), if asked for."""
        return self._md5.hexdigest() if self._md5 is not None else None

    def digest(self) -> str:
        return "sha256:" + self._hasher.hexdigest()

    def keep(self) -> None:
        """Flush and close, leaving the temp file for a later resume."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def abort(self) -> None:
        """Close and delete the temp file."""
        if not self._fh.closed:
            self._fh.close()
        self.tmp_path.unlink(missing_ok=True)

    def commit(self, expected_digest: str | None = None, *, transferred: int | None = None) -> BlobInfo:
        """Finish the StreamCheck, check `expected_digest` if given, fsync, and rename into
        the store atomically. A failed check or digest deletes the temp file: nothing that
        fails is ever under its digest's name."""
        try:
            findings = self._check.finish() if self._check is not None else None
            digest = self.digest()
            if expected_digest is not None and digest != expected_digest:
                raise PermanentError(f"checksum mismatch: expected {expected_digest}, got {digest}")
        except BaseException:
            self.abort()
            raise
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        final = self.store.path(digest)
        # Same digest means same bytes: if another writer got there first, keep theirs.
        os.replace(self.tmp_path, final)
        fsync_dir(final.parent)
        return BlobInfo(
            digest=digest,
            size=self.size,
            path=final,
            transferred=self.written if transferred is None else transferred,
            findings=findings,
        )

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An exception leaves a resumable temp file only if the caller asked to keep it.
        if not self._fh.closed:
            self.abort()
