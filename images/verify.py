"""Verify a blob before anything touches a device: checksum, format, and a full read of its
tar structure (never extracting anything).

    verified = verify_blob(store.path(digest), digest, limits)
    verified.format, verified.entries, verified.uncompressed_bytes

The tar is parsed by `tarfile` in stream mode ("r|"), the way the unpacker reads it. In
front of tarfile sits TarStreamGuard, which follows the same header structure as the
bytes go by and stops what tarfile itself would swallow whole: a pax or GNU long-name
record of gigabytes (tarfile reads those into memory), sparse members whose layout it
does not model, and a missing end-of-archive marker (tarfile treats a truncation at a
header boundary as a normal end). Bytes after the end marker must be zeros, so no other
parser can find members that this one did not check.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from images.blobstore import CHUNK_SIZE, check_digest, hash_file
from images.formats import (
    ARCHIVE_FORMATS,
    BLOCK,
    DEFAULT_LIMITS,
    REGULAR_TYPES,
    ZERO_BLOCK,
    Limits,
    header_name,
    open_layer_stream,
    padded,
    parse_number,
    parse_pax_records,
    sniff_format,
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
    """A read-through wrapper that follows tar headers as tarfile reads them and raises
    PermanentError on oversized metadata, unsupported member kinds, or trailing data."""

    def __init__(self, raw: BinaryIO, limits: Limits) -> None:
        self._raw = raw
        self._limits = limits
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
        data = self._raw.read(CHUNK_SIZE if size is None or size < 0 else size)
        self._observe(data)
        return data

    def _observe(self, data: bytes) -> None:
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
        is_dir = kind == b"5" or (kind == b"\0" and header_name(block).endswith("/"))
        carries_data = (kind in REGULAR_TYPES and not is_dir) or kind not in SUPPORTED_MEMBER_TYPES
        if not carries_data and size:
            # tarfile would not skip these bytes; refusing keeps both parsers in step.
            raise PermanentError(f"truncated or corrupt tar: {header_name(block)!r} is not a file but carries data")
        self._skip = padded(size) if carries_data else 0

    def _finish_metadata(self) -> None:
        kind, data = self._meta_type, bytes(self._meta)
        self._meta_type = None
        if kind in (b"L", b"K"):
            if len(data.split(b"\0", 1)[0]) > self._limits.max_path_bytes:
                raise PermanentError(f"path too long: GNU long name of {len(data)} bytes")
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
        if "size" in records:
            try:
                self._pax_size = int(records["size"])
            except ValueError:
                raise PermanentError("truncated or corrupt tar: bad pax size") from None
            if self._pax_size < 0:
                raise PermanentError("truncated or corrupt tar: negative pax size")


def _check_member(member: tarfile.TarInfo, limits: Limits) -> None:
    for label, value in (("path", member.name), ("link target", member.linkname)):
        if len(value.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
            raise PermanentError(f"path too long: {label} of {value[:64]!r}... is over {limits.max_path_bytes} bytes")
    if member.size > limits.max_entry_bytes:
        raise PermanentError(f"entry too large: {member.name!r} is {member.size} bytes")


def read_tar_structure(stream: BinaryIO, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Read a tar stream to its end through TarStreamGuard and tarfile ("r|");
    returns (entries, bytes read). Raises PermanentError when truncated, corrupt or over limits."""
    guard = TarStreamGuard(stream, limits)
    entries = 0
    try:
        with tarfile.open(fileobj=cast(Any, guard), mode="r|") as archive:
            for member in archive:
                entries += 1
                if entries > limits.max_entries:
                    raise PermanentError(f"too many entries: more than {limits.max_entries}")
                _check_member(member, limits)
    except tarfile.TarError as exc:
        raise PermanentError(f"truncated or corrupt tar: {exc}") from None
    # Drain what follows the end marker: it must be zeros, and reading it checks the
    # compressed stream to its end (gzip CRC and length, complete zstd frames).
    while guard.read(CHUNK_SIZE):
        pass
    if not guard.saw_end:
        raise PermanentError("truncated or corrupt tar: archive ends without an end-of-archive marker")
    if entries != guard.entries:
        raise PermanentError(f"truncated or corrupt tar: {entries} members parsed but {guard.entries} headers seen")
    return entries, guard.position


def verify_blob(path: Path, expected_digest: str, limits: Limits = DEFAULT_LIMITS) -> VerifiedBlob:
    """Recompute the blob's digest (mismatch: PermanentError "checksum mismatch ..."), sniff its
    format, and read its whole tar structure within `limits`. Extracts nothing."""
    path = Path(path)
    check_digest(expected_digest)
    digest, _ = hash_file(path)
    if digest != expected_digest:
        raise PermanentError(f"checksum mismatch: {path.name}: expected {expected_digest}, got {digest}")
    fmt = sniff_format(path, limits)
    layer_fmt = "tar" if fmt in ARCHIVE_FORMATS else fmt
    with open_layer_stream(path, layer_fmt, limits) as stream:
        entries, size = read_tar_structure(stream, limits)
    log.info("blob verified", digest=digest, format=fmt, entries=entries, uncompressed_bytes=size)
    return VerifiedBlob(digest=digest, format=fmt, entries=entries, uncompressed_bytes=size)
