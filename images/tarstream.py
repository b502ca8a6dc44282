"""A streaming tar reader for the unpacker: ustar, pax and GNU long names, one pass.

    reader = TarReader(stream)
    for member in reader.members():
        for view in reader.data(member):      # a regular file's bytes, as memoryviews
            ...

It parses headers exactly as `tarfile` does in stream mode (the verifier reads the same
bytes with tarfile, so both see the same members: tests/test_tarstream.py), but hands
member data out as views of large reads instead of copying it through tarfile's 10 KiB
stream buffer, which was half the unpacker's time. In the same pass it refuses what
images/verify.py's TarStreamGuard refuses in front of tarfile, so the unpacker needs no
second parser following the stream (that was a third of its time per entry): a bad
header checksum, a pax or GNU long-name record over `max_metadata_bytes` (refused before
it is read), GNU sparse members, a global pax header setting path, linkpath or size, a
member that is not a file but carries data, and, in `finish()`, a stream that ends
without an end-of-archive block or has non-zero bytes after it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from images.formats import tar_checksum_ok

BLOCK = 512
READ_SIZE = 1 << 20
ZERO_BLOCK = bytes(BLOCK)
NO_CHECKSUM = bytes(8)
NUL = b"\0"
REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES (7: contiguous)
KNOWN = (*REGULAR, b"1", b"2", b"3", b"4", b"5", b"6")
PAX_NUMBERS = {"uid": int, "gid": int, "size": int, "mtime": float}
ENCODING, ERRORS = "utf-8", "surrogateescape"
# name mode uid gid size mtime chksum type linkname magic+version uname gname devmajor devminor prefix
HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s")


class TarFormatError(ValueError):
    """The bytes are not a well-formed tar (checksum, truncation, a bad field)."""


class TarRefused(ValueError):
    """A well-formed tar uses something refused (sparse members, oversized metadata, ...)."""


@dataclass(slots=True)
class Member:
    """One tar member, with the fields and predicates the unpacker uses (as tarfile.TarInfo)."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    linkname: str
    devmajor: int = 0
    devminor: int = 0
    pax_headers: dict[str, str] = field(default_factory=dict)

    def isreg(self) -> bool:
        return self.type in REGULAR

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def isfifo(self) -> bool:
        return self.type == b"6"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"

    def issparse(self) -> bool:
        return self.type == b"S"

    def carries_data(self) -> bool:
        """tarfile skips `size` bytes after regular files and after types it does not know."""
        return self.isreg() or self.type not in KNOWN


def _nts(data: bytes) -> str:
    end = data.find(b"\0")
    return (data if end < 0 else data[:end]).decode(ENCODING, ERRORS)


def _nti(data: bytes) -> int:
    """A numeric field as tarfile reads it: octal text up to the first NUL (surrounding
    spaces allowed, empty is 0), or base-256 (0x80 positive, 0xff negative)."""
    if data[0] in (0x80, 0xFF):
        value = int.from_bytes(data[1:], "big")
        return value - (1 << (8 * (len(data) - 1))) if data[0] == 0xFF else value
    text = data.partition(b"\0")[0]
    try:
        return int(text, 8)
    except ValueError:
        if not text.strip():
            return 0
        raise TarFormatError(f"invalid header: bad number {data!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """`<len> <key>=<value>\\n` records (tarfile's reading, values decoded with surrogateescape)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("invalid header: malformed pax record") from None
        record = data[space + 1: pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("invalid header: malformed pax record")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode(ENCODING, ERRORS)] = value.decode(ENCODING, ERRORS)
        pos += length
    return records


def _checked_pax(records: dict[str, str], kind: bytes, max_path: int) -> dict[str, str]:
    """Refuse what the verifier refuses in pax records: sparse maps, paths over max_path,
    and global records that would rename or resize every member after them."""
    if any(key.startswith("GNU.sparse") for key in records):
        raise TarRefused("unsupported tar feature: GNU sparse member (pax)")
    for key in ("path", "linkpath"):
        if len(records.get(key, "").encode(ENCODING, ERRORS)) > max_path:
            raise TarRefused(f"path too long: pax {key} of {len(records[key])} characters")
    if kind == b"g":
        unsafe = [key for key in ("size", "path", "linkpath") if key in records]
        if unsafe:
            raise TarRefused(f"unsupported tar feature: global pax header sets {', '.join(unsafe)}")
    return records


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class TarReader:
    """Members and their data from one stream, read in READ_SIZE pieces."""

    def __init__(self, raw: BinaryIO, read_size: int = READ_SIZE, *, max_metadata_bytes: int = 1 << 20,
                 max_path_bytes: int = 4096, verify_checksums: bool = True) -> None:
        """`verify_checksums=False` only where every header already had its checksum checked
        before it reaches this reader (behind a TarStreamGuard, which checks each read whole)."""
        self._raw = raw
        self._verify_checksums = verify_checksums
        self._max_metadata = max_metadata_bytes
        self._max_path = max_path_bytes
        self._read_size = read_size
        self.position = 0  # bytes read from the stream
        self.entries = 0  # members yielded
        self.saw_end = False
        self._chunk = memoryview(b"")
        self._offset = 0
        self._pending = 0  # data and padding of the last member not yet consumed
        self._data_left = 0  # of which data

    # -- bytes ----------------------------------------------------------------------------

    def _refill(self) -> bool:
        data = self._raw.read(self._read_size)
        self._chunk, self._offset = memoryview(data), 0
        self.position += len(data)
        return bool(data)

    def finish(self) -> None:
        """After members(): the stream must have ended with an end-of-archive block, and all
        that follows it (read to the end: it also checks a compressed stream's trailer)
        must be zeros, so no other parser can find members this one did not check."""
        if not self.saw_end:
            raise TarFormatError("no end-of-archive marker")
        while True:
            rest = bytes(self._chunk[self._offset:])
            if rest.count(0) != len(rest):
                at = self.position - len(self._chunk) + self._offset + next(i for i, b in enumerate(rest) if b)
                raise TarRefused(f"truncated or corrupt tar: data after the end-of-archive marker at byte {at}")
            if not self._refill():
                return

    def _take(self, n: int) -> bytes:
        """Exactly `n` bytes (a copy; headers and metadata records only)."""
        parts: list[bytes] = []
        while n:
            if self._offset == len(self._chunk) and not self._refill():
                raise TarFormatError("unexpected end of data")
            piece = self._chunk[self._offset: self._offset + n]
            self._offset += len(piece)
            n -= len(piece)
            parts.append(bytes(piece))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _views(self, n: int) -> Iterator[memoryview]:
        """`n` bytes as views of the reads, no copy."""
        while n:
            if self._offset == len(self._chunk) and not self._refill():
                raise TarFormatError("unexpected end of data")
            piece = self._chunk[self._offset: self._offset + n]
            self._offset += len(piece)
            n -= len(piece)
            yield piece

    def _skip(self, n: int) -> None:
        if self._offset + n <= len(self._chunk):  # the common case: padding within this read
            self._offset += n
            return
        for _ in self._views(n):
            pass

    # -- members --------------------------------------------------------------------------

    def data(self, member: Member) -> Iterator[memoryview]:
        """The member's data (call once, right after the member is yielded)."""
        left, self._data_left = self._data_left, 0
        self._pending -= left
        yield from self._views(left)

    def small(self, member: Member) -> list[memoryview]:
        """All of a small member's data (the caller bounds the size), as one or a few views."""
        left, self._data_left = self._data_left, 0
        self._pending -= left
        start = self._offset
        if start + left <= len(self._chunk):  # the common case: within this read
            self._offset = start + left
            return [self._chunk[start: start + left]]
        return list(self._views(left))

    def pieces(self, member: Member, piece_bytes: int) -> Iterator[tuple[int, list[memoryview]]]:
        """The member's data as (offset, views) of about `piece_bytes` each, no copy: one
        pwritev apiece. (A small file within one read is one view: the common case.)"""
        left, self._data_left = self._data_left, 0
        self._pending -= left
        offset = 0
        while left:
            batch: list[memoryview] = []
            queued = 0
            while left and queued < piece_bytes:
                if self._offset == len(self._chunk) and not self._refill():
                    raise TarFormatError("unexpected end of data")
                piece = self._chunk[self._offset: self._offset + left]
                self._offset += len(piece)
                left -= len(piece)
                queued += len(piece)
                batch.append(piece)
            yield offset, batch
            offset += queued

    def members(self) -> Iterator[Member]:
        """Every member up to the end-of-archive block; raises TarFormatError on a bad header
        or a truncation. Data a caller did not read is skipped."""
        global_pax: dict[str, str] = {}
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            if self._pending:
                self._skip(self._pending)
                self._pending = self._data_left = 0
            start = self._offset
            if start + BLOCK <= len(self._chunk):  # the common case: the header is within this read
                block: bytes | memoryview = self._chunk
                self._offset = start + BLOCK
            else:
                try:
                    block, start = self._take(BLOCK), 0
                except TarFormatError:
                    return  # tarfile ends quietly at a header boundary; the guard knows better
            fields = HEADER.unpack_from(block, start)
            # A real header's checksum field is never zero: only then compare the whole block.
            if fields[6] == NO_CHECKSUM and bytes(block[start: start + BLOCK]) == ZERO_BLOCK:
                self.saw_end = True
                return
            if self._verify_checksums and not tar_checksum_ok(bytes(block[start: start + BLOCK])):
                raise TarFormatError(f"bad header checksum at byte {self.position - len(self._chunk) + start}")
            kind = fields[7]
            size = _nti(fields[4])
            if kind in (b"x", b"X", b"g", b"L", b"K"):
                if size > self._max_metadata:  # refused before a byte of it is held
                    raise TarRefused(f"truncated or corrupt tar: metadata record of {size} bytes")
                record = self._take(_padded(size))[:size]
                if kind in (b"x", b"X"):
                    pax = _checked_pax(_pax_records(record), kind, self._max_path)
                elif kind == b"g":
                    global_pax.update(_checked_pax(_pax_records(record), kind, self._max_path))
                else:
                    value = _nts(record)
                    if len(value.encode(ENCODING, ERRORS)) > self._max_path:
                        raise TarRefused(f"path too long: GNU long name of {len(record)} bytes")
                    if kind == b"L":
                        long_name = value
                    else:
                        long_link = value
                continue
            if kind == b"S":
                raise TarRefused(f"unsupported tar feature: GNU sparse member {_nts(fields[0])!r}")
            member = self._member(fields, kind, size, {**global_pax, **pax} if global_pax else pax,
                                  long_name, long_link)
            if pax:
                pax = {}
            long_name = long_link = None
            if member.carries_data():
                self._pending, self._data_left = _padded(member.size), member.size
            elif member.size:  # tarfile would not skip these bytes: they would be read as headers
                raise TarFormatError(f"{member.name!r} is not a file but carries data")
            self.entries += 1
            yield member

    @staticmethod
    def _member(fields: tuple[bytes, ...], kind: bytes, size: int, pax: dict[str, str], long_name: str | None,
                long_link: str | None) -> Member:
        name = _nts(fields[0])
        if kind == b"\0" and name.endswith("/"):  # old V7: a directory is a file named with "/"
            kind = b"5"
        if fields[14][0] and kind != b"S":  # a ustar prefix
            name = _nts(fields[14]) + "/" + name
        try:  # plain octal, the common case, without a call per field
            mode, uid, gid, mtime = (int(fields[1].partition(NUL)[0], 8), int(fields[2].partition(NUL)[0], 8),
                                     int(fields[3].partition(NUL)[0], 8), int(fields[5].partition(NUL)[0], 8))
        except ValueError:  # empty, base-256, or garbage (which _nti refuses)
            mode, uid, gid, mtime = _nti(fields[1]), _nti(fields[2]), _nti(fields[3]), _nti(fields[5])
        if long_link is None:
            long_link = _nts(fields[8]) if fields[8][0] else ""
        member = Member(name if long_name is None else long_name, kind, mode, uid, gid, size, mtime, long_link,
                        pax_headers=pax)
        if kind in (b"3", b"4"):
            member.devmajor, member.devminor = _nti(fields[12]), _nti(fields[13])
        if pax:
            _apply_pax(member, pax)
        return member


def _apply_pax(member: Member, pax: dict[str, str]) -> None:
    """pax records override the header's fields (tarfile's _apply_pax_info)."""
    for key, value in pax.items():
        if key == "path":
            member.name = value
        elif key == "linkpath":
            member.linkname = value
        elif key in PAX_NUMBERS:
            try:
                number = PAX_NUMBERS[key](value)
            except ValueError:
                number = 0
            if key == "mtime":
                member.mtime = number
            else:
                setattr(member, key, int(number) if math.isfinite(number) else 0)
