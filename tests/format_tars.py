"""A corpus of well-formed and odd-but-real tar encodings (as opposed to tests/hostile_tars.py,
which is about escapes): what GNU tar and other archivers write, and the corner cases where
tar readers have disagreed. Each is `FormatCase(name, build)`; `build()` gives the bytes.

Used by tests/test_tardecoder.py (the decoder's reading) and tests/test_gnu_tar_differential.py
(the unpacker against GNU tar)."""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.hostile_tars import _pax_record, _rechecksum

MTIME = 1_700_000_000
END = bytes(1024)


@dataclass(frozen=True)
class FormatCase:
    name: str
    build: Callable[[], bytes]


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, *, fmt: int = tarfile.USTAR_FORMAT,
           patch: dict[int, bytes] | None = None, **fields: object) -> bytes:
    """One header block, fields patched at byte offsets (the checksum recomputed)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.mode = kind, size, MTIME, 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    block = bytearray(info.tobuf(fmt, "utf-8", "surrogateescape")[-512:])
    for offset, value in (patch or {}).items():
        block[offset: offset + len(value)] = value
    return _rechecksum(block)


def file(name: str, data: bytes = b"x\n", **kw: object) -> bytes:
    return header(name, size=len(data), **kw) + _padded(data)  # type: ignore[arg-type]


def pax(records: list[tuple[str, str]], kind: bytes = tarfile.XHDTYPE) -> bytes:
    body = b"".join(_pax_record(key, value) for key, value in records)
    return header("./PaxHeaders/x", kind, len(body)) + _padded(body)


def gnu_tar_archive(fmt: str) -> bytes:
    """A small tree written by GNU tar itself: long names and link targets, a hardlink, a
    fifo, a device node, odd modes, an xattr, and a sparse file (formats that have them)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        deep = tree / ("d" * 60) / ("e" * 60)
        deep.mkdir(parents=True)
        (deep / ("f" * 90)).write_bytes(bytes(range(256)) * 300)
        (tree / "small").write_bytes(b"x" * 511)
        (tree / "small").chmod(0o4755)
        os.setxattr(tree / "small", "user.origin", b"gnu tar")
        os.symlink("/" + "t" * (90 if fmt == "ustar" else 150), tree / "longlink")
        os.link(tree / "small", tree / "hard")
        os.mkfifo(tree / "fifo")
        if os.geteuid() == 0:
            os.mknod(tree / "null", 0o20666, os.makedev(1, 3))
        with open(tree / "sparse", "wb") as fh:
            fh.truncate(3 << 20)
            fh.seek(100_000)
            fh.write(b"A" * 5000)
            fh.seek(2 << 20)
            fh.write(b"B" * 70_000)
        for path in tree.rglob("*"):
            os.utime(path, (MTIME, MTIME), follow_symlinks=False)
        os.utime(tree, (MTIME, MTIME))
        archive = Path(tmp) / "a.tar"
        options = [f"--format={fmt.split('-')[0]}", "--xattrs"]
        if fmt != "ustar":
            options.append("-S")
        if fmt.startswith("posix-"):
            options.append(f"--sparse-version={fmt.split('-')[1]}")
        subprocess.run(["tar", "-cf", str(archive), *options, "-C", str(tree), "."], check=True, timeout=60,
                       capture_output=True)
        return archive.read_bytes()


FORMAT_CASES: list[FormatCase] = [
    *(FormatCase(f"gnu_tar_{fmt}", lambda fmt=fmt: gnu_tar_archive(fmt))  # type: ignore[misc]
      for fmt in ("gnu", "oldgnu", "ustar", "posix-0.0", "posix-0.1", "posix-1.0")),
    # numbers: GNU tar's from_header
    FormatCase("octal_with_blanks", lambda: file("n", patch={136: b"  1234567\0  ", 108: b"12 3\0\0\0\0"}) + END),
    FormatCase("negative_base256_mtime", lambda: file("n", patch={136: b"\xff" * 8 + b"\xff\xff\xfc\x18"}) + END),
    FormatCase("positive_base256_uid", lambda: file("n", patch={108: b"\x80" + bytes(5) + b"\x03\xe8"}) + END),
    FormatCase("negative_base256_uid", lambda: file("n", patch={108: b"\xff" * 7 + b"\xfe"}) + END),
    FormatCase("negative_base256_size", lambda: file("n", patch={124: b"\xff" * 12}) + END),
    FormatCase("blank_mode", lambda: file("n", patch={100: b" " * 8}) + END),
    FormatCase("mode_with_a_tail", lambda: file("n", patch={100: b"0644x\0\0\0"}) + END),
    FormatCase("empty_mode", lambda: file("n", patch={100: bytes(8)}) + END),
    # names: the ustar prefix
    FormatCase("ustar_prefix", lambda: file("n", patch={345: b"pre"}) + END),
    FormatCase("ustar_prefix_odd_version", lambda: file("n", patch={345: b"pre", 263: b"xx"}) + END),
    FormatCase("old_gnu_prefix_bytes", lambda: file("n", fmt=tarfile.GNU_FORMAT, patch={345: b"pre"}) + END),
    FormatCase("v7_directory", lambda: header("vd/") + file("vd/f") + END),
    FormatCase("contiguous_file", lambda: file("c7", kind=b"7") + END),  # type: ignore[arg-type]
    # pax records
    FormatCase("global_path_then_local", lambda: pax([("path", "g")], b"g") + file("a", b"1\n") + pax([("path", "loc")])
               + file("b", b"22\n") + END),
    FormatCase("global_replaced", lambda: pax([("path", "g")], b"g") + pax([("comment", "c")], b"g") + file("a") + END),
    FormatCase("global_mtime", lambda: pax([("mtime", "1234")], b"g") + file("a") + END),
    FormatCase("global_size", lambda: pax([("size", "3")], b"g") + file("a", b"1\n") + END),
    FormatCase("mtime_with_a_tail", lambda: pax([("mtime", "1600000000.5abc")]) + file("a") + END),
    FormatCase("mtime_with_a_tail_no_fraction", lambda: pax([("mtime", "16000x")]) + file("a") + END),
    FormatCase("mtime_not_a_number", lambda: pax([("mtime", "abc")]) + file("a") + END),
    FormatCase("uid_with_a_tail", lambda: pax([("uid", "12x")]) + file("a") + END),
    FormatCase("size_with_a_tail", lambda: pax([("size", "2x")]) + file("a") + END),
    FormatCase("pax_record_without_newline", lambda: header("./PaxHeaders/x", b"x", 10) + _padded(b"5 a=b\nzz\n")
               + file("a") + END),
    FormatCase("pax_binary_xattr", lambda: pax([("SCHILY.xattr.user.bin", "\udcff\x00\udc80x")]) + file("a") + END),
    FormatCase("gnu_long_name_then_pax_path", lambda: header("././@LongLink", b"L", 6, fmt=tarfile.GNU_FORMAT)
               + _padded(b"gnuln\0") + pax([("path", "paxp")]) + file("a") + END),
    # data after headers that carry none, and the end of the archive
    FormatCase("directory_with_data", lambda: header("d", tarfile.DIRTYPE, 512) + file("inner", b"z\n") + file("f")
               + END),
    FormatCase("directory_with_zero_data", lambda: header("d", tarfile.DIRTYPE, 512) + bytes(512) + file("f") + END),
    FormatCase("symlink_with_data", lambda: header("s", tarfile.SYMTYPE, 512, linkname="t") + file("inner") + END),
    FormatCase("hardlink_with_data", lambda: file("a") + header("h", tarfile.LNKTYPE, 512, linkname="a")
               + file("inner") + END),
    FormatCase("fifo_with_data", lambda: header("p", tarfile.FIFOTYPE, 512) + file("inner") + END),
    FormatCase("device_with_data", lambda: header("c", tarfile.CHRTYPE, 512, devmajor=1, devminor=3) + file("inner")
               + END),
    FormatCase("v7_directory_with_data", lambda: header("d2/", size=2) + _padded(b"1\n") + END),
    FormatCase("data_after_the_end", lambda: file("a") + END + file("b") + END),
    FormatCase("lone_zero_block", lambda: file("a") + bytes(512) + file("b") + END),
    FormatCase("no_end_marker", lambda: file("a")),
    FormatCase("cut_inside_a_member", lambda: header("a", size=2000) + _padded(b"x\n")),
    FormatCase("unknown_type", lambda: header("u", b"Z", 2) + _padded(b"u\n") + file("after") + END),
]


def _test_layers() -> list[FormatCase]:
    """The layers and archives other tests build: test_unpack's normal layer, test_formats'
    layer and its OCI layout and docker save archives (tars too: GNU tar extracts them)."""
    from tests.test_formats import _docker_archive, _oci_archive, layer_tar
    from tests.test_unpack import normal_layer, tar_bytes

    return [
        FormatCase("test_unpack_normal_layer", lambda: tar_bytes(*normal_layer()[0])),
        FormatCase("test_formats_layer", lambda: layer_tar(3)),
        FormatCase("test_formats_oci_layout", lambda: _oci_archive([layer_tar(1), layer_tar(2)])),
        FormatCase("test_formats_docker_save", lambda: _docker_archive([layer_tar(1)], new_style=True)),
        FormatCase("test_formats_docker_save_old", lambda: _docker_archive([layer_tar(2)], new_style=False)),
    ]


FORMAT_CASES += _test_layers()
