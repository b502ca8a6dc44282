"""A corpus of hostile tar layers, each with the outcome the unpacker must reach.

    for case in HOSTILE_CASES:
        data = case.build()            # the tar bytes (uncompressed)
        case.expect                    # "reject" (UnsafeArchive whose text has case.reason) or "handled"
        case.check(root)               # for "handled": asserts on the unpacked root
        case.lower                     # optional lower layer to apply first (whiteout cases)
        case.limits                    # optional UnpackLimits the case needs (else the defaults)

Every escape attempt aims at names under PROBE_NAME, so a test can also assert that
`/etc/<PROBE_NAME>`, `/tmp/<PROBE_NAME>` and the like were never created. Relative escapes
aim at `../outside/...`: tests lay out `tmp/root` beside `tmp/outside/secret`. Since issue
13 most escapes are *applied inside the root* (a name's leading `/` and `..` clamped at the
root, symlinks in parents followed inside it, as containerd does): their checks assert
where inside the root the entry landed; the tests assert that nothing outside changed.
The end-to-end tests upload some of these as S3 objects (case.build() is deterministic).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from images.unpack import MAX_TIME, UnpackLimits

PROBE_NAME = "flyio-hostile-probe"
PROBE_PATHS = (Path("/etc") / PROBE_NAME, Path("/tmp") / PROBE_NAME, Path("/") / PROBE_NAME)
MTIME = 1_700_000_000


@dataclass(frozen=True)
class HostileCase:
    """One hostile layer: how to build it, and what the unpacker must do with it."""

    name: str
    build: Callable[[], bytes]
    expect: str  # "reject" | "handled"
    reason: str = ""  # for "reject": a substring of the error's text
    check: Callable[[Path], None] | None = None  # for "handled": asserts on the root
    lower: Callable[[], bytes] | None = None  # a layer applied before this one
    limits: UnpackLimits | None = None


# --- building tars -------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def reg(name: str, data: bytes = b"x\n", mode: int = 0o644, **fields: object) -> Member:
    info = _info(name, tarfile.REGTYPE, mode, **fields)
    info.size = len(data)
    return info, data


def dir_(name: str, mode: int = 0o755, **fields: object) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, **fields), None


def sym(name: str, target: str) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


def hard(name: str, target: str) -> Member:
    return _info(name, tarfile.LNKTYPE, 0o644, linkname=target), None


def fifo(name: str) -> Member:
    return _info(name, tarfile.FIFOTYPE, 0o644), None


def device(name: str, kind: bytes, major: int = 1, minor: int = 3) -> Member:
    return _info(name, kind, 0o666, devmajor=major, devminor=minor), None


def tar_of(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A complete tar (with its end marker) of `members`, written by tarfile."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def headers_only(*infos: tarfile.TarInfo, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """Raw headers with no data after them (for sizes the data never follows)."""
    return b"".join(info.tobuf(fmt, "utf-8", "surrogateescape") for info in infos)


def _without_end(data: bytes) -> bytes:
    """`data` cut after its last member: no end-of-archive blocks."""
    end = len(data)
    while end >= 512 and data[end - 512: end] == bytes(512):
        end -= 512
    return data[:end]


# --- checks on the root (never following a link) ---------------------------------------

def _lstat(root: Path, rel: str) -> os.stat_result:
    return os.lstat(root / rel)


def _absent(root: Path, rel: str) -> bool:
    return not os.path.lexists(root / rel)


def _content(root: Path, rel: str) -> bytes:
    assert stat.S_ISREG(_lstat(root, rel).st_mode), f"{rel} is not a regular file"
    return (root / rel).read_bytes()


def check_regular(rel: str, data: bytes) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert _content(root, rel) == data

    return check


def all_of(*checks: Callable[[Path], None]) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        for one in checks:
            one(root)

    return check


def check_absent(*rels: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        for rel in rels:
            assert _absent(root, rel), f"{rel} should not exist"

    return check


def check_symlink(rel: str, target: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert stat.S_ISLNK(_lstat(root, rel).st_mode) and os.readlink(root / rel) == target

    return check


def check_mode(rel: str, mode: int) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert stat.S_IMODE(_lstat(root, rel).st_mode) == mode, oct(_lstat(root, rel).st_mode)

    return check


def check_fifo(rel: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert stat.S_ISFIFO(_lstat(root, rel).st_mode)

    return check


def check_dir(rel: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert stat.S_ISDIR(_lstat(root, rel).st_mode)

    return check


def check_same_file(rel: str, other: str) -> Callable[[Path], None]:
    """`rel` and `other` are one inode (a hardlink), neither followed."""
    def check(root: Path) -> None:
        a, b = _lstat(root, rel), _lstat(root, other)
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino), (rel, other)

    return check


def check_device(rel: str, kind: int, major: int, minor: int) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        st = _lstat(root, rel)
        assert stat.S_IFMT(st.st_mode) == kind and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)
    return check


def check_mtime(rel: str, mtime: float) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        assert _lstat(root, rel).st_mtime == mtime, _lstat(root, rel).st_mtime

    return check


# --- the cases ---------------------------------------------------------------------------

def _long_traversal_name() -> str:
    return "../" * 3 + "a" * 150 + "/" + PROBE_NAME


def _pax_path(path: str) -> bytes:
    info, data = reg("placeholder", b"evil\n")
    info.pax_headers = {"path": path}
    return tar_of((info, data))


def _huge_declared_size() -> bytes:
    info = _info("huge", tarfile.REGTYPE, 0o644)
    info.size = 1 << 40  # 1 TiB declared, base-256 in a GNU header; no data follows
    return headers_only(info) + bytes(1024)


def _too_many_entries() -> bytes:
    return tar_of(*(reg(f"f{i}") for i in range(50)))


def _bad_checksum_mid_archive() -> bytes:
    data = bytearray(tar_of(reg("ok", b"fine\n"), reg("second", b"data\n"), fmt=tarfile.USTAR_FORMAT))
    data[1024 + 148: 1024 + 156] = b"0000000\0"  # the second header's checksum
    return bytes(data)


def _sparse() -> bytes:
    info = _info("sparse", tarfile.GNUTYPE_SPARSE, 0o644)
    return headers_only(info) + bytes(1024)


def _xattrs() -> bytes:
    info, data = reg("file", b"x\n")
    info.pax_headers = {"SCHILY.xattr.user.kept": "yes", "SCHILY.xattr.security.selinux": "system_u:object_r:evil",
                        "SCHILY.xattr.trusted.overlay.opaque": "y"}
    return tar_of((info, data))


def _check_xattrs(root: Path) -> None:
    assert os.getxattr(root / "file", "user.kept", follow_symlinks=False) == b"yes"
    names = os.listxattr(root / "file", follow_symlinks=False)
    assert "security.selinux" not in names and "trusted.overlay.opaque" not in names


def _absurd_mtime() -> bytes:
    future, data = reg("future", b"x")
    future.pax_headers = {"mtime": "100000000000"}  # the year 5138: past what ext4 stores
    past, data2 = reg("past", b"x")
    past.pax_headers = {"mtime": "-99999999999"}
    return tar_of((future, data), (past, data2))


def _pax_mtime(value: str) -> bytes:
    info, data = reg("m", b"x")
    info.pax_headers = {"mtime": value}
    return tar_of((info, data))


def _uid_out_of_range() -> bytes:
    info, data = reg("owned", b"x")
    info.pax_headers = {"uid": str(2**32 - 1)}  # chown's "leave unchanged"
    return tar_of((info, data))


HOSTILE_CASES: list[HostileCase] = [
    # `..` and a leading `/` are clamped at the root (were rejected before issue 13)
    HostileCase("dotdot_traversal", lambda: tar_of(reg(f"../{PROBE_NAME}")), "handled",
                check=check_regular(PROBE_NAME, b"x\n")),
    HostileCase("dotdot_to_outside_secret", lambda: tar_of(reg("../outside/secret", b"pwned\n")), "handled",
                check=check_regular("outside/secret", b"pwned\n")),
    HostileCase("absolute_path", lambda: tar_of(reg(f"/tmp/{PROBE_NAME}")), "handled",
                check=check_regular(f"tmp/{PROBE_NAME}", b"x\n")),
    HostileCase("nested_dotdot", lambda: tar_of(dir_("a/"), reg(f"a/../../{PROBE_NAME}")), "handled",
                check=all_of(check_dir("a"), check_regular(PROBE_NAME, b"x\n"))),
    # symlinks in parents are followed inside the root (were rejected before issue 13)
    HostileCase("symlink_abs_then_write_through",
                lambda: tar_of(sym("link", "/etc"), reg(f"link/{PROBE_NAME}")), "handled",
                check=all_of(check_symlink("link", "/etc"), check_regular(f"etc/{PROBE_NAME}", b"x\n"))),
    HostileCase("symlink_dotdot_then_write_through",
                lambda: tar_of(sym("link", ".."), reg(f"link/{PROBE_NAME}")), "handled",
                check=all_of(check_symlink("link", ".."), check_regular(PROBE_NAME, b"x\n"))),
    HostileCase("symlink_relative_outside_then_write",
                lambda: tar_of(dir_("a/"), sym("a/link", "../../outside"), reg("a/link/secret", b"pwned\n")),
                "handled", check=check_regular("outside/secret", b"pwned\n")),
    HostileCase("symlink_inside_then_write_through",
                lambda: tar_of(dir_("real/"), sym("link", "real"), reg("link/file")), "handled",
                check=all_of(check_symlink("link", "real"), check_regular("real/file", b"x\n"))),
    HostileCase("symlink_loop_then_write",
                lambda: tar_of(sym("a", "b"), sym("b", "a"), reg("a/x")), "reject", "more than 40 symlinks resolving 'a'"),
    HostileCase("symlink_then_regular_file_replaces_link",
                lambda: tar_of(sym("x", f"/tmp/{PROBE_NAME}"), reg("x", b"replaced\n")), "handled",
                check=check_regular("x", b"replaced\n")),
    HostileCase("symlink_then_dir_replaces_link",
                lambda: tar_of(sym("x", "/etc"), dir_("x/"), reg(f"x/{PROBE_NAME}", b"inside\n")), "handled",
                check=all_of(check_dir("x"), check_regular(f"x/{PROBE_NAME}", b"inside\n"))),
    # hardlink targets are root-relative, their parents resolved inside the root, and a
    # symlink is linked itself (all three were rejected before issue 13)
    HostileCase("hardlink_absolute",
                lambda: tar_of(dir_("etc/"), reg("etc/passwd", b"inside\n"), hard("h", "/etc/passwd")), "handled",
                check=all_of(check_same_file("h", "etc/passwd"), check_regular("h", b"inside\n"))),
    HostileCase("hardlink_dotdot", lambda: tar_of(hard("h", "../outside/secret")), "reject", "does not exist"),
    HostileCase("hardlink_to_symlink",
                lambda: tar_of(sym("s", "/etc/passwd"), hard("h", "s")), "handled",
                check=all_of(check_symlink("h", "/etc/passwd"), check_same_file("h", "s"))),
    HostileCase("hardlink_through_symlink_parent",
                lambda: tar_of(dir_("etc/"), reg("etc/passwd", b"inside\n"), sym("d", "/etc"), hard("h", "d/passwd")),
                "handled", check=check_same_file("h", "etc/passwd")),
    HostileCase("hardlink_to_directory", lambda: tar_of(dir_("d/"), hard("h", "d")), "reject", "is a directory"),
    HostileCase("hardlink_to_missing", lambda: tar_of(hard("h", "nope")), "reject", "does not exist"),
    HostileCase("hardlink_then_overwrite_does_not_write_through",
                lambda: tar_of(reg("f", b"original\n"), hard("h", "f"), reg("h", b"new\n")), "handled",
                check=all_of(check_regular("f", b"original\n"), check_regular("h", b"new\n"))),
    # device nodes are made with mknod, as containerd does (the unpack mount is nodev)
    HostileCase("char_device", lambda: tar_of(device("dev/null", tarfile.CHRTYPE)), "handled",
                check=check_device("dev/null", stat.S_IFCHR, 1, 3)),
    HostileCase("block_device", lambda: tar_of(device("dev/sda", tarfile.BLKTYPE, 8, 0)), "handled",
                check=check_device("dev/sda", stat.S_IFBLK, 8, 0)),
    HostileCase("fifo", lambda: tar_of(fifo("pipe")), "handled", check=all_of(check_fifo("pipe"), check_mode("pipe", 0o644))),
    HostileCase("duplicate_entries_later_wins",
                lambda: tar_of(reg("dup", b"first\n"), reg("dup", b"second\n", mode=0o600)), "handled",
                check=all_of(check_regular("dup", b"second\n"), check_mode("dup", 0o600))),
    HostileCase("file_then_dir_same_name",
                lambda: tar_of(reg("x", b"file\n"), dir_("x/"), reg("x/y", b"inner\n")), "handled",
                check=all_of(check_dir("x"), check_regular("x/y", b"inner\n"))),
    HostileCase("dir_then_file_same_name",
                lambda: tar_of(dir_("x/"), reg("x/y", b"inner\n"), reg("x", b"file\n")), "handled",
                check=check_regular("x", b"file\n")),
    HostileCase("truncated_mid_file", lambda: tar_of(reg("big", b"z" * 100_000))[:20_000], "reject",
                "truncated or corrupt tar"),
    HostileCase("truncated_at_header_boundary",
                lambda: _without_end(tar_of(reg("a", b"x" * 512), reg("b", b"y" * 512))), "reject",
                "truncated or corrupt tar"),
    HostileCase("garbage_bytes", lambda: bytes((i * 197 + 13) % 256 for i in range(10_000)), "reject",
                "truncated or corrupt tar"),
    HostileCase("bad_checksum_mid_archive", _bad_checksum_mid_archive, "reject", "truncated or corrupt tar"),
    # GNU tar reads nothing after the end-of-archive block (concatenated archives, padding)
    HostileCase("trailing_data_after_end", lambda: tar_of(reg("a")) + b"hidden member" + bytes(499), "handled",
                check=check_regular("a", b"x\n")),
    HostileCase("second_archive_after_end", lambda: tar_of(reg("a")) + tar_of(reg(f"../{PROBE_NAME}")), "handled",
                check=all_of(check_regular("a", b"x\n"), check_absent(PROBE_NAME))),
    HostileCase("huge_declared_size", _huge_declared_size, "reject", "max_file_bytes"),
    HostileCase("too_many_entries", _too_many_entries, "reject", "max_entries=10",
                limits=UnpackLimits(max_entries=10)),
    HostileCase("path_too_long", lambda: _pax_path("d/" * 2100 + "f"), "reject", "path too long"),
    HostileCase("component_too_long", lambda: _pax_path("a" * 300), "reject", "max_name_bytes"),
    HostileCase("nul_in_name", lambda: _pax_path("a\0/../../x"), "reject", "NUL byte"),
    HostileCase("pax_long_name_traversal", lambda: _pax_path(_long_traversal_name()), "handled",
                check=check_regular(_long_traversal_name().lstrip("./"), b"evil\n")),
    HostileCase("gnu_long_name_traversal", lambda: tar_of(reg(_long_traversal_name()), fmt=tarfile.GNU_FORMAT),
                "handled", check=check_regular(_long_traversal_name().lstrip("./"), b"x\n")),
    HostileCase("whiteout_dotdot", lambda: tar_of(reg(".wh..")), "reject", "invalid whiteout"),
    HostileCase("whiteout_in_parent_dir", lambda: tar_of(reg("../.wh.outside")), "handled",
                check=check_absent("outside"), lower=lambda: tar_of(dir_("outside/"), reg("outside/secret"))),
    HostileCase("whiteout_through_symlink_parent",
                lambda: tar_of(sym("link", "/etc"), reg("link/.wh.passwd")), "handled",
                check=all_of(check_symlink("link", "/etc"), check_absent("etc/passwd"), check_dir("etc")),
                lower=lambda: tar_of(dir_("etc/"), reg("etc/passwd"))),
    HostileCase("whiteout_removes_lower_symlink_not_its_target",
                lambda: tar_of(reg(".wh.escape")), "handled", check=check_absent("escape"),
                lower=lambda: tar_of(sym("escape", "../outside"))),
    HostileCase("opaque_under_lower_symlink",  # the marker applies where the lower symlink leads, in the root
                lambda: tar_of(reg("d/.wh..wh..opq"), reg("d/new", b"new\n")), "handled",
                check=all_of(check_symlink("d", "../outside"), check_absent("outside/old"),
                             check_regular("outside/new", b"new\n")),
                lower=lambda: tar_of(dir_("outside/"), reg("outside/old"), sym("d", "../outside"))),
    HostileCase("opaque_marker_in_root",
                lambda: tar_of(reg("new", b"upper\n"), reg(".wh..wh..opq")), "handled",
                check=all_of(check_regular("new", b"upper\n"), check_absent("old", "olddir", ".wh..wh..opq")),
                lower=lambda: tar_of(reg("old"), dir_("olddir/"), reg("olddir/f"))),
    HostileCase("setuid_preserved", lambda: tar_of(reg("su", b"#!\n", mode=0o4755), dir_("shared/", mode=0o3777)),
                "handled", check=all_of(check_mode("su", 0o4755), check_mode("shared", 0o3777))),
    HostileCase("absurd_mtime", _absurd_mtime, "handled",
                check=all_of(check_mtime("future", MAX_TIME), check_mtime("past", -(2**31)))),
    # GNU tar reads a pax time's leading number and refuses one with none (or past time_t)
    HostileCase("mtime_not_a_number", lambda: _pax_mtime("nan"), "reject", "malformed pax record: mtime"),
    HostileCase("mtime_beyond_time_t", lambda: _pax_mtime("100000000000000000000"), "reject", "out of range"),
    HostileCase("mtime_with_a_tail", lambda: _pax_mtime("1600000000.5abc"), "handled",
                check=check_mtime("m", 1600000000.5)),
    HostileCase("uid_out_of_range", _uid_out_of_range, "reject", "uid 4294967295 out of range"),
    HostileCase("root_entry_not_a_directory", lambda: tar_of(reg(".", b"x"), reg("a/..", b"y")), "handled",  # skipped, as containerd
                check=check_dir(".")),
    HostileCase("gnu_sparse_member", _sparse, "handled", check=check_regular("sparse", b"")),
    HostileCase("xattr_namespaces", _xattrs, "handled", check=_check_xattrs),
    HostileCase("empty_symlink_target", lambda: tar_of(sym("empty", "")), "reject", "empty symlink target"),
]


# --- more cases: verbatim absolute links, depth, lower-layer links, same-layer whiteouts ---

def _deep_dirs(depth: int) -> list[Member]:
    return [dir_("/".join(["deep"] + ["d"] * i) + "/") for i in range(depth)]


HOSTILE_CASES += [
    HostileCase("absolute_symlink_kept_verbatim_not_followed",
                lambda: tar_of(dir_("etc/"), dir_("etc/alternatives/"), sym("etc/alternatives/x", "/usr/bin/y"),
                               dir_("usr/"), dir_("usr/bin/"), sym("usr/bin/X11", "."),
                               sym("etc/passwd", "/etc/passwd"), reg("etc/passwd", b"the layer's own\n")),
                "handled", check=all_of(check_symlink("etc/alternatives/x", "/usr/bin/y"),
                                        check_symlink("usr/bin/X11", "."),
                                        check_regular("etc/passwd", b"the layer's own\n"))),
    HostileCase("deep_dir_then_file_same_name",  # removal must not recurse (or hold an fd) per level
                lambda: tar_of(*_deep_dirs(250), reg("deep", b"flat\n")), "handled",
                check=check_regular("deep", b"flat\n")),
    HostileCase("too_deep", lambda: tar_of(*_deep_dirs(1500)), "reject", "max_depth"),
    HostileCase("write_through_lower_layer_symlink",  # lands in the root's own outside/
                lambda: tar_of(reg("d/secret", b"pwned\n")), "handled",
                check=all_of(check_symlink("d", "../outside"), check_regular("outside/secret", b"pwned\n")),
                lower=lambda: tar_of(sym("d", "../outside"))),
    HostileCase("whiteout_of_own_file_keeps_it",
                lambda: tar_of(reg("mine", b"upper\n"), reg(".wh.mine")), "handled",
                check=check_regular("mine", b"upper\n"), lower=lambda: tar_of(reg("mine", b"lower\n"))),
    HostileCase("whiteout_of_own_dir_hides_lower_contents",
                lambda: tar_of(dir_("d/"), reg("d/new", b"new\n"), reg(".wh.d")), "handled",
                check=all_of(check_regular("d/new", b"new\n"), check_absent("d/old")),
                lower=lambda: tar_of(dir_("d/"), reg("d/old", b"old\n"))),
    HostileCase("opaque_then_dir_replaced_by_file",
                lambda: tar_of(dir_("d/"), reg("d/.wh..wh..opq"), reg("d", b"a file now\n")), "handled",
                check=check_regular("d", b"a file now\n"), lower=lambda: tar_of(dir_("d/"), reg("d/old"))),
]


# --- issue 10: link names in every encoding, global headers, upper entries over lower links ---

def pax_linkpath(member: Member, linkpath: str) -> Member:
    """`member` with its link target carried only by a pax `linkpath` record."""
    info, data = member
    info.pax_headers = {"linkpath": linkpath}
    return info, data


def _long_dotdot(rest: str) -> str:
    return "../" * 40 + rest  # 120+ bytes: over ustar's 100-byte linkname, so pax / ././@LongLink


def _global_header_layer(records: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers=records) as archive:
        info, data = reg("file", b"after the global header\n")
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


HOSTILE_CASES += [
    # a symlink whose target is only in a pax linkpath (`../` * 3 + outside), then written through
    HostileCase("pax_linkpath_symlink_traversal",
                lambda: tar_of(pax_linkpath(sym("l", "placeholder"), "../../../outside"), reg("l/secret", b"pwned\n")),
                "handled", check=all_of(check_symlink("l", "../../../outside"),
                                        check_regular("outside/secret", b"pwned\n"))),
    # a hardlink whose target is only in a pax linkpath: clamped at the root like a name
    HostileCase("pax_linkpath_hardlink_traversal",
                lambda: tar_of(dir_("outside/"), reg("outside/secret", b"inside\n"),
                               pax_linkpath(hard("h", "placeholder"), "../../../outside/secret")),
                "handled", check=all_of(check_same_file("h", "outside/secret"), check_regular("h", b"inside\n"))),
    HostileCase("pax_linkpath_hardlink_to_host_file",  # `/etc/shadow` taken inside the root: not there
                lambda: tar_of(pax_linkpath(hard("h", "placeholder"), "/etc/shadow")), "reject", "does not exist"),
    # GNU ././@LongLink (type K) records carrying the long link targets
    HostileCase("gnu_longlink_symlink_traversal",
                lambda: tar_of(sym("l", _long_dotdot("outside")), reg("l/secret", b"pwned\n"), fmt=tarfile.GNU_FORMAT),
                "handled", check=all_of(check_symlink("l", _long_dotdot("outside")),
                                        check_regular("outside/secret", b"pwned\n"))),
    HostileCase("gnu_longlink_hardlink_traversal",
                lambda: tar_of(dir_("outside/"), reg("outside/secret", b"inside\n"),
                               hard("h", _long_dotdot("outside/secret")), fmt=tarfile.GNU_FORMAT),
                "handled", check=check_same_file("h", "outside/secret")),
    # pax global headers (type g): harmless records apply, renaming/resizing ones are refused
    HostileCase("pax_global_header_comment", lambda: _global_header_layer({"comment": "hi", "mtime": "1"}),
                "handled", check=check_regular("file", b"after the global header\n")),
    # a global path renames every later member, as in GNU tar (clamped at the root like any name)
    HostileCase("pax_global_header_sets_path", lambda: _global_header_layer({"path": f"../{PROBE_NAME}"}),
                "handled", check=all_of(check_regular(PROBE_NAME, b"after the global header\n"), check_absent("file"))),
    HostileCase("pax_global_header_sets_linkpath", lambda: _global_header_layer({"linkpath": "/etc/shadow"}),
                "handled", check=check_regular("file", b"after the global header\n")),
    # a hardlink to a lower layer's symlink links the symlink itself; writing through the
    # link then follows it inside the root
    HostileCase("hardlink_to_lower_symlink",
                lambda: tar_of(hard("h", "s"), reg("h/secret", b"pwned\n")), "handled",
                check=all_of(check_symlink("h", "../outside"), check_same_file("h", "s"),
                             check_regular("outside/secret", b"pwned\n")),
                lower=lambda: tar_of(sym("s", "../outside"))),
    # an upper directory entry at a lower symlink's name replaces the symlink (never merges
    # into its target)
    HostileCase("upper_dir_over_lower_symlink",
                lambda: tar_of(dir_("d/"), reg("d/new", b"upper\n")), "handled",
                check=all_of(check_dir("d"), check_regular("d/new", b"upper\n"), check_absent("real/new"),
                             check_regular("real/keep", b"lower\n")),
                lower=lambda: tar_of(dir_("real/"), reg("real/keep", b"lower\n"), sym("d", "real"))),
]


# --- issue 20: sparse members in every GNU and pax format (applied with their holes) --------

SPARSE_SIZE = 1 << 20
# Every segment but the last is whole blocks: GNU tar starts each segment's data on a block,
# Go's archive/tar reads them end to end; they agree only then (the decoder refuses the rest).
SPARSE_SEGMENTS = [(8192, b"A" * 4096), (200_704, b"B" * 1024), (SPARSE_SIZE - 512, b"C" * 300)]
MANY_SEGMENTS = [(i * 20_480, bytes([65 + i % 26]) * (512 if i < 29 else 100)) for i in range(30)]  # extension blocks


def _rechecksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _sparse_data(segments: list[tuple[int, bytes]]) -> bytes:
    return b"".join(data for _, data in segments)


def _with_end(segments: list[tuple[int, bytes]], size: int) -> list[tuple[int, bytes]]:
    """GNU tar ends a map whose file ends in a hole with a (size, 0) segment."""
    offset, data = segments[-1]
    return segments + [(size, b"")] if offset + len(data) < size else segments


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _sparse_gnu_old(name: str, segments: list[tuple[int, bytes]], size: int = SPARSE_SIZE) -> bytes:
    """GNU's old sparse format: type S, 4 map entries in the header, 21 per extension block."""
    segments = _with_end(segments, size)
    stored = _sparse_data(segments)
    info = _info(name, tarfile.GNUTYPE_SPARSE, 0o644)
    info.size = len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")[-512:])
    entries = [_octal(offset, 12) + _octal(len(data), 12) for offset, data in segments]
    header[386:482] = b"".join(entries[:4]).ljust(96, b"\0")
    header[482] = 1 if len(entries) > 4 else 0
    header[483:495] = _octal(size, 12)
    blocks = [_rechecksum(header)]
    rest = entries[4:]
    while rest:
        chunk, rest = rest[:21], rest[21:]
        blocks.append(b"".join(chunk).ljust(504, b"\0") + bytes([1 if rest else 0]) + bytes(7))
    return b"".join(blocks) + _padded(stored) + bytes(1024)


def _pax_record(key: str, value: str) -> bytes:
    payload = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    length = len(payload) + 1
    while len(str(length)) + len(payload) != length:
        length += 1
    return str(length).encode() + payload


def _pax_then(records: list[tuple[str, str]], info: tarfile.TarInfo, data: bytes) -> bytes:
    body = b"".join(_pax_record(key, value) for key, value in records)
    header = _info("./PaxHeaders/x", tarfile.XHDTYPE, 0o644)
    header.size = len(body)
    info.size = len(data)
    return (header.tobuf(tarfile.USTAR_FORMAT) + _padded(body) + info.tobuf(tarfile.USTAR_FORMAT) + _padded(data)
            + bytes(1024))


def _sparse_pax(version: str, name: str, segments: list[tuple[int, bytes]], size: int = SPARSE_SIZE) -> bytes:
    """pax sparse 0.0 (repeated offset/numbytes records), 0.1 (one map record) or 1.0 (the
    map at the start of the data), as GNU tar writes them."""
    segments = _with_end(segments, size)
    stored = _sparse_data(segments)
    if version == "0.0":
        records = [("GNU.sparse.size", str(size)), ("GNU.sparse.numblocks", str(len(segments)))]
        for offset, data in segments:
            records += [("GNU.sparse.offset", str(offset)), ("GNU.sparse.numbytes", str(len(data)))]
        return _pax_then(records, _info(name, tarfile.REGTYPE, 0o644), stored)
    if version == "0.1":
        flat = ",".join(f"{offset},{len(data)}" for offset, data in segments)
        records = [("GNU.sparse.size", str(size)), ("GNU.sparse.numblocks", str(len(segments))),
                   ("GNU.sparse.name", name), ("GNU.sparse.map", flat)]
        return _pax_then(records, _info(f"./GNUSparseFile.1/{name}", tarfile.REGTYPE, 0o644), stored)
    assert version == "1.0"
    lines = [str(len(segments))] + [str(n) for offset, data in segments for n in (offset, len(data))]
    records = [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.name", name),
               ("GNU.sparse.realsize", str(size))]
    return _pax_then(records, _info(f"./GNUSparseFile.1/{name}", tarfile.REGTYPE, 0o644),
                     _padded("\n".join(lines).encode() + b"\n") + stored)


def check_sparse(rel: str, segments: list[tuple[int, bytes]], size: int = SPARSE_SIZE) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        expected = bytearray(size)
        for offset, data in segments:
            expected[offset: offset + len(data)] = data
        assert _content(root, rel) == bytes(expected)
        allocated = _lstat(root, rel).st_blocks * 512
        assert allocated < size // 2, f"{rel}: {allocated} bytes allocated, the holes were written"
    return check


HOSTILE_CASES += [
    HostileCase("sparse_gnu_old", lambda: _sparse_gnu_old("s", SPARSE_SEGMENTS), "handled",
                check=check_sparse("s", SPARSE_SEGMENTS)),
    HostileCase("sparse_gnu_old_extended", lambda: _sparse_gnu_old("s", MANY_SEGMENTS), "handled",
                check=check_sparse("s", MANY_SEGMENTS)),
    HostileCase("sparse_pax_0_0", lambda: _sparse_pax("0.0", "s", SPARSE_SEGMENTS), "handled",
                check=check_sparse("s", SPARSE_SEGMENTS)),
    HostileCase("sparse_pax_0_1", lambda: _sparse_pax("0.1", "s", SPARSE_SEGMENTS), "handled",
                check=check_sparse("s", SPARSE_SEGMENTS)),
    HostileCase("sparse_pax_1_0", lambda: _sparse_pax("1.0", "s", SPARSE_SEGMENTS), "handled",
                check=check_sparse("s", SPARSE_SEGMENTS)),
    HostileCase("sparse_pax_1_0_traversal", lambda: _sparse_pax("1.0", f"../../{PROBE_NAME}", SPARSE_SEGMENTS),
                "handled", check=check_sparse(PROBE_NAME, SPARSE_SEGMENTS)),
    HostileCase("sparse_map_past_its_size", lambda: _sparse_pax("0.1", "s", SPARSE_SEGMENTS, size=4096), "reject",
                "goes past its size"),
    HostileCase("sparse_map_overlapping", lambda: _sparse_pax("0.0", "s", [(0, b"a" * 512), (50, b"b" * 100)]),
                "reject", "overlapping"),
    HostileCase("sparse_segment_not_whole_blocks", lambda: _sparse_pax("0.1", "s", [(0, b"a" * 100), (4096, b"b")]),
                "reject", "not whole blocks"),
    # GNU tar reads no data after a directory (or link, device, fifo) whatever its size says:
    # the next block is a header
    HostileCase("directory_carrying_data",
                lambda: headers_only(_sized(dir_("d/")[0], 512), fmt=tarfile.USTAR_FORMAT) + tar_of(reg("d/in", b"in\n")),
                "handled", check=all_of(check_dir("d"), check_regular("d/in", b"in\n"))),
    HostileCase("symlink_carrying_data",
                lambda: headers_only(_sized(sym("s", "t")[0], 512), fmt=tarfile.USTAR_FORMAT) + tar_of(reg("after")),
                "handled", check=all_of(check_symlink("s", "t"), check_regular("after", b"x\n"))),
]


def _sized(info: tarfile.TarInfo, size: int) -> tarfile.TarInfo:
    info.size = size
    return info
