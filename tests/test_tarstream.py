"""images/tarstream.py reads members exactly as tarfile does (the verifier parses the same
bytes with tarfile): every layer of the hostile corpus, the normal test layer, and archives
written by GNU tar itself in its three formats, member by member."""

from __future__ import annotations

import io
import math
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from images.tarstream import Member, TarFormatError, TarReader, TarRefused
from tests.hostile_tars import HOSTILE_CASES, HostileCase
from tests.test_unpack import normal_layer, tar_bytes


def _fields(member: tarfile.TarInfo | Member) -> tuple[object, ...]:
    # tarfile drops a directory's trailing "/" in some paths and not others; the unpacker
    # normalizes names either way, so compare them without it.
    devices = (member.devmajor, member.devminor) if member.ischr() or member.isblk() else (0, 0)
    mtime = "nan" if isinstance(member.mtime, float) and math.isnan(member.mtime) else member.mtime
    return (member.name.rstrip("/"), member.type, member.mode, member.uid, member.gid, member.size,
            mtime, member.linkname, devices, dict(member.pax_headers))


def with_tarfile(data: bytes) -> list[tuple[object, ...]]:
    result = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        for member in archive:
            fields = _fields(member)
            if member.isreg():
                fields += (archive.extractfile(member).read(),)  # type: ignore[union-attr]
            result.append(fields)
    return result


def with_reader(data: bytes) -> list[tuple[object, ...]]:
    reader = TarReader(io.BytesIO(data), read_size=4096)  # small reads: headers and data span them
    result = []
    for member in reader.members():
        fields = _fields(member)
        if member.isreg():
            fields += (b"".join(bytes(view) for view in reader.data(member)),)
        result.append(fields)
    return result


def _tarfile_reads(data: bytes) -> bool:
    try:
        with_tarfile(data)
    except (tarfile.TarError, EOFError, ValueError):
        return False
    return True


# Where the reader deliberately differs from tarfile, refusing as TarStreamGuard does in
# front of tarfile (the verifier's way):
# * a bad checksum after the first member: tarfile ends the archive there quietly;
# * GNU sparse members: tarfile maps them;
# * a pax path over max_path_bytes, a component over max_name_bytes: tarfile reads them
#   (the reader refuses the first, the unpacker the second);
# * a global pax header setting path or linkpath: tarfile applies it to every later member.
STRICTER = {"bad_checksum_mid_archive": "bad header checksum", "gnu_sparse_member": "sparse",
            "path_too_long": "path too long", "pax_global_header_sets_path": "global pax header sets path",
            "pax_global_header_sets_linkpath": "global pax header sets linkpath"}


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_hostile_layers_read_as_tarfile_reads_them(case: HostileCase) -> None:
    data = case.build()
    if case.name in STRICTER:
        with pytest.raises((TarFormatError, TarRefused), match=STRICTER[case.name]):
            with_reader(data)
        return
    if not _tarfile_reads(data):  # refused by tarfile (truncations, garbage): the reader refuses too
        with pytest.raises(TarFormatError):
            with_reader(data)
        return
    assert with_reader(data) == with_tarfile(data)


def test_the_normal_layer_reads_as_tarfile_reads_it() -> None:
    members, _, _ = normal_layer()
    data = tar_bytes(*members)
    assert with_reader(data) == with_tarfile(data) and len(with_reader(data)) == len(members)


@pytest.mark.parametrize("fmt", ["gnu", "ustar", "posix"])
def test_gnu_tar_archives_read_as_tarfile_reads_them(fmt: str, tmp_path: Path) -> None:
    """Written by GNU tar: long names and link targets (GNU L/K records, ustar prefixes, pax
    records), a hardlink, a fifo, odd modes."""
    tree = tmp_path / "tree"
    deep = tree / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 90)).write_bytes(os.urandom(70_000))
    (tree / "small").write_bytes(b"x" * 511)
    (tree / "small").chmod(0o4755)
    os.symlink("/" + "t" * (90 if fmt == "ustar" else 150), tree / "longlink")  # ustar: 100 at most
    os.link(tree / "small", tree / "hard")
    os.mkfifo(tree / "fifo")
    archive = tmp_path / "a.tar"
    subprocess.run(["tar", "-cf", str(archive), f"--format={fmt}", "-C", str(tree), "."], check=True,
                   timeout=60, capture_output=True)
    data = archive.read_bytes()
    got = with_reader(data)
    assert got == with_tarfile(data)
    assert any(len(str(fields[0])) > 200 for fields in got)  # the long name came through whole


# --- the reader refuses what the verifier's TarStreamGuard refuses ---------------------------

def _pax_member(records: dict[str, str], kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A pax header of `records` (type x, or g for global) before one small file."""
    body = b"".join(_record(key, value) for key, value in records.items())
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = kind, len(body)
    info = tarfile.TarInfo("file")
    info.size = 2
    return (header.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)
            + info.tobuf(tarfile.USTAR_FORMAT) + b"x\n" + bytes(510) + bytes(1024))


def _record(key: str, value: str) -> bytes:
    payload = f" {key}={value}\n".encode()
    length = len(payload) + 1
    while len(str(length)) + len(payload) != length:
        length += 1
    return str(length).encode() + payload


def _dir_with_data() -> bytes:
    info = tarfile.TarInfo("d")
    info.type, info.size = tarfile.DIRTYPE, 512
    return info.tobuf(tarfile.USTAR_FORMAT) + bytes(512) + bytes(1024)


CRAFTED = {
    "oversized-pax-record": _pax_member({"comment": "c" * (2 << 20)}),
    "global-pax-path": _pax_member({"path": "elsewhere"}, tarfile.XGLTYPE),
    "pax-sparse-map": _pax_member({"GNU.sparse.map": "0,1"}),
    "directory-with-data": _dir_with_data(),
    "pax-ok": _pax_member({"comment": "fine", "mtime": "1700000000.5"}),
}


def _guard_refuses(data: bytes) -> bool:
    from images.formats import DEFAULT_LIMITS
    from images.verify import TarStreamGuard
    from support.errors import PermanentError

    guard = TarStreamGuard(None, DEFAULT_LIMITS)
    try:
        guard.feed(data)
        guard.finish()
    except PermanentError:
        return True
    return False


def _reader_refuses(data: bytes) -> bool:
    from images.formats import DEFAULT_LIMITS

    reader = TarReader(io.BytesIO(data), 4096, max_metadata_bytes=DEFAULT_LIMITS.max_metadata_bytes,
                       max_path_bytes=DEFAULT_LIMITS.max_path_bytes)
    try:
        for member in reader.members():
            if member.carries_data():
                for _ in reader.data(member):
                    pass
        reader.finish()
    except (TarFormatError, TarRefused):
        return True
    return False


@pytest.mark.parametrize("name", [*(case.name for case in HOSTILE_CASES), *CRAFTED])
def test_the_reader_refuses_what_the_stream_guard_refuses(name: str) -> None:
    """The unpacker no longer runs the guard in front of its reader: one parser in one pass.
    So the reader must refuse exactly the streams the guard refuses."""
    data = CRAFTED[name] if name in CRAFTED else next(c for c in HOSTILE_CASES if c.name == name).build()
    assert _reader_refuses(data) == _guard_refuses(data)
    if name == "pax-ok":
        assert not _reader_refuses(data)
    elif name in CRAFTED:
        assert _reader_refuses(data)
