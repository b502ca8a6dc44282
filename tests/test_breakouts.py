"""containerd's archive breakout cases (`TestBreakouts`, pkg/archive/tar_test.go), ported:
the same layers, the same lower trees, containerd's expected outcome for each, run through
both resolvers on real files. containerd's main branch (read 2026-12, commit 301026e58)
has 34 cases — issue 13 counted 32; SymlinkOverridePath came in 2025 — of which it applies
30 and refuses the four whiteouts of `.` and `..`; ours does the same but for one case,
whose `why` says why.

Reading the port: containerd's `tc.Symlink(target, name)` and `tc.Link(target, name)` take
the target first; the helpers of tests/hostile_tars.py take the name first. A case's
`lower` is containerd's `apply` (the tree the layer is applied over), made here with
plain calls on the root, as containerd's fstest does.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from images.unpack import UnsafeArchive, unpack_layer
from tests.hostile_tars import Member, dir_, hard, reg, sym, tar_of

RESOLVERS = ("openat2", "walk")
PROBE = "flyio-breakout-probe"  # containerd names it after its temp dir: breakout-<tname>

Check = Callable[[Path], None]


@dataclass(frozen=True)
class Breakout:
    """One containerd case: the layer, the tree under it, and what must come of it."""

    name: str
    members: Callable[[Path], list[Member]]  # given the test's private dir (HardlinkSymlinkChmod needs it)
    check: Check | None = None  # containerd's validator, for applied cases
    lower: list[tuple[str, ...]] = field(default_factory=list)  # ("dir"|"file"|"symlink"|"link", ...)
    containerd: str = "applied"  # "applied" | "refused"
    ours: str = "applied"
    reason: str = ""  # for refused: a substring of our error
    why: str = ""  # when ours differs from containerd


# --- containerd's validators -----------------------------------------------------------

def root_path(root: Path, rel: str, hops: int = 0) -> Path:
    """containerd's fs.RootPath: `rel` with every symlink followed, lexically clamped inside
    `root` (written independently of images/resolve.py, so the check does not trust it)."""
    parts: list[str] = []
    pending = [p for p in rel.split("/")][::-1]
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            parts = parts[:-1]
            continue
        here = root.joinpath(*parts, part)
        if here.is_symlink():
            assert hops < 255, "too many links"
            hops += 1
            target = os.readlink(here)
            if target.startswith("/"):
                parts = []
            pending.extend(target.split("/")[::-1])
            continue
        parts.append(part)
    return root.joinpath(*parts)


def unbroken(root: Path) -> None:
    assert (root / "etc/unbroken").read_bytes() == b"unbroken"


def same_file(a: str, b: str) -> Check:
    def check(root: Path) -> None:
        assert os.path.samefile(root_path(root, a), root_path(root, b)), (a, b)

    return check


def not_same_file(a: str, b: str) -> Check:
    def check(root: Path) -> None:
        assert not os.path.samefile(root_path(root, a), root_path(root, b)), (a, b)

    return check


def same_symlink(a: str, b: str) -> Check:
    def check(root: Path) -> None:
        assert (root / a).is_symlink() and (root / b).is_symlink()
        assert os.readlink(root / a) == os.readlink(root / b)

    return check


def value(rel: str, data: bytes) -> Check:
    def check(root: Path) -> None:
        assert (root / rel).read_bytes() == data

    return check


def absent(rel: str) -> Check:
    def check(root: Path) -> None:
        assert not os.path.lexists(root / rel), rel

    return check


def all_of(*checks: Check) -> Check:
    def check(root: Path) -> None:
        for one in checks:
            one(root)

    return check


def emptied(root: Path) -> None:
    assert (root / "etc/emptied").read_bytes() == b""


def no_breakout_file(root: Path) -> None:
    """SymlinkOverridePath: nothing written to the host's /tmp; the last write is in the root."""
    host = Path("/tmp") / f"breakout-{PROBE}"
    assert not os.path.lexists(host) or host.read_bytes() != bytes([3, 4, 5])
    assert (root / f"foo/tmp/breakout-{PROBE}").read_bytes() == bytes([6, 7, 8])


# --- the cases, in containerd's order ----------------------------------------------------

def _passwd() -> list[Member]:
    return [dir_("etc", 0o770), reg("/etc/passwd", b"inside")]


def _chmod_case(private: Path) -> list[Member]:
    """HardlinkSymlinkChmod: a symlink named by an absolute host path, to another host path,
    then a hardlink to that name; the host file's mode must not change."""
    perm400, elsewhere = private / "perm400", private / "also-exists-outside-root"
    perm400.write_bytes(b"...")
    perm400.chmod(0o400)
    elsewhere.write_bytes(b"...")
    elsewhere.chmod(0o640)
    return [sym(str(elsewhere), str(perm400)), hard("sketchylink", str(elsewhere))]


def _chmod_check(private: Path) -> Check:
    def check(root: Path) -> None:
        assert stat.S_IMODE(os.lstat(private / "perm400").st_mode) == 0o400
        assert stat.S_IMODE(os.lstat(private / "also-exists-outside-root").st_mode) == 0o640
        # inside the root: the link is the symlink itself, its target kept verbatim
        assert os.readlink(root / "sketchylink") == str(private / "perm400")

    return check


PASSWD_LOWER = [("dir", "etc"), ("file", "etc/passwd", b"inside")]
USERS_LOWER = [("dir", "etc"), ("file", "etc/passwd", b"all users")]
UP_AND_OUT_WHY = ("containerd cleans a symlink's target lexically, so `upandout/../../../etc` is `/etc` even "
                  "though `upandout` does not exist; we resolve as the kernel does (openat2 RESOLVE_IN_ROOT, "
                  "and the walk the same way): `upandout` is missing, so `localetc` dangles, as it will for "
                  "every process in the VM, and a hardlink through it has no target")

BREAKOUTS: list[Breakout] = [
    Breakout("SymlinkAbsolute", lambda _: [dir_("etc"), sym("localetc", "/etc"),
                                           reg("/localetc/unbroken", b"unbroken")], unbroken),
    Breakout("SymlinkUpAndOut", lambda _: [dir_("etc"), dir_("dummy"), sym("localetc", "/dummy/../etc"),
                                           reg("/localetc/unbroken", b"unbroken")], unbroken),
    Breakout("SymlinkMultipleAbsolute", lambda _: [dir_("etc"), dir_("dummy"), sym("/dummy/etc", "/etc"),
                                                   sym("localetc", "/dummy/etc"),
                                                   reg("/dummy/etc/unbroken", b"unbroken")], unbroken),
    Breakout("SymlinkMultipleRelative", lambda _: [dir_("etc"), dir_("dummy"), sym("/dummy/etc", "/etc"),
                                                   sym("localetc", "./dummy/etc"),
                                                   reg("/dummy/etc/unbroken", b"unbroken")], unbroken),
    Breakout("SymlinkEmptyFile", lambda _: [dir_("etc"), reg("etc/emptied", b"notempty"), sym("localetc", "/etc"),
                                            reg("/localetc/emptied", b"")], emptied),
    Breakout("HardlinkRelative", lambda _: [*_passwd(), dir_("breakouts"), sym("breakouts/d1", "../../etc"),
                                            hard("breakouts/mypasswd", "/breakouts/d1/passwd")],
             same_file("/breakouts/mypasswd", "/etc/passwd")),
    Breakout("HardlinkDownAndOut", lambda _: [*_passwd(), dir_("breakouts"), dir_("downandout"),
                                              sym("breakouts/d1", "../downandout/../../etc"),
                                              hard("breakouts/mypasswd", "/breakouts/d1/passwd")],
             same_file("/breakouts/mypasswd", "/etc/passwd")),
    Breakout("HardlinkAbsolute", lambda _: [*_passwd(), sym("localetc", "/etc"),
                                            hard("localpasswd", "/localetc/passwd")],
             same_file("localpasswd", "/etc/passwd")),
    Breakout("HardlinkRelativeLong", lambda _: [*_passwd(), sym("localetc", "../../../../../../../etc"),
                                                hard("localpasswd", "/localetc/passwd")],
             same_file("localpasswd", "/etc/passwd")),
    Breakout("HardlinkRelativeUpAndOut", lambda _: [*_passwd(), sym("localetc", "upandout/../../../etc"),
                                                    hard("localpasswd", "/localetc/passwd")],
             same_file("localpasswd", "/etc/passwd"), ours="refused", reason="does not exist", why=UP_AND_OUT_WHY),
    Breakout("HardlinkDirectRelative", lambda _: [*_passwd(), hard("localpasswd", "../../../../../etc/passwd")],
             same_file("localpasswd", "/etc/passwd")),
    Breakout("HardlinkDirectAbsolute", lambda _: [*_passwd(), hard("localpasswd", "/etc/passwd")],
             same_file("localpasswd", "/etc/passwd")),
    Breakout("SymlinkParentDirectory", lambda _: [*_passwd(), sym("..", "/etc/"), hard("localpasswd", "/etc/passwd")],
             same_file("/localpasswd", "/etc/passwd")),
    Breakout("SymlinkEmptyFilename", lambda _: [*_passwd(), sym("", "/etc/"), hard("localpasswd", "/etc/passwd")],
             same_file("/localpasswd", "/etc/passwd")),
    Breakout("SymlinkParentRelative", lambda _: [*_passwd(), sym("localetc/sub/..", "/etc/"),
                                                 hard("/localetc/localpasswd", "/etc/passwd")],
             same_file("/localetc/localpasswd", "/etc/passwd")),
    Breakout("SymlinkSlashEnded", lambda _: [*_passwd(), dir_("localetc/", 0o770),
                                             hard("/localetc/localpasswd", "/etc/passwd")],
             same_file("/localetc/localpasswd", "/etc/passwd")),
    Breakout("SymlinkOverrideDirectory", lambda _: [sym("localetc", "/etc"), hard("/localetc/localpasswd", "/etc/passwd")],
             same_file("/localetc/localpasswd", "/etc/passwd"), lower=[*PASSWD_LOWER, ("dir", "localetc")]),
    Breakout("SymlinkOverrideDirectoryRelative",
             lambda _: [sym("localetc", "../../etc"), hard("/localetc/localpasswd", "/etc/passwd")],
             same_file("/localetc/localpasswd", "/etc/passwd"), lower=[*PASSWD_LOWER, ("dir", "localetc")]),
    Breakout("DirectoryOverrideSymlink", lambda _: [dir_("/localetc/"), hard("/localetc/localpasswd", "/etc/passwd")],
             same_file("/localetc/localpasswd", "/etc/passwd"), lower=[*PASSWD_LOWER, ("symlink", "localetc", "/etc")]),
    Breakout("DirectoryOverrideSymlinkAndHardlink",
             lambda _: [dir_("/localetc/"), reg("/localetc/localpasswd", b"different")],
             not_same_file("/localetc/localpasswd", "/etc/passwd"),
             lower=[*PASSWD_LOWER, ("symlink", "localetc", "etc"), ("link", "etc/passwd", "localetc/localpasswd")]),
    Breakout("WhiteoutRootParent", lambda _: [reg(".wh...", b"")], lower=PASSWD_LOWER,
             containerd="refused", ours="refused", reason="invalid whiteout"),
    Breakout("WhiteoutParent", lambda _: [reg("etc/.wh...", b"")], lower=PASSWD_LOWER,
             containerd="refused", ours="refused", reason="invalid whiteout"),
    Breakout("WhiteoutRoot", lambda _: [reg(".wh..", b"")], lower=PASSWD_LOWER,
             containerd="refused", ours="refused", reason="invalid whiteout"),
    Breakout("WhiteoutCurrentDirectory", lambda _: [reg("etc/.wh..", b"")], lower=PASSWD_LOWER,
             containerd="refused", ours="refused", reason="invalid whiteout"),
    Breakout("WhiteoutSymlink", lambda _: [reg(".wh.localetc", b"")],
             all_of(value("etc/passwd", b"all users"), absent("localetc")),
             lower=[*USERS_LOWER, ("symlink", "localetc", "/etc")]),
    Breakout("WhiteoutSymlinkPath", lambda _: [reg("localetc/.wh.whitedout", b"")],
             all_of(value("etc/passwd", b"all users"), absent("etc/whitedout")),
             lower=[*USERS_LOWER, ("file", "etc/whitedout", b"ahhhh whiteout"), ("symlink", "localetc", "/etc")]),
    Breakout("WhiteoutDirectoryName", lambda _: [reg(".wh.etc/somefile", b"non-empty")],
             all_of(value("etc/passwd", b"all users"), value(".wh.etc/somefile", b"non-empty")),
             lower=[*USERS_LOWER, ("file", "etc/whitedout", b"ahhhh whiteout"), ("symlink", "localetc", "/etc")]),
    Breakout("WhiteoutDeadSymlinkParent", lambda _: [reg("localetc/.wh.etc", b"")], value("etc/passwd", b"all users"),
             lower=[*USERS_LOWER, ("symlink", "localetc", "/dne")]),
    Breakout("WhiteoutRelativePath", lambda _: [reg("dne/../.wh.etc", b"")], absent("etc/passwd"),
             lower=[*USERS_LOWER, ("symlink", "localetc", "/dne")]),
    Breakout("SymlinkOverridePath",
             lambda _: [dir_("foo"), dir_("foo/tmp"), reg(f"foo/tmp/breakout-{PROBE}", bytes([0, 1, 2])),
                        sym("foo", "/"), reg(f"foo/tmp/breakout-{PROBE}", bytes([3, 4, 5])),
                        dir_("foo"), dir_("foo/tmp"), reg(f"foo/tmp/breakout-{PROBE}", bytes([6, 7, 8]))],
             no_breakout_file),
    Breakout("HardlinkSymlinkBeforeCreateTarget",
             lambda _: [dir_("etc", 0o770), sym("localpasswd", "/etc/passwd"), hard("localpasswd-dup", "localpasswd"),
                        reg("/etc/passwd", b"after")],
             same_file("localpasswd-dup", "/etc/passwd")),
    Breakout("HardlinkSymlinkRelative",
             lambda _: [*_passwd(), sym("passwdlink", "../../../../../etc/passwd"), hard("localpasswd", "/passwdlink")],
             all_of(same_symlink("localpasswd", "passwdlink"), same_file("/localpasswd", "/etc/passwd"))),
    Breakout("HardlinkSymlinkAbsolute",
             lambda _: [*_passwd(), sym("passwdlink", "/etc/passwd"), hard("localpasswd", "/passwdlink")],
             all_of(same_symlink("localpasswd", "passwdlink"), same_file("/localpasswd", "/etc/passwd"))),
    Breakout("HardlinkSymlinkChmod", _chmod_case),  # checked by _chmod_check: it needs the private dir
]


def make_lower(root: Path, steps: list[tuple[str, ...]]) -> None:
    """containerd's fstest.Apply: the tree the layer goes over, made directly."""
    for kind, path, *rest in steps:
        where = root / path
        if kind == "dir":
            where.mkdir(mode=0o755)
        elif kind == "file":
            where.write_bytes(rest[0])  # type: ignore[arg-type]
        elif kind == "symlink":
            os.symlink(rest[0], where)
        elif kind == "link":
            os.link(root / path, root / rest[0])  # type: ignore[operator]


def host_snapshot(top: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Everything under `top` but the root: mode, size, mtime; never following a link."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath, name))
            result[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return result


def test_the_port_has_containerds_cases_and_outcomes() -> None:
    assert len(BREAKOUTS) == 34 and len({case.name for case in BREAKOUTS}) == 34
    assert sum(case.containerd == "applied" for case in BREAKOUTS) == 30
    assert {case.name for case in BREAKOUTS if case.containerd == "refused"} == {
        "WhiteoutRootParent", "WhiteoutParent", "WhiteoutRoot", "WhiteoutCurrentDirectory"}
    assert all(case.why for case in BREAKOUTS if case.ours != case.containerd)


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("case", BREAKOUTS, ids=lambda case: case.name)
def test_breakout(case: Breakout, resolver: str, tmp_path: Path) -> None:
    private, root = tmp_path / "private", tmp_path / "root"
    private.mkdir()
    root.mkdir()
    make_lower(root, case.lower)
    layer = tar_of(*case.members(private))
    host_before = host_snapshot(tmp_path, root)
    probe = Path("/tmp") / f"breakout-{PROBE}"
    assert not os.path.lexists(probe)

    if case.ours == "refused":
        with pytest.raises(UnsafeArchive, match=case.reason):
            unpack_layer(io.BytesIO(layer), root, resolver=resolver)
    else:
        unpack_layer(io.BytesIO(layer), root, resolver=resolver)
        check = _chmod_check(private) if case.name == "HardlinkSymlinkChmod" else case.check
        assert check is not None
        check(root)

    assert host_snapshot(tmp_path, root) == host_before
    assert not os.path.lexists(probe)
