"""The safe unpacker on real files: a normal layer reproduced exactly, OCI layering rules,
and every hostile case of tests/hostile_tars.py with sentinels outside the root, through
both resolvers (openat2 RESOLVE_IN_ROOT and the fd-relative walk)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from demo.samples import EntrySpec, diff_trees, snapshot_tree
from images.resolve import resolver_name
from images.unpack import UnpackFailed, UnpackStats, UnsafeArchive, unpack_layer
from tests.hostile_tars import HOSTILE_CASES, PROBE_PATHS, HostileCase, Member, device, tar_of

MTIME = 1_700_000_000
RESOLVERS = ("openat2", "walk")


@dataclass
class M:
    """A member of a test layer (a thin builder over tarfile.TarInfo)."""

    info: tarfile.TarInfo
    data: bytes = b""

    def pair(self) -> Member:
        return self.info, (self.data if self.info.isreg() else None)


def member(name: str, kind: bytes, data: bytes = b"", *, linkname: str = "", mode: int | None = None,
           uid: int = 0, gid: int = 0, pax: dict[str, str] | None = None) -> M:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.uid, info.gid, info.mtime = kind, linkname, uid, gid, MTIME
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = dict(pax)
    return M(info, data)


def file(name: str, data: bytes = b"x\n", **kw: object) -> M:
    return member(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def directory(name: str, **kw: object) -> M:
    return member(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> M:
    return member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> M:
    return member(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(*members: M) -> bytes:
    return tar_of(*(m.pair() for m in members))

IS_ROOT = os.geteuid() == 0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unpack(data: bytes, root: Path, **kw: object) -> UnpackStats:
    root.mkdir(parents=True, exist_ok=True)
    return unpack_layer(io.BytesIO(data), root, **kw)  # type: ignore[arg-type]


def owner(uid: int, gid: int) -> tuple[int, int]:
    """Owners are restored only as root; otherwise files belong to us."""
    return (uid, gid) if IS_ROOT else (os.geteuid(), os.getegid())


# --- a normal layer -------------------------------------------------------------------

def normal_layer() -> tuple[list[M], dict[str, EntrySpec], dict[str, int]]:
    """The members of a realistic layer, the tree they must make (built by hand, not by
    reading the tar), and the mtime of every entry."""
    libfoo = b"\x7fELF" + bytes(range(256)) * 50
    y = b"#!/bin/sh\necho y\n"
    entries: list[tuple[M, EntrySpec | None]] = [
        (directory("etc"), EntrySpec("dir", 0o755)),
        (directory("etc/alternatives", mode=0o750), EntrySpec("dir", 0o750)),
        (file("etc/hosts", b"127.0.0.1 localhost\n"), None),
        (directory("usr"), EntrySpec("dir", 0o755)),
        (directory("usr/bin"), EntrySpec("dir", 0o755)),
        (file("usr/bin/y", y, mode=0o755, pax={"SCHILY.xattr.user.comment": "hello"}), None),
        (symlink("etc/alternatives/x", "/usr/bin/y"), EntrySpec("symlink", 0o777, target="/usr/bin/y")),
        (symlink("usr/bin/X11", "."), EntrySpec("symlink", 0o777, target=".")),
        (file("usr/bin/sudo", b"sudo\n", mode=0o4755), None),
        (file("usr/bin/crontab", b"crontab\n", mode=0o2755, gid=102), None),
        (directory("usr/lib"), EntrySpec("dir", 0o755)),
        (file("usr/lib/libfoo.so.1", libfoo), None),
        (hardlink("usr/lib/libfoo-hard.so.1", "usr/lib/libfoo.so.1"), None),
        (symlink("usr/lib/libfoo.so", "libfoo.so.1"), EntrySpec("symlink", 0o777, target="libfoo.so.1")),
        (directory("var"), EntrySpec("dir", 0o755)),
        (directory("var/tmp", mode=0o1777), EntrySpec("dir", 0o1777)),
        (directory("home"), EntrySpec("dir", 0o755)),
        (directory("home/user", mode=0o700, uid=1000, gid=1000), EntrySpec("dir", 0o700, *owner(1000, 1000))),
        (file("home/user/.profile", b"export X=1\n", mode=0o600, uid=1000, gid=1000), None),
        (file("empty", b""), None),
    ]
    members: list[M] = []
    expected: dict[str, EntrySpec] = {}
    mtimes: dict[str, int] = {}
    for i, (m, spec) in enumerate(entries):
        m.info.mtime = 1_600_000_000 + i * 1000
        members.append(m)
        if not m.info.islnk():  # a hardlink shares its target's inode, so its mtime too
            mtimes[m.info.name] = m.info.mtime
        if spec is None:  # files: described from what we put in, not from the tar
            spec = EntrySpec("file", m.info.mode, *owner(m.info.uid, m.info.gid), size=len(m.data),
                             sha256=sha(m.data), nlink=1)
        elif spec.kind == "symlink":
            spec = replace(spec, uid=owner(0, 0)[0], gid=owner(0, 0)[1])
        elif spec.kind == "dir" and m.info.uid == 0:
            spec = replace(spec, uid=owner(0, 0)[0], gid=owner(0, 0)[1])
        expected[m.info.name] = spec
    for path in ("usr/lib/libfoo.so.1", "usr/lib/libfoo-hard.so.1"):
        expected[path] = EntrySpec("file", 0o644, *owner(0, 0), size=len(libfoo), sha256=sha(libfoo), nlink=2)
    return members, expected, mtimes


def test_normal_layer_is_reproduced_exactly(tmp_path: Path) -> None:
    members, expected, mtimes = normal_layer()
    root = tmp_path / "root"
    stats = unpack(tar_bytes(*members), root)

    assert diff_trees(expected, snapshot_tree(root)) == []
    assert (stats.files, stats.symlinks, stats.hardlinks, stats.dirs) == (7, 3, 1, 9)
    assert stats.skipped == {}
    for path, mtime in mtimes.items():  # directory mtimes too: set after their children
        assert os.lstat(root / path).st_mtime == mtime, path
    assert os.getxattr(root / "usr/bin/y", "user.comment") == b"hello"
    assert os.stat(root / "usr/lib/libfoo.so.1").st_ino == os.stat(root / "usr/lib/libfoo-hard.so.1").st_ino


def test_progress_reports_growing_positions(tmp_path: Path) -> None:
    members, _, _ = normal_layer()
    seen: list[int] = []
    unpack(tar_bytes(*members), tmp_path / "root", on_progress=seen.append)
    assert seen == sorted(seen) and len(seen) == len(members) and seen[-1] > 0


# --- layering -------------------------------------------------------------------------

def layer_one() -> bytes:
    return tar_bytes(
        file("gone", b"gone\n"),
        directory("gonedir"), file("gonedir/a", b"a\n"),
        directory("opq_after"), file("opq_after/old", b"old\n"), directory("opq_after/sub"),
        file("opq_after/sub/old2", b"old2\n"),
        directory("opq_before"), file("opq_before/old", b"old\n"),
        file("f2d", b"was a file\n"),
        directory("d2f"), directory("d2f/sub"), file("d2f/sub/x", b"x\n"),
        file("mine", b"lower mine\n"),
        file("renew", b"lower renew\n"),
        file("stays", b"stays\n"),
    )


def layer_two() -> bytes:
    return tar_bytes(
        file(".wh.gone", b""),
        file(".wh.gonedir", b""),
        # opaque marker after the directory's own entries
        directory("opq_after"), file("opq_after/new", b"new\n"), file("opq_after/.wh..wh..opq", b""),
        # opaque marker before them
        directory("opq_before"), file("opq_before/.wh..wh..opq", b""), file("opq_before/new", b"new\n"),
        directory("f2d"), file("f2d/child", b"child\n"),
        file("d2f", b"now a file\n"),
        file("dup", b"first\n"), file("dup", b"second\n", mode=0o600),
        # this layer writes `mine`, then whites it out: whiteouts hide lower layers only
        file("mine", b"upper mine\n"), file(".wh.mine", b""),
        # whiteout first, then a new entry of the same name
        file(".wh.renew", b""), file("renew", b"upper renew\n"),
    )


def test_layer_two_over_layer_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unpack(layer_one(), root)
    stats = unpack(layer_two(), root)

    def f(data: bytes, mode: int = 0o644) -> EntrySpec:
        return EntrySpec("file", mode, *owner(0, 0), size=len(data), sha256=sha(data), nlink=1)

    d = EntrySpec("dir", 0o755, *owner(0, 0))
    expected = {
        "opq_after": d, "opq_after/new": f(b"new\n"),
        "opq_before": d, "opq_before/new": f(b"new\n"),
        "f2d": d, "f2d/child": f(b"child\n"),
        "d2f": f(b"now a file\n"),
        "dup": f(b"second\n", 0o600),
        "mine": f(b"upper mine\n"),
        "renew": f(b"upper renew\n"),
        "stays": f(b"stays\n"),
    }
    assert diff_trees(expected, snapshot_tree(root)) == []
    assert stats.whiteouts == 6


# --- hostile cases ----------------------------------------------------------------------

Snapshot = dict[str, tuple[str, int, int, str]]
SYSTEM_FILES = ("/etc/passwd", "/etc/shadow", "/etc/hosts")
LOWER = tar_of(*(m.pair() for m in (directory("lower"), file("lower/keep", b"lower keep\n"),
                                     directory("etc"), file("etc/passwd", b"root:x:0:0:lower\n"))))


def outside_snapshot(top: Path, root: Path) -> Snapshot:
    """Every path under `top` except `root` and its contents: type, size, mtime, content hash."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != root]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = sha(Path(full).read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(full)
            result[os.path.relpath(full, top)] = (stat.filemode(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return result


def system_snapshot() -> dict[str, tuple[int, int, str]]:
    result = {}
    for path in SYSTEM_FILES:
        if os.path.exists(path):
            st = os.lstat(path)
            result[path] = (st.st_mtime_ns, st.st_size, sha(Path(path).read_bytes()))
    return result


def escapes(tmp_path: Path) -> list[Path]:
    """Probe paths an escape would create that the snapshot of tmp_path does not cover."""
    return [p for p in (*PROBE_PATHS, tmp_path.parent / "outside", tmp_path.parent / "x") if os.path.lexists(p)]


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_hostile_case(case: HostileCase, resolver: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    unpack(LOWER, root)
    if case.lower is not None:
        unpack(case.lower(), root, resolver=resolver)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret\n")
    (tmp_path / "sibling-of-root").write_text("sibling\n")
    before, system_before = outside_snapshot(tmp_path, root), system_snapshot()
    assert escapes(tmp_path) == []
    limits: dict[str, object] = {"limits": case.limits} if case.limits is not None else {}
    limits["resolver"] = resolver

    if case.expect == "reject":
        with pytest.raises(UnsafeArchive) as raised:
            unpack(case.build(), root, **limits)
        message = str(raised.value)
        assert message and "\n" not in message, message
        assert case.reason in message, message
    else:
        unpack(case.build(), root, **limits)
        assert case.check is not None
        case.check(root)
        if "opaque_marker_in_root" not in case.name:
            assert (root / "lower/keep").read_bytes() == b"lower keep\n"  # the lower layer is still there

    assert outside_snapshot(tmp_path, root) == before
    assert system_snapshot() == system_before
    assert escapes(tmp_path) == []


def test_there_are_enough_hostile_cases() -> None:
    assert len(HOSTILE_CASES) >= 22
    assert len({case.name for case in HOSTILE_CASES}) == len(HOSTILE_CASES)
    assert all(case.expect in ("reject", "handled") for case in HOSTILE_CASES)
    assert all(case.check is not None for case in HOSTILE_CASES if case.expect == "handled")
    assert all(case.reason for case in HOSTILE_CASES if case.expect == "reject")


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_rejected_layer_names_the_entry_in_one_line(resolver: str, tmp_path: Path) -> None:
    data = tar_bytes(file("ok", b"ok\n"), symlink("lnk", "lnk"), file("lnk/shadow", b"pwned\n"))
    with pytest.raises(UnsafeArchive, match=r"^entry 'lnk/shadow': more than 40 symlinks resolving 'lnk'$"):
        unpack(data, tmp_path / "root", resolver=resolver)


def test_the_default_resolver_is_openat2_here_and_the_variable_forces_the_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """This kernel (and the guest's 6.1) has openat2; FLYIO_UNPACK_RESOLVER=walk is how the
    tests (and an operator) force the fallback."""
    monkeypatch.delenv("FLYIO_UNPACK_RESOLVER", raising=False)
    assert resolver_name() == "openat2"
    monkeypatch.setenv("FLYIO_UNPACK_RESOLVER", "walk")
    assert resolver_name() == "walk"
    monkeypatch.setenv("FLYIO_UNPACK_RESOLVER", "nonsense")
    with pytest.raises(ValueError, match="FLYIO_UNPACK_RESOLVER"):
        resolver_name()


def _devices() -> bytes:
    return tar_of(device("dev/null", tarfile.CHRTYPE), device("dev/sda", tarfile.BLKTYPE, 8, 0),
                  file("dev/after", b"after\n").pair())


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a device node needs CAP_MKNOD")
def test_device_nodes_are_made_with_their_numbers_and_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYIO_UNPACK_DEVICES", raising=False)
    stats = unpack(_devices(), tmp_path / "root")
    null, sda = os.lstat(tmp_path / "root/dev/null"), os.lstat(tmp_path / "root/dev/sda")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert stat.S_IMODE(null.st_mode) == 0o666 and stats.devices == 2 and not stats.skipped


def test_the_device_policy_can_skip_device_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYIO_UNPACK_DEVICES", "skip")
    stats = unpack(_devices(), tmp_path / "root")
    assert stats.skipped == {"device node": 2}
    assert sorted(os.listdir(tmp_path / "root/dev")) == ["after"]
    monkeypatch.setenv("FLYIO_UNPACK_DEVICES", "sometimes")
    with pytest.raises(ValueError, match="FLYIO_UNPACK_DEVICES"):
        unpack(_devices(), tmp_path / "other")


def test_replacing_many_directories_is_linear(tmp_path: Path) -> None:
    """N directories then N files of the same names: each replacement drops the pending
    metadata of one subtree. A scan of all directories per replacement made this O(N^2).
    The check is the growth of this process's own CPU time from N to 4N (not wall time,
    which a loaded host stretches): linear work is about 4x, quadratic 16x."""
    import time

    def cpu_seconds(count: int) -> float:
        data = tar_bytes(*(directory(f"d{i}") for i in range(count)), *(file(f"d{i}", b"") for i in range(count)))
        root = tmp_path / f"root-{count}"
        started = time.process_time()
        stats = unpack(data, root)
        spent = time.process_time() - started
        assert stats.files == count and stats.dirs == count
        assert all(stat.S_ISREG(os.lstat(root / f"d{i}").st_mode) for i in range(0, count, 997))
        return spent

    small, large = cpu_seconds(2_000), cpu_seconds(8_000)
    assert large < 8 * max(small, 0.05), (small, large)


def test_replaced_directory_forgets_its_subdirectories_metadata(tmp_path: Path) -> None:
    data = tar_bytes(directory("a"), directory("a/b", mode=0o700), file("a", b"file\n"),
                     directory("a", mode=0o750), file("a/b/c", b"c\n"))
    unpack(data, tmp_path / "root")
    assert stat.S_IMODE(os.lstat(tmp_path / "root/a").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(tmp_path / "root/a/b").st_mode) == 0o755  # made for a/b/c, not the old a/b


def test_whiteout_of_own_dir_then_symlink_there(tmp_path: Path) -> None:
    """The layer's own `d/` is whited out (hides lower d/*), then `d` becomes the layer's own
    symlink: nothing to prune, nothing followed."""
    root = tmp_path / "root"
    unpack(tar_bytes(directory("d"), file("d/old", b"old\n")), root)
    unpack(tar_bytes(directory("d"), file(".wh.d", b""), symlink("d", "/etc")), root)
    assert os.readlink(root / "d") == "/etc"


def test_repeated_whiteouts_of_a_big_directory_stay_cheap(tmp_path: Path) -> None:
    import time

    count = 5_000
    root = tmp_path / "root"
    unpack(tar_bytes(directory("d"), file("d/lower", b"lower\n")), root)
    data = tar_bytes(directory("d"), *(file(f"d/f{i}", b"") for i in range(count)),
                     *(file(".wh.d", b"") for _ in range(count)))
    started = time.monotonic()
    unpack(data, root)
    assert time.monotonic() - started < 20
    assert not os.path.lexists(root / "d/lower") and len(os.listdir(root / "d")) == count


@pytest.mark.skipif(os.geteuid() != 0, reason="setting security.capability and chown to another uid need root")
def test_file_capability_and_setgid_survive_the_chown(tmp_path: Path) -> None:
    # A v2 VFS capability (cap_net_bind_service, effective): binary, not valid UTF-8.
    capability = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")
    data = tar_bytes(file("usr/bin/ping", b"\x7fELF", mode=0o2755, uid=1000, gid=1001,
                          pax={"SCHILY.xattr.security.capability": capability.decode("utf-8", "surrogateescape")}))
    stats = unpack(data, tmp_path / "root")
    target = tmp_path / "root/usr/bin/ping"
    st = os.lstat(target)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o2755)
    assert os.getxattr(target, "security.capability") == capability
    assert stats.skipped == {}


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_symlink_chains_stop_at_40(resolver: str, tmp_path: Path) -> None:
    """The kernel's MAXSYMLINKS, in both resolvers: a chain of 40 symlinks is followed, 41 is
    a clean error naming the entry."""
    def chain(length: int) -> list[M]:
        return [symlink(f"l{i}", f"l{i + 1}") for i in range(length - 1)] + [symlink(f"l{length - 1}", "/real")]

    ok = tmp_path / "ok"
    unpack(tar_bytes(directory("real"), *chain(40), file("l0/x", b"x\n")), ok, resolver=resolver)
    assert (ok / "real/x").read_bytes() == b"x\n"
    with pytest.raises(UnsafeArchive, match=r"^entry 'l0/x': more than 40 symlinks resolving 'l0'$"):
        unpack(tar_bytes(directory("real"), *chain(41), file("l0/x", b"x\n")), tmp_path / "over", resolver=resolver)


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_cached_parent_follows_a_replaced_symlink(resolver: str, tmp_path: Path) -> None:
    """`l -> a`, `l/x`, then `l -> b`, `l/y`: the second write goes where `l` points now,
    not to the directory resolved (and cached) for the first."""
    root = tmp_path / "root"
    unpack(tar_bytes(directory("a"), directory("b"), symlink("l", "a"), file("l/x", b"x\n"),
                     symlink("l", "b"), file("l/y", b"y\n")), root, resolver=resolver)
    assert sorted(os.listdir(root / "a")) == ["x"] and sorted(os.listdir(root / "b")) == ["y"]


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_opaque_and_whiteout_see_what_the_layer_wrote_through_another_name(resolver: str, tmp_path: Path) -> None:
    """Layer 2 writes `bin/new` (landing in usr/bin) and marks `usr/bin` opaque: `new` is
    this layer's and stays, the lower `usr/bin/old` goes."""
    root = tmp_path / "root"
    unpack(tar_bytes(directory("usr"), directory("usr/bin"), file("usr/bin/old"), symlink("bin", "usr/bin")), root)
    unpack(tar_bytes(file("bin/new", b"new\n"), file("usr/bin/.wh..wh..opq", b"")), root, resolver=resolver)
    assert sorted(os.listdir(root / "usr/bin")) == ["new"]
    assert os.readlink(root / "bin") == "usr/bin"


# --- the writer pool, the owner and mode shortcuts -----------------------------------------

@pytest.mark.parametrize("writers", ["0", "2"])
def test_normal_layer_with_and_without_writer_threads(writers: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """FLYIO_UNPACK_WRITERS=2 hands file data and its metadata to two threads: the same tree,
    modes, owners, xattrs and mtimes as writing inline (0, the default)."""
    monkeypatch.setenv("FLYIO_UNPACK_WRITERS", writers)
    members, expected, mtimes = normal_layer()
    big = file("usr/lib/big", bytes(range(256)) * 20_000)  # 5 MB: written in several pieces
    root = tmp_path / "root"
    unpack(tar_bytes(*members, big), root)
    expected["usr/lib/big"] = EntrySpec("file", 0o644, *owner(0, 0), size=len(big.data), sha256=sha(big.data), nlink=1)
    assert diff_trees(expected, snapshot_tree(root)) == []
    for path, mtime in mtimes.items():
        assert os.lstat(root / path).st_mtime == mtime, path


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("writers", ["0", "2"])
def test_a_full_filesystem_is_unpack_failed_naming_the_entry(writers: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from a real (1 MiB tmpfs) filesystem, inline or on a writer thread: UnpackFailed
    naming the entry, with the OSError as its cause (states/unpacking.py reads its errno)."""
    monkeypatch.setenv("FLYIO_UNPACK_WRITERS", writers)
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True, timeout=60,
                   capture_output=True)
    try:
        with pytest.raises(UnpackFailed, match=r"^unpacking entry 'big': No space left on device$") as raised:
            unpack(tar_bytes(file("small", b"ok\n"), file("big", os.urandom(3 << 20))), root)
        assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", str(root)], check=True, timeout=60, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners other than our own need root")
def test_owner_is_right_in_a_setgid_directory(tmp_path: Path) -> None:
    """A file made in a setgid directory takes the directory's group: the fchown skipped for
    files already owned as the tar says must not skip these (the owner is seen, not guessed)."""
    root = tmp_path / "root"
    unpack(tar_bytes(directory("shared", mode=0o2775, gid=50)), root)
    unpack(tar_bytes(file("shared/root-owned", gid=0), file("shared/group-owned", gid=50),
                     file("plain", gid=0)), root)
    assert os.lstat(root / "shared/root-owned").st_gid == 0
    assert os.lstat(root / "shared/group-owned").st_gid == 50
    assert (os.lstat(root / "plain").st_uid, os.lstat(root / "plain").st_gid) == (0, 0)


def test_modes_survive_any_umask(tmp_path: Path) -> None:
    """Files created with their final mode (one fchmod less) only when the umask takes nothing
    from it: under umask 077 a 0644 file is still 0644."""
    old = os.umask(0o077)
    try:
        unpack(tar_bytes(file("a", mode=0o644), file("b", mode=0o600), file("c", mode=0o4755)), tmp_path / "root")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.lstat(tmp_path / "root" / name).st_mode) for name in "abc"}
    assert modes == {"a": 0o644, "b": 0o600, "c": 0o4755}
