"""Blob formats, detected by content (never by name), and streams of their tar bytes.

    fmt = sniff_format(path)              # "tar" | "tar+gzip" | "tar+zstd" | "oci-layout" | "docker-save"
    with open_layer_stream(path, fmt, limits) as stream:   # decompressed tar bytes, bounded
        ...
    blobs = layers_of_archive(path, fmt, store)            # OCI layout / docker save -> layer blobs

Everything here treats the blob as hostile: decompression is bounded in output size and
ratio (zip/gzip/zstd bombs), JSON is read with a size limit, references in manifests
must stay inside the archive, and the tar headers of archives are read by the one tar
decoder (images/tardecoder.py, the one the download check and the unpacker use), which
never holds a metadata record larger than the limit. The gzip and zstd decoders here are
the only ones: the download check pushes bytes through them, open_layer_stream pulls.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from images.blobstore import CHUNK_SIZE, BlobInfo, BlobStore, StreamCheck
from images.tardecoder import BLOCK, REGULAR, ZERO_BLOCK, TarLimits, TarReader, checksum_ok
from support.errors import PermanentError
from support.log import get_logger

log = get_logger("images.formats", component="formats")

FORMATS = ("tar", "tar+gzip", "tar+zstd", "oci-layout", "docker-save")
LAYER_FORMATS = ("tar", "tar+gzip", "tar+zstd")
ARCHIVE_FORMATS = ("oci-layout", "docker-save")
ZSTD_INPUT_SLICE = 1024  # a 1 KiB zstd slice expands to at most ~32 MiB (RLE blocks)


@dataclass(frozen=True)
class Limits:
    """Bounds on what a blob may make us do. Defaults fit real images with a wide margin."""

    max_uncompressed_bytes: int = 64 << 30
    max_ratio: float = 200.0  # decompressed / compressed, checked past ratio_grace_bytes
    ratio_grace_bytes: int = 64 << 20
    max_entries: int = 2_000_000
    max_path_bytes: int = 4096
    max_entry_bytes: int = 32 << 30
    max_metadata_bytes: int = 1 << 20  # one pax header or GNU long name record
    max_json_bytes: int = 4 << 20
    zstd_max_window_bytes: int = 1 << 27


DEFAULT_LIMITS = Limits()

# A blob's streaming checks, made for a blob of the given size (images.verify.BlobCheck).
CheckFactory = Callable[[int], StreamCheck]


# --- tar members of an archive (images/tardecoder.py reads them) -------------------------

def tar_limits(limits: Limits) -> TarLimits:
    """The decoder's bounds for a blob under `limits`."""
    return TarLimits(max_metadata_bytes=limits.max_metadata_bytes, max_path_bytes=limits.max_path_bytes,
                     max_entries=limits.max_entries, max_entry_bytes=limits.max_entry_bytes)


@dataclass(frozen=True)
class TarMember:
    """One member of a seekable tar: name (normalized), type flag, size, data offset."""

    name: str
    type: bytes
    size: int
    offset: int
    sparse: bool = False

    @property
    def is_file(self) -> bool:
        return self.type in REGULAR and not self.sparse


def normalize_member_name(name: str) -> str:
    """`./a/b/` -> `a/b`: how archive writers differ, not what they mean."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def iter_members(fh: BinaryIO, limits: Limits = DEFAULT_LIMITS) -> Iterator[TarMember]:
    """The members of a seekable plain tar, read by the one decoder (seeking over data).
    Raises PermanentError on anything truncated, corrupt or over the limits."""
    fh.seek(0)
    reader = TarReader(fh, 64 << 10, tar_limits(limits))
    for member in reader.members():
        yield TarMember(name=normalize_member_name(member.name), type=member.type, size=member.data_size,
                        offset=reader.offset, sparse=member.sparse is not None)
    reader.finish()


# --- sniffing ------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
KNOWN_NOT_TAR: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "zip archive"),
    (b"PK\x05\x06", "zip archive"),
    (b"PK\x07\x08", "zip archive"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x5d\x00\x00", "lzma-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "7-zip archive"),
    (b"\x7fELF", "ELF executable"),
    (b"%PDF", "PDF document"),
    (b"\x89PNG", "PNG image"),
    (b"!<arch>", "ar archive (.deb?)"),
    (b"\xed\xab\xee\xdb", "RPM package"),
    (b"hsqs", "squashfs image"),
)


def is_zstd(head: bytes) -> bool:
    # A zstd frame, or a skippable frame (magic 0x184D2A50..5F little endian).
    return head[:4] == ZSTD_MAGIC or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50)


def describe_not_tar(head: bytes) -> str:
    for magic, what in KNOWN_NOT_TAR:
        if head.startswith(magic):
            return what
    if head[257:262] == b"ustar":
        return "not a tar: ustar header with a bad checksum"
    preview = head[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in preview):
        return f"not a tar: text starting {preview.decode('ascii')!r}"
    return f"not a tar: data starting {preview.hex()}"


def _root_names(path: Path, limits: Limits) -> set[str]:
    with open(path, "rb") as fh:
        return {m.name for m in iter_members(fh, limits) if m.name and "/" not in m.name}


def sniff_format(path: Path, limits: Limits = DEFAULT_LIMITS) -> str:
    """The blob's format by content: "tar", "tar+gzip", "tar+zstd", "oci-layout" or
    "docker-save"; anything else is PermanentError("unsupported format: ...")."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise PermanentError("unsupported format: empty file")
    with open(path, "rb") as fh:
        head = fh.read(BLOCK * 2)
    if head.startswith(GZIP_MAGIC) or is_zstd(head):
        fmt = "tar+gzip" if head.startswith(GZIP_MAGIC) else "tar+zstd"
        with open_layer_stream(path, fmt, limits) as stream:
            first = _read_exact(stream, BLOCK)
        if not checksum_ok(first) and first != ZERO_BLOCK:
            what = "gzip" if fmt == "tar+gzip" else "zstd"
            raise PermanentError(f"unsupported format: {what}-compressed data that is not a tar")
        return fmt
    if head[:BLOCK * 2] == bytes(BLOCK * 2):
        return "tar"  # an empty archive: just the end-of-archive marker
    if not checksum_ok(head[:BLOCK]):
        raise PermanentError(f"unsupported format: {describe_not_tar(head)}")
    roots = _root_names(path, limits)
    if {"oci-layout", "index.json"} <= roots:
        return "oci-layout"
    if "manifest.json" in roots:
        return "docker-save"
    return "tar"


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# --- decompression: the one set of decoders, pushed (verify) or pulled (unpack) ------------

class GzipDecoder:
    """gzip members (one or several, concatenated; zero padding between or after them is
    skipped, as gzip(1) and Python's gzip do) decompressed in pieces of at most CHUNK_SIZE."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if not self._started:
                data = data.lstrip(b"\0")
                if not data:
                    return
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

    def finish(self) -> Iterator[bytes]:
        if self._started:
            raise PermanentError("truncated or corrupt gzip: Compressed file ended before the end-of-stream "
                                 "marker was reached")
        return iter(())


class ZstdDecoder:
    """zstd frames (and skippable frames) decompressed slice by slice: a 1 KiB slice
    expands to at most ~32 MiB; a stream that ends inside a frame is an error (zstandard's
    stream_reader returns a silent EOF there)."""

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

    def finish(self) -> Iterator[bytes]:
        if self._in_frame:
            raise PermanentError("truncated or corrupt zstd: stream ends inside a frame")
        return iter(())


class PlainDecoder:
    """An uncompressed tar: the bytes as they are."""

    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def finish(self) -> Iterator[bytes]:
        return iter(())


Decoder = GzipDecoder | ZstdDecoder | PlainDecoder


def decoder_for(fmt: str, limits: Limits) -> Decoder:
    """The decompressor of a layer format ("tar", "tar+gzip", "tar+zstd")."""
    if fmt == "tar+gzip":
        return GzipDecoder()
    if fmt == "tar+zstd":
        return ZstdDecoder(limits.zstd_max_window_bytes)
    return PlainDecoder()


class DecompressionBound:
    """Counts decompressed bytes and stops a decompression bomb: more than
    `max_uncompressed_bytes`, or (past a grace size) more than `max_ratio` times the blob
    (`compressed_size`; None for an uncompressed tar: the absolute bound only)."""

    def __init__(self, compressed_size: int | None, limits: Limits) -> None:
        self.bytes_read = 0
        self._limit = limits.max_uncompressed_bytes
        if compressed_size is not None:
            self._limit = min(self._limit, max(limits.ratio_grace_bytes, int(compressed_size * limits.max_ratio)))
        self._compressed_size = compressed_size
        self._limits = limits

    def add(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        if self.bytes_read > self._limit:
            if self._limit < self._limits.max_uncompressed_bytes:  # the ratio bound was the tighter one
                raise PermanentError(
                    f"decompression bomb: {self._compressed_size} compressed bytes expand past "
                    f"{self.bytes_read} (ratio limit {self._limits.max_ratio:g})"
                )
            raise PermanentError(f"decompression bomb: more than {self._limit} bytes decompressed")


class BoundedStream(io.RawIOBase):
    """A blob's decompressed bytes, pulled through the same decoders the download-time
    check pushes them through, and counted by a DecompressionBound."""

    def __init__(self, raw: BinaryIO, decoder: Decoder, compressed_size: int | None, limits: Limits) -> None:
        self._raw = raw
        self._decoder = decoder
        self._bound = DecompressionBound(compressed_size, limits)
        self._pieces: Iterator[bytes] = iter(())
        self._output = b""
        self._eof = False

    @property
    def bytes_read(self) -> int:
        return self._bound.bytes_read

    def readable(self) -> bool:
        return True

    def _next_piece(self) -> bytes | None:
        while True:
            piece = next(self._pieces, None)
            if piece is not None:
                self._bound.add(len(piece))
                return piece
            if self._eof:
                return None
            data = self._raw.read(CHUNK_SIZE)
            if data:
                self._pieces = self._decoder.feed(data)
            else:
                self._eof = True
                self._pieces = self._decoder.finish()

    def read(self, size: int = -1) -> bytes:
        want = CHUNK_SIZE if size is None or size < 0 else size
        if not self._output:
            piece = self._next_piece()
            if piece is None:
                return b""
            self._output = piece
        data, self._output = self._output[:want], self._output[want:]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextmanager
def open_layer_stream(path: Path, fmt: str, limits: Limits = DEFAULT_LIMITS) -> Iterator[BinaryIO]:
    """A readable stream of the decompressed tar bytes of a "tar", "tar+gzip" or "tar+zstd"
    blob, bounded by `limits` (a bomb raises PermanentError "decompression bomb: ...")."""
    if fmt not in LAYER_FORMATS:
        raise PermanentError(f"not a layer format: {fmt}")
    path = Path(path)
    compressed_size = path.stat().st_size
    with open(path, "rb") as raw:
        if fmt == "tar":  # no decoder in between: the unpacker reads the file directly
            yield cast(BinaryIO, _PlainBounded(raw, limits))
            return
        yield cast(BinaryIO, BoundedStream(raw, decoder_for(fmt, limits), compressed_size, limits))


class _PlainBounded(io.RawIOBase):
    """An uncompressed tar file, read straight through (1 MiB reads, no copy) within
    max_uncompressed_bytes."""

    def __init__(self, raw: BinaryIO, limits: Limits) -> None:
        self._raw = raw
        self._bound = DecompressionBound(None, limits)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(CHUNK_SIZE if size is None or size < 0 else size)
        self._bound.add(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# --- OCI image layout and docker save archives ----------------------------------------

def safe_reference(ref: Any, what: str) -> str:
    """A path named by a manifest, checked to stay inside the archive."""
    if not isinstance(ref, str) or not ref or "\0" in ref or "\\" in ref:
        raise PermanentError(f"unsafe path in {what}: {ref!r}")
    norm = posixpath.normpath(ref)
    if ref.startswith("/") or norm == ".." or norm.startswith("../") or "/../" in f"/{ref}/":
        raise PermanentError(f"unsafe path in {what}: {ref!r}")
    return normalize_member_name(norm)


DIGEST_REF = re.compile(r"^sha256:[0-9a-f]{64}$")


class _Archive:
    """A seekable tar archive's regular files, by normalized name."""

    def __init__(self, fh: BinaryIO, size: int, limits: Limits) -> None:
        self.fh = fh
        self.limits = limits
        self.members: dict[str, TarMember] = {}
        duplicates: set[str] = set()
        for member in iter_members(fh, limits):
            if member.name in self.members:
                duplicates.add(member.name)
            self.members[member.name] = member
        self.duplicates = duplicates

    def member(self, name: str, what: str) -> TarMember:
        member = self.members.get(name)
        if member is None:
            raise PermanentError(f"{what}: {name} is missing from the archive")
        if name in self.duplicates:
            raise PermanentError(f"{what}: {name} appears more than once in the archive")
        if not member.is_file:
            raise PermanentError(f"{what}: {name} is not a regular file")
        return member

    def read_json(self, name: str, what: str) -> Any:
        member = self.member(name, what)
        if member.size > self.limits.max_json_bytes:
            raise PermanentError(f"{what}: {name} is {member.size} bytes, over the {self.limits.max_json_bytes} limit")
        self.fh.seek(member.offset)
        data = self.fh.read(member.size)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PermanentError(f"{what}: {name} is not valid JSON: {exc}") from None

    def read_blob_json(self, digest: str, what: str) -> Any:
        name = _blob_name(digest, what)
        member = self.member(name, what)
        self.fh.seek(member.offset)
        data = self.fh.read(min(member.size, self.limits.max_json_bytes + 1))
        if len(data) > self.limits.max_json_bytes:
            raise PermanentError(f"{what}: {name} is over the {self.limits.max_json_bytes} byte limit")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise PermanentError(f"checksum mismatch: {what}: {name} does not match its digest")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PermanentError(f"{what}: {name} is not valid JSON: {exc}") from None

    def copy_to_store(self, name: str, store: BlobStore, expected_digest: str | None, what: str,
                      check: CheckFactory | None = None) -> BlobInfo:
        member = self.member(name, what)
        self.fh.seek(member.offset)
        remaining = member.size
        try:
            with store.writer(check=(lambda: check(member.size)) if check else None) as writer:
                while remaining:
                    chunk = self.fh.read(min(CHUNK_SIZE, remaining))
                    if not chunk:
                        raise PermanentError(f"truncated or corrupt tar: {name} is cut short")
                    writer.write(chunk)
                    remaining -= len(chunk)
                return writer.commit(expected_digest)
        except PermanentError as exc:
            raise PermanentError(f"{what}: {name}: {exc}") from None


def _blob_name(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST_REF.match(digest):
        raise PermanentError(f"{what}: unsupported or malformed digest {digest!r}")
    return "blobs/sha256/" + digest.split(":", 1)[1]


MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _pick_manifest(archive: _Archive, descriptors: Any, what: str, depth: int = 0) -> dict[str, Any]:
    """The one image manifest an index leads to (nested indexes followed, this host's
    platform preferred when several are listed)."""
    if not isinstance(descriptors, list) or not descriptors:
        raise PermanentError(f"{what}: no manifests listed")
    if depth > 2:
        raise PermanentError(f"{what}: image indexes nested too deep")
    if len(descriptors) > 1:
        arch = GO_ARCH.get(platform.machine(), platform.machine())
        matching = [d for d in descriptors if isinstance(d, dict)
                    and (d.get("platform") or {}).get("architecture") == arch
                    and (d.get("platform") or {}).get("os", "linux") == "linux"]
        if len(matching) != 1:
            raise PermanentError(f"{what}: archive holds {len(descriptors)} images; expected one (or one for linux/{arch})")
        descriptors = matching
    descriptor = descriptors[0]
    if not isinstance(descriptor, dict):
        raise PermanentError(f"{what}: malformed descriptor")
    document = archive.read_blob_json(descriptor.get("digest"), what)
    if not isinstance(document, dict):
        raise PermanentError(f"{what}: malformed manifest")
    media_type = descriptor.get("mediaType") or document.get("mediaType")
    if media_type in INDEX_TYPES or ("manifests" in document and "layers" not in document):
        return _pick_manifest(archive, document.get("manifests"), what, depth + 1)
    if media_type not in MANIFEST_TYPES and "layers" not in document:
        raise PermanentError(f"{what}: unsupported manifest type {media_type!r}")
    return document


def _oci_layers(archive: _Archive, store: BlobStore, check: CheckFactory | None) -> list[BlobInfo]:
    what = "OCI layout"
    layout = archive.read_json("oci-layout", what)
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise PermanentError(f"{what}: unsupported imageLayoutVersion in oci-layout")
    index = archive.read_json("index.json", what)
    if not isinstance(index, dict):
        raise PermanentError(f"{what}: index.json is not an object")
    manifest = _pick_manifest(archive, index.get("manifests"), what)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise PermanentError(f"{what}: manifest has no layers list")
    blobs: list[BlobInfo] = []
    for layer in layers:
        if not isinstance(layer, dict):
            raise PermanentError(f"{what}: malformed layer descriptor")
        digest = layer.get("digest")
        name = _blob_name(digest, what)
        member = archive.member(name, what)
        if isinstance(layer.get("size"), int) and layer["size"] != member.size:
            raise PermanentError(f"{what}: {name} is {member.size} bytes, manifest says {layer['size']}")
        blobs.append(archive.copy_to_store(name, store, digest, what, check))
    return blobs


def _docker_layers(archive: _Archive, store: BlobStore, check: CheckFactory | None) -> list[BlobInfo]:
    what = "docker save archive"
    manifest = archive.read_json("manifest.json", what)
    if not isinstance(manifest, list) or not manifest:
        raise PermanentError(f"{what}: manifest.json lists no images")
    if len(manifest) != 1:
        raise PermanentError(f"{what}: archive holds {len(manifest)} images; expected one")
    entry = manifest[0]
    layers = entry.get("Layers") if isinstance(entry, dict) else None
    if not isinstance(layers, list):
        raise PermanentError(f"{what}: manifest.json has no Layers list")
    blobs: list[BlobInfo] = []
    for ref in layers:
        name = safe_reference(ref, f"{what} manifest.json")
        # Newer docker names layers blobs/sha256/<hex>: then the name is a checksum too.
        expected = None
        if re.fullmatch(r"blobs/sha256/[0-9a-f]{64}", name):
            expected = "sha256:" + name.rsplit("/", 1)[1]
        blobs.append(archive.copy_to_store(name, store, expected, what, check))
    return blobs


def layers_of_archive(path: Path, fmt: str, store: BlobStore, limits: Limits = DEFAULT_LIMITS,
                      check: CheckFactory | None = None) -> list[BlobInfo]:
    """Copy the layers of an OCI image layout or `docker save` archive into the store
    (streamed, hashed, OCI digests checked against their names, and each one through
    `check(size)` as it is copied: nothing is stored that fails it); their BlobInfos, in order."""
    if fmt not in ARCHIVE_FORMATS:
        raise PermanentError(f"not an image archive format: {fmt}")
    path = Path(path)
    with open(path, "rb") as fh:
        archive = _Archive(fh, path.stat().st_size, limits)
        blobs = _oci_layers(archive, store, check) if fmt == "oci-layout" else _docker_layers(archive, store, check)
    log.info("layers extracted from archive", format=fmt, layers=len(blobs))
    return blobs
