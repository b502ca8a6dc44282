"""The device helpers on real parts: losetup loop devices, mkfs.ext4, mount/umount and
/proc/self/mountinfo. Every test checks that it left no loop device and no mount behind."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.filesystem import (LAYER_BLOCK_SIZE_ENV, LAYER_UNPACK_MOUNT_OPTIONS, VM_JOURNAL_MIN_DEVICE_BYTES,
                                flush_filesystem, layer_block_size, make_filesystem)
from devices.loop import attach, detach, find_backing, list_loops
from devices.mount import is_mounted, mount, mount_entry, mount_point_of, mounted, mounts, parse_mountinfo, unmount
from support.errors import HazardError, ManagerError
from support.proc import CommandFailed, CommandTimeout, run_command

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
needs_loop = pytest.mark.skipif(not Path("/dev/loop-control").exists(), reason="no loop devices (/dev/loop-control)")
IMAGE_SIZE = 64 * 1024**2


def loops_under(directory: Path) -> list[str]:
    return sorted(dev for dev, backing in list_loops().items() if backing.startswith(f"{directory}/"))


def mounts_under(directory: Path) -> list[str]:
    return [m.target for m in mounts() if m.target.startswith(f"{directory}/")]


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory whose loops and mounts must all be gone when the test ends (cleaned, then failed if leaked)."""
    assert loops_under(tmp_path) == [] and mounts_under(tmp_path) == []
    yield tmp_path
    leaked_mounts, leaked_loops = mounts_under(tmp_path), loops_under(tmp_path)
    for target in reversed(leaked_mounts):
        unmount(target)
    for dev in leaked_loops:
        detach(dev)
    assert (leaked_mounts, leaked_loops) == ([], []), "the test leaked mounts or loop devices"


def image(directory: Path, name: str = "disk.img", size: int = IMAGE_SIZE) -> Path:
    path = directory / name
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


# -- /proc/self/mountinfo, pure parsing ---------------------------------------------------


def test_mountinfo_unescapes_octal_and_skips_optional_fields() -> None:
    text = "\n".join([
        r"36 25 0:32 / /mnt/with\040space rw,relatime shared:1 master:2 - ext4 /dev/loop3 rw",
        r"37 25 7:4 / /mnt/tab\011and\134backslash ro,nodev,nosuid - xfs /dev/loop\0404 ro,attr2",
        "38 25 0:5 / /proc rw - proc proc rw",
        "garbage line without separator",
    ])
    entries = parse_mountinfo(text)
    assert [(e.source, e.target, e.fstype) for e in entries] == [
        ("/dev/loop3", "/mnt/with space", "ext4"),
        ("/dev/loop 4", "/mnt/tab\tand\\backslash", "xfs"),
        ("proc", "/proc", "proc"),
    ]
    assert not entries[0].read_only and entries[1].read_only
    assert entries[1].options == ("ro", "nodev", "nosuid")


def test_mountinfo_leaves_a_backslash_without_octal_digits_alone() -> None:
    entry = parse_mountinfo(r"1 1 0:1 / /a\9b\04 rw - tmpfs none rw")[0]
    assert entry.target == r"/a\9b\04"


@needs_root
def test_the_mount_table_follows_every_mount_and_unmount_at_once(scratch: Path) -> None:
    """mounts() parses /proc/self/mountinfo again only after the kernel says it changed; a
    mount and an unmount by another process are each seen by the very next call."""
    target = scratch / "tmpfs here"
    target.mkdir()
    before = mounts()
    assert mounts() == before and not is_mounted(target)
    for _ in range(3):
        run_command(["mount", "-t", "tmpfs", "-o", "size=1M", "none", str(target)], timeout=30)
        entry = mount_entry(target)
        assert entry is not None and entry.fstype == "tmpfs" and entry.source == "none"
        run_command(["umount", str(target)], timeout=30)
        assert not is_mounted(target)
    assert mounts() == before


# -- loop devices ---------------------------------------------------------------------------


@needs_root
@needs_loop
def test_attach_find_and_detach_idempotently(scratch: Path) -> None:
    path = image(scratch, "with space.img")
    dev = attach(path)
    try:
        assert dev.startswith("/dev/loop")
        assert find_backing(path) == [dev]
        assert list_loops()[dev] == str(path)
        ro = attach(path, read_only=True)
        try:
            assert find_backing(path) == sorted([dev, ro])
            assert run_command(["blockdev", "--getro", ro], timeout=10).stdout.strip() == "1"
            assert run_command(["blockdev", "--getsize64", dev], timeout=10).stdout.strip() == str(IMAGE_SIZE)
        finally:
            detach(ro)
    finally:
        detach(dev)
    detach(dev)  # already gone: fine
    assert find_backing(path) == []


@needs_root
@needs_loop
def test_find_backing_follows_the_file_not_its_name(scratch: Path) -> None:
    path = image(scratch)
    dev = attach(path)
    try:
        moved = path.rename(scratch / "moved.img")
        assert find_backing(moved) == [dev]
        assert find_backing(path) == []  # absent path: nothing, no error
        impostor = image(scratch)  # a new file at the old name is not what the loop holds
        assert find_backing(impostor) == []
    finally:
        detach(dev)


@needs_root
@needs_loop
def test_detach_of_a_device_that_is_not_a_loop_is_an_error() -> None:
    with pytest.raises(ManagerError, match="cannot detach /dev/null: Inappropriate ioctl for device"):
        detach("/dev/null")


# -- mkfs.ext4 ------------------------------------------------------------------------------


@needs_root
@needs_loop
def test_make_filesystem_writes_a_labelled_ext4(scratch: Path) -> None:
    dev = attach(image(scratch, size=VM_JOURNAL_MIN_DEVICE_BYTES))  # the smallest device with the VM's 8 MiB journal
    try:
        make_filesystem(dev, label="layer-1")
        probe = run_command(["blkid", "-p", "-o", "export", dev], timeout=10).stdout
        assert "TYPE=ext4" in probe.splitlines() and "LABEL=layer-1" in probe.splitlines()
        # A layer's ext4: the VM's journal, and inode tables never zeroed (not at mkfs, and
        # not later by the kernel's lazy-init thread: noinit_itable in the superblock).
        header = run_command(["dumpe2fs", "-h", dev], timeout=30).stdout
        assert "has_journal" in header and "noinit_itable" in header
        assert re.search(r"^Total journal size:\s+8M$", header, re.MULTILINE), header
    finally:
        detach(dev)


def block_size_of(device: str) -> int:
    header = run_command(["dumpe2fs", "-h", device], timeout=30).stdout
    return int(re.search(r"^Block size:\s+(\d+)$", header, re.MULTILINE).group(1))


@needs_root
@needs_loop
def test_layer_block_size_is_the_operators_choice(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = attach(image(scratch, size=1024**3))  # big enough that mke2fs's own choice is 4 KiB
    try:
        for value, expected in ((None, 4096), ("4k", 4096), ("2K", 2048), ("1024", 1024)):
            if value is None:
                monkeypatch.delenv(LAYER_BLOCK_SIZE_ENV, raising=False)
            else:
                monkeypatch.setenv(LAYER_BLOCK_SIZE_ENV, value)
            make_filesystem(dev, block_size=layer_block_size())
            assert block_size_of(dev) == expected, value
        header = run_command(["dumpe2fs", "-h", dev], timeout=30).stdout  # the layer's options still hold at 1 KiB
        assert "has_journal" in header and "inline_data" in header and "noinit_itable" in header
    finally:
        detach(dev)
    for bad in ("3K", "8K", "lots"):
        monkeypatch.setenv(LAYER_BLOCK_SIZE_ENV, bad)
        with pytest.raises(ManagerError, match=f"{LAYER_BLOCK_SIZE_ENV}='{bad}' is not an ext4 block size"):
            layer_block_size()


def journal_body(device: str) -> list[tuple[int, int]]:
    """Byte ranges on `device` of the journal (inode 8) after its superblock (the journal's
    first block, which mkfs writes)."""
    block = int(re.search(r"^Block size:\s+(\d+)$", run_command(["dumpe2fs", "-h", device], timeout=30).stdout,
                          re.MULTILINE).group(1))
    stat = run_command(["debugfs", "-R", "stat <8>", device], timeout=30).stdout
    extents = [(int(a), int(b), int(c)) for a, b, c, _ in re.findall(r"\((\d+)-(\d+)\):(\d+)-(\d+)", stat)]
    assert extents, stat
    return [((physical + (1 if logical == 0 else 0)) * block, (physical + last - logical + 1) * block)
            for logical, last, physical in extents]


def data_in(path: Path, start: int, end: int) -> bool:
    """Whether the sparse file at `path` holds any written block in [start, end) (bytes),
    looking only at the whole 4 KiB host blocks inside it (a small ext4 has 1 KiB blocks:
    the ones around the range share host blocks with it)."""
    start, end = -(-start // 4096) * 4096, end // 4096 * 4096
    with open(path, "rb") as fh:
        try:
            return os.lseek(fh.fileno(), start, os.SEEK_DATA) < end
        except OSError:  # ENXIO: no data after start
            return False


@needs_root
@needs_loop
def test_a_layers_journal_is_left_unwritten_by_mkfs_and_the_unpack_mount(scratch: Path) -> None:
    """The journal is made for the VM and costs the pool nothing until the VM mounts: mkfs
    does not zero it (lazy_journal_init) and a layer mounted the way the unpack step mounts
    it runs without it, however much metadata it writes. A plain mount writes it."""
    backing = image(scratch)
    dev = attach(backing)
    try:
        make_filesystem(dev)
        body = journal_body(dev)
        assert not any(data_in(backing, *extent) for extent in body)
        target = scratch / "mnt"
        target.mkdir()
        with mounted(dev, target, options=LAYER_UNPACK_MOUNT_OPTIONS):
            # The layer's device nodes and programs are never usable on the host.
            flags = os.statvfs(target).f_flag
            assert flags & os.ST_NODEV and flags & os.ST_NOSUID and flags & os.ST_NOEXEC
            for n in range(300):
                (target / f"d{n % 10}").mkdir(exist_ok=True)
                (target / f"d{n % 10}" / f"f{n}").write_bytes(b"x" * 100)
            flush_filesystem(target)
        assert not any(data_in(backing, *extent) for extent in body)
        with mounted(dev, target):
            for n in range(300):
                (target / f"d{n % 10}" / f"f{n}").unlink()
            flush_filesystem(target)
        assert any(data_in(backing, *extent) for extent in body)  # the same check sees a journal in use
    finally:
        detach(dev)


@needs_root
def test_make_filesystem_timeout_is_a_hazard(scratch: Path) -> None:
    # A FIFO stands in for a device whose I/O never completes: mkfs blocks reading it.
    stuck = scratch / "stuck-device"
    os.mkfifo(stuck)
    with pytest.raises(CommandTimeout) as timed_out:
        make_filesystem(str(stuck), timeout=1)
    assert isinstance(timed_out.value, HazardError)
    assert "mkfs.ext4" in str(timed_out.value) and "timed out after 1s" in str(timed_out.value)


# -- mount / unmount ------------------------------------------------------------------------


@pytest.fixture
def ext4_device(scratch: Path) -> Iterator[str]:
    dev = attach(image(scratch))
    try:
        make_filesystem(dev)
        yield dev
    finally:
        detach(dev)


@needs_root
@needs_loop
def test_mount_with_escaped_target_then_unmount(ext4_device: str, scratch: Path) -> None:
    target = scratch / "mount point\twith tab"
    target.mkdir()
    mount(ext4_device, target)
    try:
        assert is_mounted(target)
        assert mount_point_of(ext4_device) == str(target)
        entry = mount_entry(target)
        assert entry is not None and entry.fstype == "ext4" and entry.source == ext4_device
        assert {"rw", "nodev", "nosuid"} <= set(entry.options)
        (target / "hello").write_text("world")
    finally:
        unmount(target)
    assert not is_mounted(target) and mount_point_of(ext4_device) is None
    unmount(target)  # not mounted: fine
    with mounted(ext4_device, target, read_only=True) as where:
        assert (where / "hello").read_text() == "world"
        with pytest.raises(OSError) as refused:
            (where / "other").write_text("x")
        assert refused.value.errno == errno.EROFS
    assert not is_mounted(target)


@needs_root
@needs_loop
def test_mounted_unmounts_when_the_body_raises(ext4_device: str, scratch: Path) -> None:
    target = scratch / "m"
    target.mkdir()
    with pytest.raises(RuntimeError, match="body failed"):
        with mounted(ext4_device, target):
            assert is_mounted(target)
            raise RuntimeError("body failed")
    assert not is_mounted(target)


@needs_root
def test_mount_of_a_missing_device_is_one_line_with_stderr(scratch: Path) -> None:
    target = scratch / "m"
    target.mkdir()
    with pytest.raises(CommandFailed) as failed:
        with mounted("/dev/does-not-exist", target):
            pytest.fail("mounted a device that does not exist")
    message = str(failed.value)
    assert "\n" not in message and message.startswith("mount ") and "/dev/does-not-exist" in message
    assert failed.value.result.stderr.strip()  # mount's own reason is carried
    assert not is_mounted(target)


def test_mount_by_uuid_or_label_is_refused(tmp_path: Path) -> None:
    for source in ("UUID=0b5e1c1e-0000-4000-8000-000000000000", "LABEL=root"):
        with pytest.raises(ManagerError, match="mount by device path only"):
            mount(source, tmp_path)
