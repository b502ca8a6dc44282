"""Verify a blob before anything touches a device: checksum, format, and its whole tar
structure (never extracting anything), in the one read of it as it streams in.

    writer = store.writer(check=lambda: BlobCheck(size, limits))   # fetch_blob does this
    ... writer.write(chunk) ...                                     # every check as bytes pass
    info = writer.commit()          # PermanentError, temp file gone, unless everything passed
    info.findings.format, .entries, .uncompressed_bytes

    verify_blob(path, digest, limits)   # the same checks over a stored file (tests, old jobs)

BlobCheck is push-based: it sniffs the format from the first bytes, decompresses gzip or
zstd in bounded pieces (a bomb stops at the limit, not in memory), and feeds the tar bytes
to TarStreamGuard, which follows the tar header structure as the bytes go by: header
checksums, metadata records (a pax or GNU long-name record of gigabytes is refused before
it is buffered), path lengths, entry counts and sizes, unsupported member kinds, a missing
end-of-archive marker (a truncation at a header boundary is still a truncation), and bytes
after the end marker, which must be zeros so no other parser can find members this one did
not check. The unpacker parses the same bytes again with tarfile, behind the same guard.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from images.blobstore import CHUNK_SIZE, check_digest
from images.formats import (
    BLOCK,
    DEFAULT_LIMITS,
    GZIP_MAGIC,
    REGULAR_TYPES,
    ZERO_BLOCK,
    ZSTD_INPUT_SLICE,
    DecompressionBound,
    Limits,
    describe_not_tar,
    header_name,
    is_zstd,
    normalize_member_name,
    padded,
    parse_number,
    parse_pax_records,
    tar_checksum_ok,
)
from support.errors import PermanentError
from support.log import get_logger

log = get_logger("images.verify", component="verify")

SUPPORTED_MEMBER_TYPES = (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6")
UNSAFE_GLOBAL_KEYS = ("size", "path", "linkpath")


@dataclass(frozen=True)
class VerifiedBlob:
    """What verification learned: the digest, the format, entry count and tar size."""

    digest: str
    format: str
    entries: int
    uncompressed_bytes: int


class TarStreamGuard:
    """Follows tar headers as the bytes go by and raises PermanentError on oversized
    metadata, unsupported member kinds, or trailing data: pushed (`feed`, then `finish`),
    or as a read-through wrapper in front of tarfile (`read`). With `names=True` it also
    checks each member's final name and link target against max_path_bytes and keeps the
    top-level names (`roots`: how an OCI layout or docker save archive is recognized)."""

    def __init__(self, raw: BinaryIO | None, limits: Limits, *, names: bool = False) -> None:
        self._raw = raw
        self._limits = limits
        self._names = names
        self._overrides: dict[str, str] = {}  # path/linkpath from pax or GNU long records
        self.roots: set[str] = set()
        self._header = bytearray()
        self._skip = 0  # bytes of member data (and padding) still to pass
        self._meta_type: bytes | None = None
        self._meta_size = 0
        self._meta = bytearray()
        self._pax_size: int | None = None
        self.position = 0
        self.entries = 0
        self.saw_end = False

    def read(self, size: int = -1) -> bytes:
        assert self._raw is not None
        data = self._raw.read(CHUNK_SIZE if size is None or size < 0 else size)
        self.feed(data)
        return data

    def finish(self) -> None:
        """The stream ended: PermanentError unless it ended after an end-of-archive marker."""
        if self.saw_end:
            return
        if self._skip or self._header:
            raise PermanentError(f"truncated or corrupt tar: archive ends inside a member at byte {self.position}")
        raise PermanentError("truncated or corrupt tar: archive ends without an end-of-archive marker")

    def feed(self, data: bytes) -> None:
        """Follow the next bytes of the tar stream."""
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self.saw_end:
                if any(view[i:]):
                    raise PermanentError(
                        f"truncated or corrupt tar: data after the end-of-archive marker at byte {self.position + i}"
                    )
                break
            if self._skip:
                take = min(self._skip, len(view) - i)
                if self._meta_type is not None and len(self._meta) < self._meta_size:
                    self._meta += view[i: i + min(take, self._meta_size - len(self._meta))]
                self._skip -= take
                i += take
                if not self._skip and self._meta_type is not None:
                    self._finish_metadata()
                continue
            take = min(BLOCK - len(self._header), len(view) - i)
            self._header += view[i: i + take]
            i += take
            if len(self._header) == BLOCK:
                self._on_header(bytes(self._header), self.position + i - BLOCK)
                self._header.clear()
        self.position += len(view)

    def _on_header(self, block: bytes, at: int) -> None:
        if block == ZERO_BLOCK:
            self.saw_end = True
            return
        if not tar_checksum_ok(block):
            raise PermanentError(f"truncated or corrupt tar: bad header checksum at byte {at}")
        kind = block[156:157]
        size = parse_number(block[124:136])
        if kind in (b"x", b"X", b"g", b"L", b"K"):
            if size > self._limits.max_metadata_bytes:
                raise PermanentError(f"truncated or corrupt tar: metadata record of {size} bytes at byte {at}")
            self._meta_type, self._meta_size = kind, size
            self._meta.clear()
            self._skip = padded(size)
            if not self._skip:
                self._finish_metadata()
            return
        if kind == b"S":
            raise PermanentError(f"unsupported tar feature: GNU sparse member {header_name(block)!r}")
        if self._pax_size is not None:
            size, self._pax_size = self._pax_size, None
        self.entries += 1
        if self.entries > self._limits.max_entries:
            raise PermanentError(f"too many entries: more than {self._limits.max_entries}")
        if size > self._limits.max_entry_bytes:
            raise PermanentError(f"entry too large: {header_name(block)!r} is {size} bytes")
        if self._names:
            self._check_names(block)
        is_dir = kind == b"5" or (kind == b"\0" and header_name(block).endswith("/"))
        carries_data = (kind in REGULAR_TYPES and not is_dir) or kind not in SUPPORTED_MEMBER_TYPES
        if not carries_data and size:
            # tarfile would not skip these bytes; refusing keeps both parsers in step.
            raise PermanentError(f"truncated or corrupt tar: {header_name(block)!r} is not a file but carries data")
        self._skip = padded(size) if carries_data else 0

    def _check_names(self, block: bytes) -> None:
        name = self._overrides.get("path", header_name(block))
        link = self._overrides.get("linkpath", block[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
        self._overrides = {}
        for label, value in (("path", name), ("link target", link)):
            if len(value.encode("utf-8", "surrogateescape")) > self._limits.max_path_bytes:
                raise PermanentError(f"path too long: {label} of {value[:64]!r}... is over "
                                     f"{self._limits.max_path_bytes} bytes")
        root = normalize_member_name(name)
        if root and "/" not in root:
            self.roots.add(root)

    def _finish_metadata(self) -> None:
        kind, data = self._meta_type, bytes(self._meta)
        self._meta_type = None
        if kind in (b"L", b"K"):
            if len(data.split(b"\0", 1)[0]) > self._limits.max_path_bytes:
                raise PermanentError(f"path too long: GNU long name of {len(data)} bytes")
            key = "path" if kind == b"L" else "linkpath"
            self._overrides.setdefault(key, data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
            return
        records = parse_pax_records(data)
        if any(key.startswith("GNU.sparse") for key in records):
            raise PermanentError("unsupported tar feature: GNU sparse member (pax)")
        if kind == b"g":
            unsafe = [key for key in UNSAFE_GLOBAL_KEYS if key in records]
            if unsafe:
                raise PermanentError(f"unsupported tar feature: global pax header sets {', '.join(unsafe)}")
            return
        for key in ("path", "linkpath"):
            if len(records.get(key, "").encode("utf-8", "surrogateescape")) > self._limits.max_path_bytes:
                raise PermanentError(f"path too long: pax {key} of {len(records[key])} characters")
            if key in records:
                self._overrides[key] = records[key]  # pax wins over a GNU long name
        if "size" in records:
            try:
                self._pax_size = int(records["size"])
            except ValueError:
                raise PermanentError("truncated or corrupt tar: bad pax size") from None
            if self._pax_size < 0:
                raise PermanentError("truncated or corrupt tar: negative pax size")


class _GzipDecoder:
    """gzip members (one or several, concatenated) decompressed in bounded pieces."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            self._started = True
            try:
                piece = self._d.decompress(data, CHUNK_SIZE)
            except zlib.error as exc:
                raise PermanentError(f"truncated or corrupt gzip: {exc}") from None
            if piece:
                yield piece
            if self._d.eof:  # the member ended; what follows must be another member
                data = self._d.unused_data
                self._d = zlib.decompressobj(wbits=31)
                self._started = False
            else:
                data = self._d.unconsumed_tail

    def finish(self) -> None:
        if self._started:
            raise PermanentError("truncated or corrupt gzip: Compressed file ended before the end-of-stream "
                                 "marker was reached")


class _ZstdDecoder:
    """zstd frames decompressed slice by slice (a 1 KiB slice expands to at most ~32 MiB)."""

    def __init__(self, max_window_size: int) -> None:
        self._dctx = zstandard.ZstdDecompressor(max_window_size=max_window_size)
        self._dobj = self._dctx.decompressobj()
        self._in_frame = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        for at in range(0, len(data), ZSTD_INPUT_SLICE):
            piece = data[at: at + ZSTD_INPUT_SLICE]
            while piece:
                self._in_frame = True
                try:
                    out = self._dobj.decompress(piece)
                except zstandard.ZstdError as exc:
                    raise PermanentError(f"truncated or corrupt zstd: {exc}") from None
                if out:
                    yield out
                if not self._dobj.eof:
                    break
                piece = self._dobj.unused_data  # the frame ended: the rest starts the next one
                self._dobj = self._dctx.decompressobj()
                self._in_frame = False

    def finish(self) -> None:
        if self._in_frame:
            raise PermanentError("truncated or corrupt zstd: stream ends inside a frame")


class _PlainDecoder:
    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def finish(self) -> None:
        pass


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
        self._decoder: _GzipDecoder | _ZstdDecoder | _PlainDecoder | None = None
        self._bound: DecompressionBound | None = None
        self._first_block = bytearray()  # of the decompressed stream, to tell a tar
        self._tar = TarStreamGuard(None, limits, names=True)
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
        self._decoder.finish()
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
            self.format, self._decoder = "tar+gzip", _GzipDecoder()
        elif is_zstd(head):
            self.format, self._decoder = "tar+zstd", _ZstdDecoder(self._limits.zstd_max_window_bytes)
        else:
            if head[:2 * BLOCK] != bytes(2 * BLOCK) and not tar_checksum_ok(head[:BLOCK]):
                raise PermanentError(f"unsupported format: {describe_not_tar(head)}")
            self.format, self._decoder = "tar", _PlainDecoder()
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
        if not tar_checksum_ok(first) and first != ZERO_BLOCK:
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
