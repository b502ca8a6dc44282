"""The one tar decoder: every reading of untrusted tar bytes goes through this module.

    decoder = TarDecoder(TarLimits(...))        # headers, pax and GNU records, sparse maps
    step = decoder.feed(exactly_decoder_want_bytes)   # -> Member, END, or None (feed more)

    reader = TarReader(stream)                   # pull: the unpacker, the archive listing
    for member in reader.members():
        for offset, views in reader.pieces(member, 1 << 20):   # data at its file offset
            ...
    reader.finish()

    guard = TarStreamGuard(limits)               # push: the download-time check
    guard.feed(chunk) ...; guard.finish()

`TarDecoder` holds every rule about what the bytes mean, and the two drivers only move
bytes: the download-time check (images/verify.py) pushes them as they arrive, the unpacker
(images/unpack.py) and the OCI layout / docker save listing (images/formats.py) pull them.
So the check and the extractor can never read a header two ways.

The rules are GNU tar 1.34's (docs/unpacker.md lists each one and where we differ):

* numbers: octal after optional blanks, ended by NUL, a blank or the field's end; base-256
  when the first byte is 0x80 (positive) or 0xFF (negative, two's complement); a field of
  blanks, trailing garbage, or a value outside the field's type (a negative size or uid)
  is corrupt. An empty field (NUL first) is 0.
* the header checksum: the unsigned or the signed sum; an all-zero block ends the archive,
  and nothing after it is read (concatenated archives, archivers that pad).
* names: the ustar prefix is joined when the magic is "ustar\\0" (POSIX ustar and pax, not
  the old GNU format, whose prefix bytes hold times); a GNU long name (type L) or long link
  (K) replaces the header's; a pax `path`/`linkpath` replaces both; GNU.sparse.name wins
  over everything. A regular member whose name ends in "/" is a directory (V7).
* pax records: local (x, X) for the next member, global (g) for every later member until
  the next global header replaces them; local records override global ones. Numbers:
  `size`, `uid`, `gid`, `SCHILY.dev*` must be decimal digits; times are read as GNU reads
  them (the leading number; "1600000000.5abc" is 1600000000.5; no number at all is corrupt).
* data: regular members and unknown types carry `size` bytes; links, devices, fifos and
  directories never do (their size is ignored and the next block is a header).
* sparse members: GNU's old format (type S, extension blocks) and pax 0.0, 0.1 and 1.0
  (the map at the start of the data): `Member.sparse` is the list of (offset, length)
  segments whose bytes follow, `Member.size` the file's real size.
* limits, checked before anything is held: a metadata record over `max_metadata_bytes`, a
  name or link over `max_path_bytes`, more than `max_entries` members, a member over
  `max_entry_bytes`, a sparse map of more than `max_sparse_segments`.

Errors are `TarCorrupt` (the bytes are not a well-formed tar: "truncated or corrupt tar:
...") and `TarRefused` (well-formed, but over a limit).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from zlib import adler32

from support.errors import PermanentError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
READ_SIZE = 1 << 20
NUL = b"\0"
SPACES = b" \t\n\v\f\r"  # C isspace() in the C locale
REGULAR = (b"0", b"\0", b"7")  # 7: contiguous, a regular file to everyone
HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")  # never carry data, whatever their size says
PAX_TYPES = (b"x", b"X", b"g")
GNU_LONG_TYPES = (b"L", b"K")
GNU_SPARSE = b"S"
XATTR_PREFIX = "SCHILY.xattr."
ENCODING, ERRORS = "utf-8", "surrogateescape"
# name mode uid gid size mtime chksum type linkname magic uname gname devmajor devminor prefix
HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s")
USTAR_MAGIC = b"ustar\0"
# Ranges of the C types GNU tar reads each field into; a value outside is corrupt.
U32 = (0, 2**32 - 1)
OFF_T = (0, 2**63 - 1)
TIME_T = (-(2**63), 2**63 - 1)
DECIMAL = re.compile(rb"[0-9]+")
TIME = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")


class TarCorrupt(PermanentError):
    """The bytes are not a well-formed tar (a bad header, pax record, number, truncation)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"truncated or corrupt tar: {detail}")


class BadChecksum(TarCorrupt):
    """A header's checksum does not match (the drivers add where it is in the stream)."""

    def __init__(self, at: int | None = None) -> None:
        super().__init__("bad header checksum" + ("" if at is None else f" at byte {at}"))


class TarRefused(PermanentError):
    """A well-formed tar that goes over a limit (metadata, path, entries, sizes)."""


@dataclass(frozen=True)
class TarLimits:
    """What the decoder refuses before holding it. None: not checked here (the caller does)."""

    max_metadata_bytes: int = 1 << 20  # one pax record set, GNU long name, or sparse map
    max_path_bytes: int = 4096  # a name or link target, from any of its sources
    max_entries: int | None = None
    max_entry_bytes: int | None = None  # a member's (real) size
    max_sparse_segments: int = 1 << 16


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # the end-of-archive block: nothing after it is read


@dataclass(slots=True)
class Member:
    """One member, with every field resolved (pax, GNU long names, sparse maps applied).

    `size` is the file's size; `data_size` the bytes that follow the header (for a sparse
    member, the stored segments: `sparse` lists them as (file offset, length))."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    data_size: int
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None

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


# --- fields --------------------------------------------------------------------------

def _text(data: bytes) -> str:
    end = data.find(NUL)
    return (data if end < 0 else data[:end]).decode(ENCODING, ERRORS)


def parse_number(field: bytes, what: str, bounds: tuple[int, int] = OFF_T) -> int:
    """A numeric header field as GNU tar's from_header reads it (module docstring)."""
    digits = field.partition(NUL)[0]
    if digits.isdigit():  # the common case: plain octal (an 8 or 9 fails int() below)
        try:
            value = int(digits, 8)
        except ValueError:
            raise TarCorrupt(f"bad {what} field {bytes(field)!r}") from None
        if value > bounds[1]:
            raise TarCorrupt(f"{what} {value} out of range")
        return value
    n = len(field)
    i = 0
    while i < n and field[i] in SPACES:
        i += 1
    if i == n:
        raise TarCorrupt(f"blanks in the {what} field")
    first = field[i]
    if 0x30 <= first <= 0x37:
        j = i
        while j < n and 0x30 <= field[j] <= 0x37:
            j += 1
        value, i = int(field[i:j], 8), j
    elif first in (0x80, 0xFF) and i <= n - 2:
        # base-256: 0x80 then the value, or 0xFF and a two's complement negative value
        value = int.from_bytes(field[i + 1:], "big") if first == 0x80 else int.from_bytes(field[i:], "big", signed=True)
        i = n
    elif first == 0:
        value = 0
    else:
        raise TarCorrupt(f"bad {what} field {bytes(field)!r}")
    if i != n and field[i] != 0 and field[i] not in SPACES:
        raise TarCorrupt(f"bad {what} field {bytes(field)!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise TarCorrupt(f"{what} {value} out of range")
    return value


HIGH_BYTES = bytes(range(128, 256))


def checksum_ok(block: bytes | memoryview, start: int = 0) -> bool:
    """The header's checksum field matches the unsigned or the signed sum of its bytes
    (the checksum field counted as blanks)."""
    field = bytes(block[start + 148: start + 156])
    digits = field.partition(NUL)[0]
    if digits.isdigit():  # the common case, without a call
        try:
            stored = int(digits, 8)
        except ValueError:
            return False
    else:
        try:
            stored = parse_number(field, "checksum")
        except TarCorrupt:
            return False
    view = memoryview(block)
    # The byte sum, in C: adler32's low half is 1 + the sum mod 65521, exact for up to 256 bytes.
    unsigned = ((adler32(view[start: start + 148]) & 0xFFFF) + (adler32(view[start + 156: start + 412]) & 0xFFFF)
                + (adler32(view[start + 412: start + BLOCK]) & 0xFFFF) - 3 + 8 * 0x20)
    if stored == unsigned:
        return True
    # Signed: every byte over 127 counts 256 less.
    rest = bytes(view[start: start + 148]) + bytes(view[start + 156: start + BLOCK])
    high = len(rest) - len(rest.translate(None, HIGH_BYTES))
    return stored == unsigned - 256 * high


def pax_records(data: bytes) -> list[tuple[str, bytes]]:
    """`<len> <key>=<value>\\n` records in order (a key may repeat: pax sparse 0.0). Values
    stay bytes (xattrs are binary); reading stops at a NUL where a record would start."""
    records: list[tuple[str, bytes]] = []
    pos = 0
    size = len(data)
    while pos < size and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space] if space > pos else b""
        if not DECIMAL.fullmatch(length_text):
            raise TarCorrupt(f"malformed pax record at byte {pos}: no length")
        length = int(length_text)
        end = pos + length
        if length <= len(length_text) + 1 or end > size or data[end - 1] != 0x0A:
            raise TarCorrupt(f"malformed pax record at byte {pos}: bad length or missing newline")
        key, eq, value = data[space + 1: end - 1].partition(b"=")
        if not eq or not key:
            raise TarCorrupt(f"malformed pax record at byte {pos}: no key=value")
        records.append((key.decode(ENCODING, ERRORS), value))
        pos = end
    return records


def _decimal(digits: bytes, what: str) -> int:
    """Decimal digits as a number; more than 20 digits (past any 64-bit field) is out of
    range, before int() is asked (long digit strings cost it quadratic time, and Python
    refuses over 4300)."""
    if len(digits) > 20:
        raise TarCorrupt(f"{what} out of range")
    return int(digits)


def _pax_decimal(key: str, value: bytes, bounds: tuple[int, int]) -> int:
    if not DECIMAL.fullmatch(value):
        raise TarCorrupt(f"malformed pax record: {key}={value[:40]!r}")
    number = _decimal(value, f"pax {key}")
    if not bounds[0] <= number <= bounds[1]:
        raise TarCorrupt(f"pax {key}={number} out of range")
    return number


def pax_time_ns(key: str, value: bytes) -> int:
    """A pax time as GNU tar reads it: the leading [-]digits[.digits], the rest ignored."""
    found = TIME.match(value)
    if found is None:
        raise TarCorrupt(f"malformed pax record: {key}={value[:40]!r}")
    sign, whole, fraction = found.groups()
    ns = _decimal(whole, f"pax {key}") * 10**9 + int(((fraction or b"") + b"000000000")[:9])
    ns = -ns if sign else ns
    if not TIME_T[0] <= ns // 10**9 <= TIME_T[1]:
        raise TarCorrupt(f"pax {key} out of range")
    return ns


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


# --- the decoder ---------------------------------------------------------------------

@dataclass
class _Pending:
    """What the headers before a member said about it (long names, pax records)."""

    long_name: str | None = None
    long_link: str | None = None
    pax: list[tuple[str, bytes]] = field(default_factory=list)

    def clear(self) -> None:
        self.long_name = self.long_link = None
        self.pax = []


class TarDecoder:
    """Turns blocks into members. The driver feeds exactly `want` bytes at a time (a header,
    a whole metadata record with its padding, a sparse extension or map block); `feed`
    returns a Member (then the driver passes `member.data_size` bytes of data and their
    padding before feeding again), END, or None (more metadata to come)."""

    def __init__(self, limits: TarLimits = TarLimits()) -> None:
        self.limits = limits
        self.want = BLOCK
        self.entries = 0
        self.ended = False
        self._global: list[tuple[str, bytes]] = []
        self._pending = _Pending()
        self.between_headers = True  # the next piece is a header (no record, extension, map)
        self._meta_kind = b""  # the record being read, when want is its padded size
        self._meta_size = 0
        self._sparse_member: Member | None = None  # waiting for old GNU extension blocks
        self._map_member: Member | None = None  # waiting for a pax 1.0 map
        self._path_chars = limits.max_path_bytes // 4  # UTF-8: at most 4 bytes a character
        unbounded = 2**64
        self._max_entries = unbounded if limits.max_entries is None else limits.max_entries
        self._max_entry_bytes = unbounded if limits.max_entry_bytes is None else limits.max_entry_bytes
        self._map_read = 0  # bytes of the map read so far
        self._map_numbers: list[int] = []
        self._map_partial = b""  # the line the last block ended inside

    @property
    def between_members(self) -> bool:
        """True when the next bytes are a header (no record, extension or map pending)."""
        return not self._meta_kind and self._sparse_member is None and self._map_member is None \
            and not self._pending.pax and self._pending.long_name is None and self._pending.long_link is None

    def feed(self, data: bytes | memoryview, start: int = 0) -> Member | _End | None:
        """`data[start:start + want]` is the next piece (a view of a larger read is fine).
        When `between_headers`, drivers may call `header` directly (the hot path)."""
        if self.between_headers:
            return self.header(data, start)
        if self._meta_kind:
            return self._metadata(bytes(data[start: start + self._meta_size]))
        if self._sparse_member is not None:
            return self._sparse_extension(bytes(data[start: start + BLOCK]))
        assert self._map_member is not None
        return self._sparse_map_block(bytes(data[start: start + BLOCK]))

    # -- headers ------------------------------------------------------------------------

    def header(self, data: bytes | memoryview, start: int) -> Member | _End | None:
        """The 512 bytes at `start` are a header (only when `between_headers`)."""
        fields = HEADER.unpack_from(data, start)
        if fields[6] == b"\0" * 8 and bytes(data[start: start + BLOCK]) == ZERO_BLOCK:
            self.ended = True
            return END
        if not checksum_ok(data, start):
            raise BadChecksum()
        kind = fields[7]
        digits = fields[4].partition(NUL)[0]
        size = int(digits, 8) if digits.isdigit() and b"8" not in digits and b"9" not in digits \
            else parse_number(fields[4], "size")
        if kind in PAX_TYPES or kind in GNU_LONG_TYPES:
            if size > self.limits.max_metadata_bytes:  # refused before a byte of it is held
                raise TarRefused(f"truncated or corrupt tar: metadata record of {size} bytes "
                                 f"(over max_metadata_bytes={self.limits.max_metadata_bytes})")
            self._meta_kind, self._meta_size = kind, size
            self.between_headers = False
            self.want = padded(size)
            if not size:
                return self._metadata(b"")
            return None
        member = self._member(fields, kind, size)
        pending = self._pending
        if pending.pax or pending.long_name is not None or pending.long_link is not None:
            pending.clear()
        self.entries += 1
        if self.entries > self._max_entries or member.size > self._max_entry_bytes:
            self._check_counts(member)
        if kind == GNU_SPARSE:
            return self._old_gnu_sparse(member, bytes(data[start: start + BLOCK]))
        if member.sparse is not None and not member.sparse:  # pax 1.0: the map comes first in the data
            self._map_member = member
            self.between_headers = False
            self._map_read = 0
            self._map_numbers, self._map_partial = [], b""
            return self._next_map_block()
        return member

    def _check_counts(self, member: Member) -> None:
        if self.entries > self._max_entries:
            raise TarRefused(f"too many entries: more than max_entries={self.limits.max_entries}")
        raise TarRefused(f"entry too large: {member.name[:120]!r} is {member.size} bytes "
                         f"(over max_entry_bytes={self.limits.max_entry_bytes})")

    def _member(self, fields: tuple[bytes, ...], kind: bytes, size: int) -> Member:
        pending = self._pending
        name = fields[0].partition(NUL)[0].decode(ENCODING, ERRORS)
        if fields[14][0] and fields[9][:6] == USTAR_MAGIC:  # POSIX ustar: the prefix field
            name = _text(fields[14]) + "/" + name
        t_mode, t_uid, t_gid, t_mtime = (fields[1].partition(NUL)[0], fields[2].partition(NUL)[0],
                                         fields[3].partition(NUL)[0], fields[5].partition(NUL)[0])
        try:  # plain octal digits, the common case, without a call per field (int() alone
            # would also take blanks, a sign or "_": those go the careful way)
            if not (t_mode + t_uid + t_gid + t_mtime).isdigit():
                raise ValueError
            mode, uid, gid, mtime = int(t_mode, 8), int(t_uid, 8), int(t_gid, 8), int(t_mtime, 8)
        except ValueError:
            mode, uid, gid = (parse_number(fields[1], "mode", U32), parse_number(fields[2], "uid", U32),
                              parse_number(fields[3], "gid", U32))
            mtime = parse_number(fields[5], "mtime", TIME_T)
        if pending.long_link is not None:
            linkname = pending.long_link
        else:
            linkname = fields[8].partition(NUL)[0].decode(ENCODING, ERRORS) if fields[8][0] else ""
        member = Member(name if pending.long_name is None else pending.long_name, kind, mode, uid, gid, size,
                        mtime * 1_000_000_000, linkname, size)
        if kind in (b"3", b"4"):
            member.devmajor = parse_number(fields[12], "devmajor", U32)
            member.devminor = parse_number(fields[13], "devminor", U32)
        if self._global or pending.pax:
            self._apply_pax(member, self._global + pending.pax)
        if kind in REGULAR and member.name.endswith("/"):
            member.type = b"5"  # V7: a directory is a file named with a trailing "/"
        if member.type in HEADER_ONLY:
            member.data_size = 0
        quick = self._path_chars  # no string of this many characters can be too long
        if len(member.name) > quick or len(member.linkname) > quick:
            self._check_paths(member)
        return member

    def _check_paths(self, member: Member) -> None:
        for label, value in (("path", member.name), ("link target", member.linkname)):
            if len(value.encode(ENCODING, ERRORS)) > self.limits.max_path_bytes:
                raise TarRefused(f"path too long: {label} of {value[:64]!r}... is over "
                                 f"max_path_bytes={self.limits.max_path_bytes}")

    def _apply_pax(self, member: Member, records: list[tuple[str, bytes]]) -> None:
        """pax records (global, then local) override the header's fields; GNU.sparse.*
        records make it a sparse member (its map: `sparse`, its real size: `size`)."""
        sparse_name: str | None = None
        real_size: int | None = None
        offsets: list[int] = []
        numbytes: list[int] = []
        sparse_map: bytes | None = None
        major = None
        for key, value in records:
            if key == "path":
                member.name = value.decode(ENCODING, ERRORS)
            elif key == "linkpath":
                member.linkname = value.decode(ENCODING, ERRORS)
            elif key == "size":
                member.size = member.data_size = _pax_decimal(key, value, OFF_T)
            elif key == "uid":
                member.uid = _pax_decimal(key, value, U32)
            elif key == "gid":
                member.gid = _pax_decimal(key, value, U32)
            elif key == "mtime":
                member.mtime_ns = pax_time_ns(key, value)
            elif key in ("atime", "ctime"):
                pax_time_ns(key, value)  # read (a bad one is corrupt, as in GNU tar), not kept
            elif key == "SCHILY.devmajor":
                member.devmajor = _pax_decimal(key, value, U32)
            elif key == "SCHILY.devminor":
                member.devminor = _pax_decimal(key, value, U32)
            elif key.startswith(XATTR_PREFIX):
                member.xattrs[key[len(XATTR_PREFIX):]] = value
            elif key.startswith("GNU.sparse."):
                what = key[len("GNU.sparse."):]
                if what == "name":
                    sparse_name = value.decode(ENCODING, ERRORS)
                elif what in ("size", "realsize"):
                    real_size = _pax_decimal(key, value, OFF_T)
                elif what == "offset":
                    offsets.append(_pax_decimal(key, value, OFF_T))
                elif what == "numbytes":
                    numbytes.append(_pax_decimal(key, value, OFF_T))
                elif what == "map":
                    sparse_map = value
                elif what == "major":
                    major = _pax_decimal(key, value, U32)
                elif what == "minor":
                    _pax_decimal(key, value, U32)
                elif what == "numblocks":
                    if _pax_decimal(key, value, OFF_T) > self.limits.max_sparse_segments:
                        raise TarRefused(f"sparse map of more than max_sparse_segments="
                                         f"{self.limits.max_sparse_segments} segments")
        if sparse_name is not None:
            member.name = sparse_name  # GNU.sparse.name wins over path, wherever it is
        if major is not None and major != 1:
            raise TarCorrupt(f"unsupported pax sparse format {major}")
        if offsets or numbytes or sparse_map is not None:  # pax sparse 0.0 and 0.1
            if sparse_map is not None:
                numbers = sparse_map.split(b",") if sparse_map else []
                if len(numbers) % 2 or not all(DECIMAL.fullmatch(n) for n in numbers):
                    raise TarCorrupt("malformed pax record: GNU.sparse.map")
                values = [_decimal(n, "GNU.sparse.map") for n in numbers]
                offsets, numbytes = values[0::2], values[1::2]
            if len(offsets) != len(numbytes):
                raise TarCorrupt("sparse map: offsets and sizes do not pair up")
            member.sparse = self._checked_map(list(zip(offsets, numbytes)), member.data_size)
        elif major == 1:
            member.sparse = []  # the map is at the start of the data (pax 1.0)
        if member.sparse is not None:
            if real_size is None:
                raise TarCorrupt("sparse member without a real size")
            member.size = real_size
            self._check_extent(member)

    # -- sparse members -----------------------------------------------------------------

    def _checked_map(self, segments: list[tuple[int, int]], stored: int | None) -> list[tuple[int, int]]:
        """Segments in order and not overlapping; their lengths add up to what is stored."""
        if len(segments) > self.limits.max_sparse_segments:
            raise TarRefused(f"sparse map of more than max_sparse_segments={self.limits.max_sparse_segments} segments")
        end = 0
        segments = [segment for segment in segments if segment[1]]  # GNU ends with (size, 0)
        for i, (offset, length) in enumerate(segments):
            if offset < end:
                raise TarCorrupt("sparse map: segments out of order or overlapping")
            if length % BLOCK and i != len(segments) - 1:
                # GNU tar starts each segment's data on a block, Go's archive/tar reads them end
                # to end: they agree on whole-block segments only (all that GNU tar writes).
                raise TarCorrupt("sparse map: a segment before the last is not whole blocks")
            end = offset + length
        if stored is not None and sum(length for _, length in segments) != stored:
            raise TarCorrupt("sparse map: segments do not add up to the member's data")
        return segments

    @staticmethod
    def _check_extent(member: Member) -> None:
        if member.sparse and member.sparse[-1][0] + member.sparse[-1][1] > member.size:
            raise TarCorrupt(f"sparse map of {member.name[:120]!r} goes past its size")

    def _old_gnu_sparse(self, member: Member, block: bytes) -> Member | None:
        """GNU's old format: 4 (offset, length) pairs in the header, then extension blocks
        of 21 while the 'isextended' byte is set; the real size at byte 483."""
        member.type = b"0"
        member.size = parse_number(block[483:495], "realsize")
        if self.limits.max_entry_bytes is not None and member.size > self.limits.max_entry_bytes:
            raise TarRefused(f"entry too large: {member.name[:120]!r} is {member.size} bytes "
                             f"(over max_entry_bytes={self.limits.max_entry_bytes})")
        member.sparse = self._segments(block[386:482], 4)
        if block[482]:
            self._sparse_member = member
            self.between_headers = False
            return None
        return self._sparse_done(member)

    def _segments(self, area: bytes, count: int) -> list[tuple[int, int]]:
        segments = []
        for i in range(count):
            entry = area[i * 24: i * 24 + 24]
            if not entry[0]:  # an unused slot ends the list
                break
            segments.append((parse_number(entry[:12], "sparse offset"), parse_number(entry[12:], "sparse length")))
        return segments

    def _sparse_extension(self, block: bytes) -> Member | None:
        member = self._sparse_member
        assert member is not None and member.sparse is not None
        member.sparse += self._segments(block[:504], 21)
        if len(member.sparse) > self.limits.max_sparse_segments:
            raise TarRefused(f"sparse map of more than max_sparse_segments={self.limits.max_sparse_segments} segments")
        if block[504]:
            return None
        self._sparse_member = None
        self.between_headers = True
        return self._sparse_done(member)

    def _sparse_done(self, member: Member) -> Member:
        assert member.sparse is not None
        member.sparse = self._checked_map(member.sparse, member.data_size)
        self._check_extent(member)
        self.want = BLOCK
        return member

    def _next_map_block(self) -> None:
        member = self._map_member
        assert member is not None
        if member.data_size < BLOCK:
            raise TarCorrupt(f"sparse map of {member.name[:120]!r} cut short")
        self.want = BLOCK
        return None

    def _sparse_map_block(self, block: bytes) -> Member | None:
        """pax 1.0: decimal numbers, one a line (count, then offset and length pairs), at the
        start of the data, padded to a block. Read a block at a time, each line once."""
        member = self._map_member
        assert member is not None
        member.data_size -= BLOCK
        self._map_read += BLOCK
        if self._map_read > self.limits.max_metadata_bytes:
            raise TarRefused(f"sparse map over max_metadata_bytes={self.limits.max_metadata_bytes}")
        lines = (self._map_partial + block).split(b"\n")
        self._map_partial = lines.pop()
        for line in lines:
            if not DECIMAL.fullmatch(line):
                raise TarCorrupt("malformed pax 1.0 sparse map")
            self._map_numbers.append(_decimal(line, "sparse map entry"))
            count = self._map_numbers[0]
            if count > self.limits.max_sparse_segments:
                raise TarRefused(f"sparse map of more than max_sparse_segments="
                                 f"{self.limits.max_sparse_segments} segments")
            if len(self._map_numbers) == 2 * count + 1:  # complete: the rest is padding
                values = self._map_numbers[1:]
                self._map_member = None
                self.between_headers = True
                member.sparse = list(zip(values[0::2], values[1::2]))
                return self._sparse_done(member)
        if self._map_partial and not (self._map_partial.isdigit() and len(self._map_partial) <= 20):
            raise TarCorrupt("malformed pax 1.0 sparse map")
        return self._next_map_block()

    # -- metadata records -----------------------------------------------------------------

    def _metadata(self, data: bytes) -> None:
        kind, size = self._meta_kind, self._meta_size
        self._meta_kind = b""
        self.between_headers = True
        self.want = BLOCK
        data = data[:size]
        if kind in GNU_LONG_TYPES:
            value = _text(data)
            if len(value.encode(ENCODING, ERRORS)) > self.limits.max_path_bytes:
                raise TarRefused(f"path too long: GNU long {'name' if kind == b'L' else 'link'} of "
                                 f"{len(data)} bytes is over max_path_bytes={self.limits.max_path_bytes}")
            if kind == b"L":
                self._pending.long_name = value
            else:
                self._pending.long_link = value
            return None
        records = pax_records(data)
        for key, value in records:
            if key in ("path", "linkpath", "GNU.sparse.name") and len(value) > self.limits.max_path_bytes:
                raise TarRefused(f"path too long: pax {key} of {len(value)} bytes is over "
                                 f"max_path_bytes={self.limits.max_path_bytes}")
        if kind == b"g":
            self._global = records  # a global header replaces the one before (GNU tar)
        else:
            self._pending.pax = records
        return None


# --- pulling: the unpacker and the archive listing -----------------------------------------

class TarReader:
    """Members and their data from one stream, read in `read_size` pieces; member data is
    handed out as memoryviews of those reads (no copy). Seekable streams seek over data
    nobody reads (`offset` then gives where a member's data starts)."""

    def __init__(self, raw: BinaryIO, read_size: int = READ_SIZE, limits: TarLimits = TarLimits()) -> None:
        self._raw = raw
        self._read_size = read_size
        self.decoder = TarDecoder(limits)
        self.position = 0  # bytes of the stream consumed by the reads so far
        self._chunk = memoryview(b"")
        self._offset = 0
        self._pending = 0  # data and padding of the last member not yet consumed
        self._data_left = 0  # of which data
        self._seekable = bool(getattr(raw, "seekable", lambda: False)())
        self.offset = 0  # where the last member's data starts in the stream

    @property
    def entries(self) -> int:
        return self.decoder.entries

    @property
    def saw_end(self) -> bool:
        return self.decoder.ended

    # -- bytes ----------------------------------------------------------------------------

    def _refill(self) -> bool:
        data = self._raw.read(self._read_size)
        self._chunk, self._offset = memoryview(data), 0
        self.position += len(data)
        return bool(data)

    def _at(self) -> int:
        return self.position - len(self._chunk) + self._offset

    def _take(self, n: int) -> bytes:
        """Exactly `n` bytes (a copy; metadata records only)."""
        parts: list[bytes] = []
        while n:
            if self._offset == len(self._chunk) and not self._refill():
                raise TarCorrupt(f"archive ends inside a header or record at byte {self._at()}")
            piece = self._chunk[self._offset: self._offset + n]
            self._offset += len(piece)
            n -= len(piece)
            parts.append(bytes(piece))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _views(self, n: int) -> Iterator[memoryview]:
        """`n` bytes of member data as views of the reads, no copy."""
        while n:
            if self._offset == len(self._chunk) and not self._refill():
                raise TarCorrupt(f"archive ends inside a member at byte {self._at()}")
            piece = self._chunk[self._offset: self._offset + n]
            self._offset += len(piece)
            n -= len(piece)
            yield piece

    def _skip(self, n: int) -> None:
        if self._offset + n <= len(self._chunk):  # the common case: within this read
            self._offset += n
            return
        if self._seekable:
            target = self._at() + n
            self._raw.seek(target)
            self.position, self._chunk, self._offset = target, memoryview(b""), 0
            return
        for _ in self._views(n):
            pass

    def finish(self) -> None:
        """After members(): the archive must have ended with its end-of-archive block. What
        follows is read (a compressed stream's trailer is checked on the way) but not
        interpreted: GNU tar stops at that block too."""
        if not self.decoder.ended:
            raise TarCorrupt("archive ends without an end-of-archive marker")
        if self._seekable:
            return
        while self._refill():
            pass

    # -- members --------------------------------------------------------------------------

    def data(self, member: Member) -> Iterator[memoryview]:
        """The member's stored data (call once, right after the member is yielded)."""
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
        """The member's data as (file offset, views) of about `piece_bytes` each, no copy:
        one pwritev apiece. A sparse member's segments land at their offsets (the holes
        between them are never written)."""
        left, self._data_left = self._data_left, 0
        self._pending -= left
        segments = member.sparse if member.sparse is not None else [(0, left)]
        for start, length in segments:
            offset = start
            while length:
                batch: list[memoryview] = []
                queued = 0
                while length and queued < piece_bytes:
                    if self._offset == len(self._chunk) and not self._refill():
                        raise TarCorrupt(f"archive ends inside a member at byte {self._at()}")
                    piece = self._chunk[self._offset: self._offset + length]
                    self._offset += len(piece)
                    length -= len(piece)
                    queued += len(piece)
                    batch.append(piece)
                yield offset, batch
                offset += queued

    def members(self) -> Iterator[Member]:
        """Every member up to the end-of-archive block; TarCorrupt/TarRefused on anything
        the decoder refuses, or a truncation. Data a caller did not read is skipped."""
        decoder = self.decoder
        while True:
            if self._pending:
                self._skip(self._pending)
                self._pending = self._data_left = 0
            want = decoder.want
            if self._offset == len(self._chunk) and not self._refill():
                if decoder.between_members:
                    raise TarCorrupt("archive ends without an end-of-archive marker")
                raise TarCorrupt(f"archive ends inside a header or record at byte {self._at()}")
            start = self._offset
            try:
                if start + want <= len(self._chunk):  # the common case: within this read
                    self._offset = start + want
                    step = decoder.header(self._chunk, start) if decoder.between_headers \
                        else decoder.feed(self._chunk, start)
                else:
                    step = decoder.feed(self._take(want))
            except BadChecksum:
                raise BadChecksum(self._at() - BLOCK) from None
            if step is None:
                continue
            if step is END:
                return
            assert isinstance(step, Member)
            self._pending, self._data_left = -(-step.data_size // BLOCK) * BLOCK, step.data_size
            self.offset = self.position - len(self._chunk) + self._offset
            yield step


def read_members(data: bytes, limits: TarLimits = TarLimits()) -> list[tuple[Member, bytes]]:
    """Every member of an in-memory tar with its stored data (tests and small archives)."""
    import io

    reader = TarReader(io.BytesIO(data), READ_SIZE, limits)
    out = []
    for member in reader.members():
        out.append((member, b"".join(bytes(view) for view in reader.data(member))))
    reader.finish()
    return out


# --- pushing: the download-time check -----------------------------------------------------

class TarStreamGuard:
    """The decoder driven by bytes as they arrive (`feed`, then `finish`): everything it
    refuses is refused before the blob is stored. Keeps the entry count, the bytes up to
    the end-of-archive block, and the top-level names (`roots`: how an OCI layout or
    docker save archive is recognized)."""

    def __init__(self, limits: TarLimits) -> None:
        self.decoder = TarDecoder(limits)
        self.roots: set[str] = set()
        self.position = 0  # bytes fed
        self._buffer = bytearray()  # a header or record being gathered
        self._skip = 0  # member data and padding still to pass

    @property
    def entries(self) -> int:
        return self.decoder.entries

    @property
    def saw_end(self) -> bool:
        return self.decoder.ended

    def feed(self, data: bytes | memoryview) -> None:
        """Follow the next bytes of the tar stream."""
        view = memoryview(data)
        size = len(view)
        i = 0
        decoder = self.decoder
        while i < size and not decoder.ended:
            if self._skip:
                take = min(self._skip, size - i)
                self._skip -= take
                i += take
                continue
            want = decoder.want
            if not self._buffer and i + want <= size:
                at = self.position + i
                i += want
                piece: bytes | memoryview = view
                start = at - self.position
            else:
                take = min(want - len(self._buffer), size - i)
                self._buffer += view[i: i + take]
                i += take
                if len(self._buffer) < want:
                    continue
                at, piece, start = self.position + i - want, bytes(self._buffer), 0
                self._buffer.clear()
            try:
                step = decoder.feed(piece, start)
            except BadChecksum:
                raise BadChecksum(at) from None
            if isinstance(step, Member):
                self._skip = padded(step.data_size)
                name = step.name
                while name.startswith("./"):
                    name = name[2:]
                name = name.rstrip("/")
                if name and "/" not in name:
                    self.roots.add(name)
        self.position += size

    def finish(self) -> None:
        """The stream ended: TarCorrupt unless it ended after an end-of-archive block."""
        if self.decoder.ended:
            return
        if self._skip:
            raise TarCorrupt(f"archive ends inside a member at byte {self.position}")
        if self._buffer or not self.decoder.between_members:
            raise TarCorrupt(f"archive ends inside a header or record at byte {self.position}")
        raise TarCorrupt("archive ends without an end-of-archive marker")
