"""images/tardecoder.py, the one tar decoder: its two drivers (pulled by the unpacker and
the archive listing, pushed by the download-time check) see the same members and refuse the
same streams, and it reads headers as GNU tar 1.34 does (numbers, prefixes, pax records,
global headers, sparse members, data after headers that carry none, the end marker)."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from images.tardecoder import (
    END,
    Member,
    TarCorrupt,
    TarDecoder,
    TarLimits,
    TarReader,
    TarRefused,
    TarStreamGuard,
    parse_number,
    read_members,
)
from tests.hostile_tars import HOSTILE_CASES, _pax_record, _rechecksum, _sparse_pax
from tests.test_unpack import normal_layer, tar_bytes

LIMITS = TarLimits(max_entries=1000, max_entry_bytes=1 << 30)


def pulled(data: bytes, read_size: int = 4096) -> list[tuple[Member, bytes]] | str:
    """Members and data through the pull driver (small reads: headers span them), or the error."""
    reader = TarReader(io.BytesIO(data), read_size, LIMITS)
    out = []
    try:
        for member in reader.members():
            out.append((member, b"".join(bytes(v) for _, views in reader.pieces(member, 1 << 16) for v in views)))
        reader.finish()
    except (TarCorrupt, TarRefused) as exc:
        return f"{type(exc).__name__}: {exc}"
    return out


def pushed(data: bytes, seed: int) -> tuple[int, str]:
    """Entries counted by the push driver fed in random pieces, and its error ("" if none)."""
    guard = TarStreamGuard(LIMITS)
    rng = random.Random(seed)
    try:
        at = 0
        while at < len(data):
            step = rng.choice((1, 7, 511, 512, 513, 4096, 70_000))
            guard.feed(data[at: at + step])
            at += step
        guard.finish()
    except (TarCorrupt, TarRefused) as exc:
        return guard.entries, f"{type(exc).__name__}: {exc}"
    return guard.entries, ""


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_pull_and_push_drivers_agree_on_the_hostile_corpus(case) -> None:  # type: ignore[no-untyped-def]
    data = case.build()
    got = pulled(data)
    entries, error = pushed(data, seed=len(data))
    if isinstance(got, str):
        # the same error, up to where it says it happened (the drivers see different reads)
        assert error and got.split(" at byte")[0] == error.split(" at byte")[0], (got, error)
        if "checksum" in got:  # a header's position is the same in any reading
            assert got == error
    else:
        assert not error and entries == len(got), (error, entries, len(got))


def test_the_normal_layer_reads_whole() -> None:
    members, _, _ = normal_layer()
    got = pulled(tar_bytes(*members))
    assert not isinstance(got, str) and len(got) == len(members)


def _gnu_tar_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    deep = tree / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 90)).write_bytes(os.urandom(70_000))
    (tree / "small").write_bytes(b"x" * 511)
    os.symlink("/" + "t" * 150, tree / "longlink")
    os.link(tree / "small", tree / "hard")
    os.mkfifo(tree / "fifo")
    with open(tree / "sparse", "wb") as fh:
        fh.truncate(3 << 20)
        fh.seek(100_000)
        fh.write(b"A" * 5000)
        fh.seek(2 << 20)
        fh.write(b"B" * 70_000)
    return tree


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "ustar", "posix-0.0", "posix-0.1", "posix-1.0"])
def test_archives_gnu_tar_writes_list_as_gnu_tar_lists_them(fmt: str, tmp_path: Path) -> None:
    """Long names and link targets (GNU L/K, ustar prefixes, pax), a hardlink, a fifo, and a
    sparse file in each of GNU tar's sparse formats: same names, sizes and contents."""
    tree = _gnu_tar_tree(tmp_path)
    archive = tmp_path / "a.tar"
    options = [f"--format={fmt.split('-')[0]}"] + ([] if fmt == "ustar" else ["-S"])  # ustar: no sparse
    if fmt.startswith("posix"):
        options.append(f"--sparse-version={fmt.split('-')[1]}")
    if fmt == "ustar":
        os.unlink(tree / "longlink")  # ustar holds 100 bytes of link target at most
    subprocess.run(["tar", "-cf", str(archive), *options, "-C", str(tree), "."], check=True, timeout=60,
                   capture_output=True)
    listed = subprocess.run(["tar", "-tf", str(archive)], check=True, timeout=60, capture_output=True,
                            text=True).stdout.splitlines()
    got = pulled(archive.read_bytes())
    assert not isinstance(got, str), got
    assert [m.name for m, _ in got] == listed
    sparse = next(m for m, _ in got if m.name == "./sparse")
    contents = {m.name: data for m, data in got}
    segments = sparse.sparse if sparse.sparse is not None else [(0, sparse.size)]
    assert sparse.size == 3 << 20 and (fmt == "ustar" or sum(n for _, n in segments) < 200_000)
    rebuilt = bytearray(3 << 20)
    at = 0
    for offset, length in segments:
        rebuilt[offset: offset + length] = contents["./sparse"][at: at + length]
        at += length
    assert bytes(rebuilt) == (tree / "sparse").read_bytes()
    assert entries_pushed(archive.read_bytes()) == len(got)


def entries_pushed(data: bytes) -> int:
    entries, error = pushed(data, seed=1)
    assert not error, error
    return entries


# --- GNU tar's reading of header fields -----------------------------------------------------

@pytest.mark.parametrize("field, expected", [
    (b"0000644\0", 0o644), (b"  1234567\0  ", 0o1234567), (b"12 3\0\0\0\0", 0o12), (b"\0" * 8, 0),
    (b"\x80" + bytes(6) + b"\x05", 5), (b"\xff" * 8, -1), (b"\xff\xff\xff\xff\xff\xff\xfc\x18", -1000),
])
def test_numbers_read_as_gnu_tar_reads_them(field: bytes, expected: int) -> None:
    assert parse_number(field, "mtime", (-(2**63), 2**63 - 1)) == expected


@pytest.mark.parametrize("field", [b"        ", b"0644x\0\0\0", b"-17\0\0\0\0\0", b"1_0\0\0\0\0\0", b"+7\0\0\0\0\0\0"])
def test_malformed_numbers_are_corrupt(field: bytes) -> None:
    with pytest.raises(TarCorrupt):
        parse_number(field, "mode")


def test_a_negative_size_or_uid_is_corrupt_a_negative_mtime_is_not() -> None:
    with pytest.raises(TarCorrupt, match="size -1 out of range"):
        parse_number(b"\xff" * 12, "size")
    assert parse_number(b"\xff" * 12, "mtime", (-(2**63), 2**63 - 1)) == -1


def _header(name: str, *, fmt: int = tarfile.USTAR_FORMAT, **patch: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 2
    block = bytearray(info.tobuf(fmt))
    for offset, value in ((int(k[1:]), v) for k, v in patch.items()):
        block[offset: offset + len(value)] = value
    return _rechecksum(block) + b"x\n" + bytes(510)


def test_the_ustar_prefix_is_joined_for_ustar_magic_only() -> None:
    ustar = _header("n", o345=b"pre")
    odd_version = _header("n", o345=b"pre", o263=b"xx")
    old_gnu = _header("n", fmt=tarfile.GNU_FORMAT, o345=b"pre")
    assert read_members(ustar + bytes(1024))[0][0].name == "pre/n"
    assert read_members(odd_version + bytes(1024))[0][0].name == "pre/n"
    assert read_members(old_gnu + bytes(1024))[0][0].name == "n"


def _pax(records: list[tuple[str, str]], kind: bytes = b"x") -> bytes:
    body = b"".join(_pax_record(k, v) for k, v in records)
    info = tarfile.TarInfo("./PaxHeaders/x")
    info.type, info.size = kind, len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)


def test_global_records_apply_to_every_later_member_until_the_next_global_header() -> None:
    data = (_pax([("path", "g"), ("mtime", "5")], b"g") + _header("a") + _pax([("path", "local")]) + _header("b")
            + _pax([("comment", "c")], b"g") + _header("c") + bytes(1024))
    got = [(m.name, m.mtime_ns) for m, _ in read_members(data)]
    assert got == [("g", 5 * 10**9), ("local", 5 * 10**9), ("c", 0)]


@pytest.mark.parametrize("value, ns", [("1600000000.5abc", 1_600_000_000_500_000_000), ("16000x", 16_000 * 10**9),
                                       ("-5.25", -5_250_000_000)])
def test_a_pax_time_is_its_leading_number(value: str, ns: int) -> None:
    assert read_members(_pax([("mtime", value)]) + _header("a") + bytes(1024))[0][0].mtime_ns == ns


@pytest.mark.parametrize("records", [[("mtime", "abc")], [("mtime", "")], [("uid", "12x")], [("size", "2x")],
                                     [("size", "-1")]])
def test_malformed_pax_numbers_are_corrupt(records: list[tuple[str, str]]) -> None:
    with pytest.raises(TarCorrupt, match="malformed pax record"):
        read_members(_pax(records) + _header("a") + bytes(1024))


@pytest.mark.parametrize("key", ["size", "mtime", "uid", "GNU.sparse.realsize"])
def test_a_pax_number_of_thousands_of_digits_is_out_of_range(key: str) -> None:
    """Past any 64-bit field: refused before int() is asked (Python refuses over 4300 digits)."""
    with pytest.raises(TarCorrupt, match="out of range"):
        read_members(_pax([(key, "9" * 5000)]) + _header("a") + bytes(1024))


def test_nothing_after_the_first_zero_block_is_read() -> None:
    data = _header("a") + bytes(512) + _header("hidden") + b"garbage" * 100
    assert [m.name for m, _ in read_members(data)] == ["a"]
    assert pushed(data, seed=3) == (1, "")


def test_a_metadata_record_over_the_limit_is_refused_before_it_is_held() -> None:
    decoder = TarDecoder(TarLimits(max_metadata_bytes=1024))
    info = tarfile.TarInfo("./PaxHeaders/x")
    info.type, info.size = b"x", 1 << 30
    with pytest.raises(TarRefused, match="max_metadata_bytes=1024"):
        decoder.feed(info.tobuf(tarfile.USTAR_FORMAT))


def test_a_pax_1_0_sparse_map_spanning_blocks() -> None:
    segments = [(i * 4096, b"s" * 512) for i in range(200)]  # the map text is over 2 KiB
    got = read_members(_sparse_pax("1.0", "s", segments, size=200 * 4096))
    (member, data), = got
    assert member.sparse == [(offset, 512) for offset, _ in segments] and data == b"s" * 512 * 200
    assert TarDecoder().feed(bytes(512)) is END
