"""images.formats and images.verify on real files built here: every format sniffed by
content, hostile and broken blobs rejected with a clear reason, archives unpacked into
layers with their digests checked."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import zstandard

from images.blobstore import BlobStore
from images.formats import Limits, layers_of_archive, open_layer_stream, sniff_format
from images.verify import BlobCheck, verify_blob
from support.errors import PermanentError


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(files: dict[str, bytes], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def layer_tar(seed: int = 0) -> bytes:
    rng = os.urandom if seed < 0 else None
    files = {f"usr/lib/file{i}": (rng(2000 * i) if rng else bytes([seed]) * (2000 * i)) for i in range(20)}
    files["etc/os-release"] = b"ID=debian\n" * 50
    return tar_bytes(files)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "state")


# --- sniffing ---------------------------------------------------------------------------

def test_formats_are_sniffed_by_content_not_name(tmp_path: Path) -> None:
    plain = layer_tar(-1)
    assert sniff_format(write(tmp_path / "a.tar", plain)) == "tar"
    assert sniff_format(write(tmp_path / "b.tar", gzip.compress(plain))) == "tar+gzip"  # named .tar
    assert sniff_format(write(tmp_path / "c.gz", zstandard.ZstdCompressor().compress(plain))) == "tar+zstd"
    assert sniff_format(write(tmp_path / "d.zip", tar_bytes({"x": b"1"}, tarfile.PAX_FORMAT))) == "tar"
    assert sniff_format(write(tmp_path / "e", tar_bytes({"./usr/x": b"1"}, tarfile.GNU_FORMAT))) == "tar"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unsupported format: empty file"),
        (b"PK\x03\x04" + b"\0" * 600, "unsupported format: zip archive"),
        (b"hello world, this is not an image\n" * 20, "unsupported format: not a tar: text starting 'hello world, thi'"),
        (b"BZh91AY&SY" + b"\0" * 600, "unsupported format: bzip2-compressed data"),
        (gzip.compress(b"just some text, not a tar at all" * 40), "gzip-compressed data that is not a tar"),
        (zstandard.ZstdCompressor().compress(os.urandom(2000)), "zstd-compressed data that is not a tar"),
    ],
)
def test_other_content_is_rejected_with_what_it_looks_like(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(PermanentError, match=reason):
        sniff_format(write(tmp_path / "blob.tar", data))


def test_a_real_zip_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("etc/passwd", "root:x:0:0::/root:/bin/sh\n" * 50)
    with pytest.raises(PermanentError, match="^unsupported format: zip archive$"):
        sniff_format(path)


# --- verification -----------------------------------------------------------------------

@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
def test_verify_reads_the_whole_tar(tmp_path: Path, compress: str) -> None:
    plain = layer_tar(-1)
    data = {"none": plain, "gzip": gzip.compress(plain),
            "zstd": zstandard.ZstdCompressor().compress(plain)}[compress]
    path = write(tmp_path / "layer", data)

    verified = verify_blob(path, digest_of(data))

    assert verified.digest == digest_of(data)
    assert verified.format == {"none": "tar", "gzip": "tar+gzip", "zstd": "tar+zstd"}[compress]
    assert verified.entries == 21
    assert verified.uncompressed_bytes == len(plain)


def test_open_layer_stream_yields_the_decompressed_tar(tmp_path: Path) -> None:
    plain = layer_tar(-1)
    for fmt, data in (("tar+gzip", gzip.compress(plain)), ("tar+zstd", zstandard.ZstdCompressor().compress(plain))):
        path = write(tmp_path / fmt, data)
        with open_layer_stream(path, fmt, Limits()) as stream:
            chunks = []
            while chunk := stream.read(7000):
                chunks.append(chunk)
        assert b"".join(chunks) == plain


def test_checksum_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path / "layer", layer_tar(-1))
    with pytest.raises(PermanentError, match="^checksum mismatch: layer: expected sha256:0{64}, got sha256:"):
        verify_blob(path, "sha256:" + "0" * 64)


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_blobs_are_rejected(tmp_path: Path, compress: str, keep: float) -> None:
    plain = layer_tar(-1)
    data = {"none": plain, "gzip": gzip.compress(plain),
            "zstd": zstandard.ZstdCompressor().compress(plain)}[compress]
    cut = data[: int(len(data) * keep)]
    path = write(tmp_path / "layer", cut)
    with pytest.raises(PermanentError, match="truncated or corrupt"):
        verify_blob(path, digest_of(cut))


def test_tar_cut_at_a_member_boundary_is_still_truncated(tmp_path: Path) -> None:
    plain = tar_bytes({"a": b"x" * 512, "b": b"y" * 512})
    cut = plain[: 512 * 4]  # two complete members, no end-of-archive marker
    for name, data in (("plain", cut), ("gz", gzip.compress(cut))):
        path = write(tmp_path / name, data)
        with pytest.raises(PermanentError, match="without an end"):
            verify_blob(path, digest_of(data))


def test_data_after_the_end_marker_is_never_read_as_members(tmp_path: Path) -> None:
    """GNU tar stops at the end-of-archive block; so do the check and the unpacker (one
    decoder): a second archive after it is not a member of the layer, the compressed
    stream around it must still be whole."""
    smuggled = tar_bytes({"a": b"1"}) + tar_bytes({"evil": b"2"})
    path = write(tmp_path / "layer.tar.gz", gzip.compress(smuggled))
    assert verify_blob(path, digest_of(path.read_bytes())).entries == 1
    cut = path.read_bytes()[:-4]  # the gzip trailer, after the end marker
    path.write_bytes(cut)
    with pytest.raises(PermanentError, match="truncated or corrupt gzip"):
        verify_blob(path, digest_of(cut))


def test_oversized_pax_header_is_rejected_before_it_is_read(tmp_path: Path) -> None:
    # A pax header claiming 4 GiB: tarfile would try to read it into memory.
    info = tarfile.TarInfo("x" * 10)
    info.type = tarfile.XHDTYPE
    info.size = 4 << 30
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    data = gzip.compress(header + b"0" * 10_000 + bytes(1024))
    path = write(tmp_path / "layer", data)
    with pytest.raises(PermanentError, match="metadata record of 4294967296 bytes"):
        verify_blob(path, digest_of(data))


def test_entry_and_path_limits(tmp_path: Path) -> None:
    data = tar_bytes({f"dir/f{i}": b"" for i in range(30)})
    path = write(tmp_path / "many", data)
    with pytest.raises(PermanentError, match="too many entries: more than max_entries=10"):
        verify_blob(path, digest_of(data), Limits(max_entries=10))
    long_name = tar_bytes({"d/" + "n" * 300: b"x"}, tarfile.PAX_FORMAT)
    path = write(tmp_path / "long", long_name)
    with pytest.raises(PermanentError, match="path too long"):
        verify_blob(path, digest_of(long_name), Limits(max_path_bytes=200))


def _gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def test_gzip_bomb_is_stopped(tmp_path: Path) -> None:
    # A tar claiming one 10 GiB file of zeros, as a multi-member gzip: ~10 MB on disk,
    # built in milliseconds by repeating one compressed MiB of zeros.
    info = tarfile.TarInfo("zeros")
    info.size = 10 << 30
    zeros = _gzip_member(bytes(1 << 20))
    path = tmp_path / "bomb.tar"
    with open(path, "wb") as out:
        out.write(_gzip_member(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(10 * 1024):
            out.write(zeros)
        out.write(_gzip_member(bytes(1024)))
    digest = digest_of(path.read_bytes())
    started = time.monotonic()

    with pytest.raises(PermanentError, match=r"^decompression bomb: \d+ compressed bytes expand past \d+ \(ratio limit 50\)$"):
        verify_blob(path, digest, Limits(max_ratio=50, ratio_grace_bytes=1 << 20))
    with pytest.raises(PermanentError, match="^decompression bomb: more than 33554432 bytes decompressed$"):
        verify_blob(path, digest, Limits(max_uncompressed_bytes=32 << 20))
    assert time.monotonic() - started < 20


def test_zstd_bomb_is_stopped_with_bounded_memory(tmp_path: Path) -> None:
    info = tarfile.TarInfo("zeros")
    info.size = 8 << 30
    compressor = zstandard.ZstdCompressor()
    frame = compressor.compress(bytes(64 << 20))  # one frame of 64 MiB of zeros: ~2 KB
    path = tmp_path / "bomb.zst"
    with open(path, "wb") as out:
        out.write(compressor.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(128):
            out.write(frame)
    with pytest.raises(PermanentError, match="^decompression bomb"):
        verify_blob(path, digest_of(path.read_bytes()), Limits(max_ratio=1000, ratio_grace_bytes=1 << 20))


# --- OCI image layout and docker save ------------------------------------------------------

def _oci_archive(layers: list[bytes], *, tamper: bool = False) -> bytes:
    blobs: dict[str, bytes] = {}

    def add_blob(data: bytes) -> dict[str, object]:
        digest = digest_of(data)
        blobs[f"blobs/sha256/{digest.split(':')[1]}"] = data
        return {"digest": digest, "size": len(data)}

    config = add_blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    layer_descriptors = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **add_blob(layer)} for layer in layers
    ]
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": layer_descriptors,
    }).encode()
    manifest_descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **add_blob(manifest)}
    if tamper:
        name = next(n for n in blobs if blobs[n] == layers[0])
        blobs[name] = layers[0][:-1] + b"!"
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": json.dumps({"schemaVersion": 2, "manifests": [manifest_descriptor]}).encode(),
        **blobs,
    }
    return tar_bytes(files)


def test_oci_layout_layers_are_stored_in_order(tmp_path: Path, store: BlobStore) -> None:
    layers = [gzip.compress(layer_tar(1)), layer_tar(2), zstandard.ZstdCompressor().compress(layer_tar(3))]
    path = write(tmp_path / "image.tar", _oci_archive(layers))
    assert sniff_format(path) == "oci-layout"
    assert verify_blob(path, digest_of(path.read_bytes())).format == "oci-layout"

    digests = [blob.digest for blob in layers_of_archive(path, "oci-layout", store)]

    assert digests == [digest_of(layer) for layer in layers]
    assert [store.path(d).read_bytes() for d in digests] == layers
    assert [sniff_format(store.path(d)) for d in digests] == ["tar+gzip", "tar", "tar+zstd"]


def test_oci_layer_that_does_not_match_its_digest_is_rejected(tmp_path: Path, store: BlobStore) -> None:
    path = write(tmp_path / "image.tar", _oci_archive([layer_tar(1), layer_tar(2)], tamper=True))
    with pytest.raises(PermanentError, match="checksum mismatch"):
        layers_of_archive(path, "oci-layout", store)
    assert list(store.blob_dir.iterdir()) == []


def _docker_archive(layers: list[bytes], *, new_style: bool, layer_names: list[str] | None = None) -> bytes:
    files: dict[str, bytes] = {}
    names: list[str] = []
    for i, layer in enumerate(layers):
        if new_style:
            name = f"blobs/sha256/{hashlib.sha256(layer).hexdigest()}"
        else:
            name = f"{hashlib.sha256(str(i).encode()).hexdigest()}/layer.tar"
        files[name] = layer
        names.append(name)
    files["config.json"] = b"{}"
    manifest = [{"Config": "config.json", "RepoTags": ["demo:latest"], "Layers": layer_names or names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    files["repositories"] = b"{}"
    return tar_bytes(files)


@pytest.mark.parametrize("new_style", [False, True])
def test_docker_save_layers_are_stored_in_order(tmp_path: Path, store: BlobStore, new_style: bool) -> None:
    layers = [layer_tar(5), layer_tar(4), gzip.compress(layer_tar(6))]
    path = write(tmp_path / "saved.tar", _docker_archive(layers, new_style=new_style))
    assert sniff_format(path) == "docker-save"

    digests = [blob.digest for blob in layers_of_archive(path, "docker-save", store)]

    assert digests == [digest_of(layer) for layer in layers]
    assert all(store.has(d) for d in digests)


def test_archive_layers_are_checked_as_they_are_copied(tmp_path: Path, store: BlobStore) -> None:
    """The streaming checks ride on the copy out of the archive: each layer's findings come
    back with it, and a corrupt layer is never stored."""
    layers = [layer_tar(5), gzip.compress(layer_tar(6))]
    path = write(tmp_path / "saved.tar", _docker_archive(layers, new_style=True))
    blobs = layers_of_archive(path, "docker-save", store, check=BlobCheck)
    assert [(b.findings.format, b.findings.entries) for b in blobs] == [("tar", 21), ("tar+gzip", 21)]
    corrupt = bytearray(layer_tar(7))
    corrupt[512 + 148:512 + 156] = b"0000000\0"  # the second header's checksum (file0 is empty)
    path = write(tmp_path / "bad.tar", _docker_archive([layer_tar(8), bytes(corrupt)], new_style=False))
    with pytest.raises(PermanentError, match="bad header checksum at byte 512"):
        layers_of_archive(path, "docker-save", store, check=BlobCheck)
    assert not store.has(digest_of(bytes(corrupt)))
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("chunk", [1, 511, 4096, 1 << 20])
def test_streaming_checks_find_the_same_in_any_chunking(compress: str, chunk: int) -> None:
    """BlobCheck is fed whatever the network delivers: one byte at a time or a megabyte."""
    plain = layer_tar(3)
    data = {"none": plain, "gzip": gzip.compress(plain), "zstd": zstandard.ZstdCompressor().compress(plain)}[compress]
    check = BlobCheck(len(data))
    for at in range(0, len(data), chunk if chunk > 1 else 997):
        check.feed(data[at: at + (chunk if chunk > 1 else 997)])
    found = check.finish()
    assert found.format == {"none": "tar", "gzip": "tar+gzip", "zstd": "tar+zstd"}[compress]
    assert found.entries == 21 and found.uncompressed_bytes == len(plain)


@pytest.mark.parametrize("reference", ["../../etc/passwd", "/etc/passwd", "a/../../b", "x\\..\\y"])
def test_docker_save_path_traversal_is_rejected(tmp_path: Path, store: BlobStore, reference: str) -> None:
    path = write(tmp_path / "saved.tar", _docker_archive([layer_tar(1)], new_style=False, layer_names=[reference]))
    with pytest.raises(PermanentError, match="unsafe path in docker save archive manifest.json"):
        layers_of_archive(path, "docker-save", store)


def test_docker_save_missing_layer_and_oversized_json(tmp_path: Path, store: BlobStore) -> None:
    path = write(tmp_path / "saved.tar", _docker_archive([layer_tar(1)], new_style=False, layer_names=["nope/layer.tar"]))
    with pytest.raises(PermanentError, match="nope/layer.tar is missing from the archive"):
        layers_of_archive(path, "docker-save", store)
    with pytest.raises(PermanentError, match="over the 10 limit"):
        layers_of_archive(path, "docker-save", store, Limits(max_json_bytes=10))


# --- hostile archives (issue 10): malformed digests, deep indexes, duplicate and symlink members ---

ArchiveMember = tuple[str, bytes | None, str]  # name, data (None: a symlink), symlink target


def archive_of(members: list[ArchiveMember]) -> bytes:
    """A tar of `members` in order (duplicates and symlinks as given)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def oci_members(layers: list[bytes], *, layer_digest: object = None, nested: int = 0) -> list[ArchiveMember]:
    """An OCI layout's members: `nested` image indexes between index.json and the manifest,
    the first layer's descriptor digest replaced by `layer_digest` when given."""
    blobs: list[ArchiveMember] = []

    def add_blob(data: bytes) -> dict[str, object]:
        blobs.append((f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data, ""))
        return {"digest": digest_of(data), "size": len(data)}

    config = add_blob(b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')
    descriptors = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **add_blob(layer)} for layer in layers]
    if layer_digest is not None:
        descriptors[0]["digest"] = layer_digest
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": descriptors}).encode()
    top = {"mediaType": MANIFEST_TYPE, **add_blob(manifest)}
    for _ in range(nested):
        index = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [top]}).encode()
        top = {"mediaType": INDEX_TYPE, **add_blob(index)}
    return [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', ""),
            ("index.json", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode(), ""), *blobs]


def _layer_blob_name(layer: bytes) -> str:
    return f"blobs/sha256/{hashlib.sha256(layer).hexdigest()}"


def hostile_oci(kind: str) -> bytes:
    """One hostile OCI layout per kind (see OCI_REFUSALS for what each must be refused with)."""
    layer = layer_tar(1)
    if kind.startswith("digest-"):
        digest = {"digest-traversal": "sha256:../../../../etc/passwd", "digest-uppercase": "sha256:" + "A" * 64,
                  "digest-sha512": "sha512:" + "0" * 128, "digest-not-a-string": 42}[kind]
        return archive_of(oci_members([layer], layer_digest=digest))
    if kind == "nested-index-too-deep":
        return archive_of(oci_members([layer], nested=3))
    members = oci_members([layer])
    if kind == "duplicate-index":  # a second index.json after the first: which one would a reader take?
        return archive_of([*members, ("index.json", b'{"schemaVersion":2,"manifests":[]}', "")])
    if kind == "duplicate-layer":  # the layer blob twice, the second not matching its name
        return archive_of([*members, (_layer_blob_name(layer), layer_tar(2), "")])
    if kind == "symlink-layer":  # the layer blob is a symlink to a host file
        return archive_of([(n, d, t) if n != _layer_blob_name(layer) else (n, None, "/etc/shadow")
                           for n, d, t in members])
    if kind == "symlink-index":
        return archive_of([(n, d, t) if n != "index.json" else (n, None, "../../etc/passwd") for n, d, t in members])
    raise ValueError(kind)


OCI_REFUSALS = {
    "digest-traversal": r"unsupported or malformed digest 'sha256:\.\./\.\./\.\./\.\./etc/passwd'",
    "digest-uppercase": "unsupported or malformed digest 'sha256:AAAA",
    "digest-sha512": "unsupported or malformed digest 'sha512:",
    "digest-not-a-string": "unsupported or malformed digest 42",
    "nested-index-too-deep": "image indexes nested too deep",
    "duplicate-index": "index.json appears more than once in the archive",
    "duplicate-layer": "appears more than once in the archive",
    "symlink-layer": "is not a regular file",
    "symlink-index": "index.json is not a regular file",
}


@pytest.mark.parametrize("kind", OCI_REFUSALS)
def test_hostile_oci_layouts_are_refused_before_a_layer_is_stored(kind: str, tmp_path: Path, store: BlobStore) -> None:
    path = write(tmp_path / "image.tar", hostile_oci(kind))
    assert sniff_format(path) == "oci-layout"
    with pytest.raises(PermanentError, match=OCI_REFUSALS[kind]):
        layers_of_archive(path, "oci-layout", store)
    assert not store.blob_dir.exists() or [p for p in store.blob_dir.rglob("*") if p.is_file()] == []


def test_two_nested_indexes_are_within_the_depth_limit(tmp_path: Path, store: BlobStore) -> None:
    """The limit's other side: index.json -> index -> index -> manifest is followed."""
    layer = layer_tar(1)
    path = write(tmp_path / "image.tar", archive_of(oci_members([layer], nested=2)))
    assert [blob.digest for blob in layers_of_archive(path, "oci-layout", store)] == [digest_of(layer)]


def hostile_docker_save(kind: str, layers: list[bytes]) -> bytes:
    names = [f"{hashlib.sha256(str(i).encode()).hexdigest()}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["demo:latest"], "Layers": names}]).encode()
    members: list[ArchiveMember] = [("config.json", b"{}", ""), ("manifest.json", manifest, ""),
                                    *((n, layer, "") for n, layer in zip(names, layers))]
    if kind == "symlink-layer":  # the last layer.tar is a symlink out of the archive
        members[-1] = (names[-1], None, "../../../../etc/shadow")
    elif kind == "duplicate-manifest":
        members.append(("manifest.json", json.dumps([{"Config": "config.json", "Layers": []}]).encode(), ""))
    elif kind != "plain":
        raise ValueError(kind)
    return archive_of(members)


@pytest.mark.parametrize("kind,reason", [("symlink-layer", "layer.tar is not a regular file"),
                                         ("duplicate-manifest", "manifest.json appears more than once")])
def test_hostile_docker_saves_are_refused(kind: str, reason: str, tmp_path: Path, store: BlobStore) -> None:
    path = write(tmp_path / "saved.tar", hostile_docker_save(kind, [layer_tar(1), layer_tar(2)]))
    assert sniff_format(path) == "docker-save"
    with pytest.raises(PermanentError, match=reason):
        layers_of_archive(path, "docker-save", store)
