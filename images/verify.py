"""Verify a blob before anything touches a device: checksum, format, and its whole tar
structure (never extracting anything), in the one read of it as it streams in.

    writer = store.writer(check=lambda: BlobCheck(size, limits))   # fetch_blob does this
    ... writer.write(chunk) ...                                     # every check as bytes pass
    info = writer.commit()          # PermanentError, temp file gone, unless everything passed
    info.findings.format, .entries, .uncompressed_bytes

    verify_blob(path, digest, limits)   # the same checks over a stored file (tests, old jobs)

BlobCheck is push-based: it sniffs the format from the first bytes, decompresses gzip or
zstd in bounded pieces with the decoders images/formats.py also gives the unpacker (a bomb
stops at the limit, not in memory), and pushes the tar bytes into images/tardecoder.py's
TarStreamGuard: the one tar decoder, which the unpacker and the archive listing pull from.
So everything the unpacker would refuse for its structure (a bad header, pax record or
number, oversized metadata or paths, too many or too large entries, a sparse map that does
not add up, a stream that ends without its end-of-archive block) is refused here, before
the blob is stored. Bytes after the end-of-archive block are read (the compressed stream
must be whole) but never interpreted, by this check or by the unpacker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from images.blobstore import CHUNK_SIZE, check_digest
from images.formats import (
    BLOCK,
    DEFAULT_LIMITS,
    GZIP_MAGIC,
    ZERO_BLOCK,
    DecompressionBound,
    Decoder,
    Limits,
    decoder_for,
    describe_not_tar,
    is_zstd,
    tar_limits,
)
from images.tardecoder import TarStreamGuard, checksum_ok
from support.errors import PermanentError
from support.log import get_logger

log = get_logger("images.verify", component="verify")


@dataclass(frozen=True)
class StreamFindings:
    """What the streaming checks of a blob found (BlobInfo.findings)."""

    format: str
    entries: int
    uncompressed_bytes: int


class BlobCheck:
    """Every check of verification, fed the blob's bytes once as they are written
    (BlobStore.writer(check=...)): format by content, bounded decompression, the tar
    structure within `limits`. `finish()` returns StreamFindings or raises PermanentError.
    `size` is the blob's full size, for the decompression-ratio bound."""

    def __init__(self, size: int, limits: Limits = DEFAULT_LIMITS) -> None:
        self._size = size
        self._limits = limits
        self._head = bytearray()  # the first bytes, until the format is known
        self._decoder: Decoder | None = None
        self._bound: DecompressionBound | None = None
        self._first_block = bytearray()  # of the decompressed stream, to tell a tar
        self._tar = TarStreamGuard(tar_limits(limits))
        self._fed = 0
        self.format: str | None = None

    def feed(self, chunk: bytes) -> None:
        self._fed += len(chunk)
        if self._decoder is None:
            self._head += chunk
            if len(self._head) >= 2 * BLOCK:
                self._start(bytes(self._head))
            return
        self._decode(chunk)

    def finish(self) -> StreamFindings:
        if self._decoder is None:
            if not self._fed:
                raise PermanentError("unsupported format: empty file")
            self._start(bytes(self._head))
        assert self._decoder is not None and self.format is not None
        for _ in self._decoder.finish():
            pass
        if self.format != "tar" and len(self._first_block) < BLOCK:
            self._check_first_block(bytes(self._first_block))
        self._tar.finish()
        fmt = self.format
        if fmt == "tar" and {"oci-layout", "index.json"} <= self._tar.roots:
            fmt = "oci-layout"
        elif fmt == "tar" and "manifest.json" in self._tar.roots:
            fmt = "docker-save"
        return StreamFindings(format=fmt, entries=self._tar.entries, uncompressed_bytes=self._tar.position)

    def _start(self, head: bytes) -> None:
        self._head = bytearray()
        if head.startswith(GZIP_MAGIC):
            self.format = "tar+gzip"
        elif is_zstd(head):
            self.format = "tar+zstd"
        else:
            if head[:2 * BLOCK] != bytes(2 * BLOCK) and not checksum_ok(head[:BLOCK]):
                raise PermanentError(f"unsupported format: {describe_not_tar(head)}")
            self.format = "tar"
        self._decoder = decoder_for(self.format, self._limits)
        self._bound = DecompressionBound(None if self.format == "tar" else self._size, self._limits)
        self._decode(head)

    def _decode(self, data: bytes) -> None:
        assert self._decoder is not None and self._bound is not None
        for piece in self._decoder.feed(data):
            self._bound.add(len(piece))
            if self.format != "tar" and len(self._first_block) < BLOCK:
                self._first_block += piece[:BLOCK - len(self._first_block)]
                if len(self._first_block) == BLOCK:
                    self._check_first_block(bytes(self._first_block))
            self._tar.feed(piece)

    def _check_first_block(self, first: bytes) -> None:
        if not checksum_ok(first) and first != ZERO_BLOCK:
            what = "gzip" if self.format == "tar+gzip" else "zstd"
            raise PermanentError(f"unsupported format: {what}-compressed data that is not a tar")


@dataclass(frozen=True)
class VerifiedBlob:
    """What verification learned: the digest, the format, entry count and tar size."""

    digest: str
    format: str
    entries: int
    uncompressed_bytes: int


def verify_blob(path: Path, expected_digest: str, limits: Limits = DEFAULT_LIMITS) -> VerifiedBlob:
    """The streaming checks over a stored file: its digest (mismatch: PermanentError
    "checksum mismatch ..."), format, and whole tar structure within `limits`. The product
    checks blobs as they are written instead; this is for blobs that were not (a job
    interrupted in verifying before the streaming checks existed) and for tests."""
    path = Path(path)
    check_digest(expected_digest)
    check = BlobCheck(path.stat().st_size, limits)
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            hasher.update(chunk)
            check.feed(chunk)
    digest = "sha256:" + hasher.hexdigest()
    if digest != expected_digest:
        raise PermanentError(f"checksum mismatch: {path.name}: expected {expected_digest}, got {digest}")
    found = check.finish()
    log.info("blob verified", digest=digest, format=found.format, entries=found.entries,
             uncompressed_bytes=found.uncompressed_bytes)
    return VerifiedBlob(digest=digest, format=found.format, entries=found.entries,
                        uncompressed_bytes=found.uncompressed_bytes)
