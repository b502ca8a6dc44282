"""The QEMU guest harness (tests/vm/harness.py): host-only checks of its pieces, then real
guests (marked `vm`) that boot Debian's kernel and drive device-mapper in it.

Guest tests need root (9p passthrough, apt-get) and the guest's assets; they skip with the
reason when those are missing (under CI=true they fail with it: tests/vm/ci.py). TCG is slow, so each guest does one small scenario.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm.harness import (
    CpioWriter,
    GuestResult,
    VmAssets,
    clean_console,
    command_script,
    command_section,
    ensure_assets,
    guest_env,
    has_pvh_entry,
    module_depends,
    module_files,
    run_in_guest,
    start_guest,
)
from tests.vm.ci import require_guest

# Generous: a boot is ~10 s on an idle 2-core host but several times that when other
# guests share the CPUs.
GUEST_TIMEOUT = 300.0

# Everything real-kernel.md says the guest loads.
DOCUMENTED_MODULES = (
    "virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet "
    "9pnet_virtio 9p crc32c_generic libcrc32c dm_mod dm_bufio dm_bio_prison dm_persistent_data "
    "dm_thin_pool loop crc16 mbcache jbd2 ext4"
).split()

# A pool as in OPERATIONS.md "Manual Recovery (Legacy Method)", on small files in the share
# ($1). truncate, not fallocate: 9p has no fallocate (EOPNOTSUPP).
POOL_UP = r"""
set -eu
d="$1"
[ -e "$d/pool_meta" ] || truncate -s 1M "$d/pool_meta"
[ -e "$d/pool_data" ] || truncate -s 64M "$d/pool_data"
meta=$(losetup -f --show "$d/pool_meta")
data=$(losetup -f --show "$d/pool_data")
sectors=$(blockdev --getsz "$data")
dmsetup create --verifyudev pool --table "0 $sectors thin-pool $meta $data 2048 32768"
dmsetup mknodes
"""
THIN_UP = r"""
dmsetup create --verifyudev thin1 --table "0 65536 thin /dev/mapper/pool 1"
dmsetup mknodes
mkdir -p /tmp/mnt
"""
NEW_THIN = r"""
dmsetup message pool 0 "create_thin 1"
""" + THIN_UP + r"""
mkfs.ext4 -q /dev/mapper/thin1
mount /dev/mapper/thin1 /tmp/mnt
"""
TEARDOWN = r"""
umount /tmp/mnt
dmsetup remove thin1
dmsetup remove pool
losetup -D
"""


def _shell(script: str, share: Path) -> list[str]:
    """argv running `script` with the share as $1 (never formatted into the script)."""
    return ["sh", "-c", script, "sh", str(share)]


def _explain(result: GuestResult) -> str:
    return f"returncode={result.returncode} timed_out={result.timed_out} error={result.guest_error}\n" \
           f"{result.output[-3000:]}"


def _status_lines(text: str) -> dict[str, list[str]]:
    """`dmsetup status` lines by device name: {"pool": ["0", "131072", "thin-pool", ...]}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^(\S+): (\d+ \d+ (?:thin-pool|thin) .*)$", line.strip())
        if match:
            found[match.group(1)] = match.group(2).split()
    return found


# --------------------------------------------------------------------------- host only


def test_command_script_quotes_argv_env_and_cwd(tmp_path: Path) -> None:
    """The generated script hands hostile argv/env/cwd over verbatim (run here by the host's sh)."""
    workdir = tmp_path / "dir with 'quote' and $x"
    workdir.mkdir()
    argv = ["sh", "-c", 'printf "<%s>\\n" "$@"; pwd; printf "%s\\n" "$FOO"', "sh", "a b", "it's", "$HOME", "*", "; rm -rf /"]
    script = tmp_path / "command.sh"
    script.write_text(command_script(argv, {"FOO": "x y;$(false)`id`", "PATH": "/usr/bin:/bin"}, str(workdir), "n0"))
    done = subprocess.run(["env", "-i", "/bin/sh", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["<a b>", "<it's>", "<$HOME>", "<*>", "<; rm -rf />", str(workdir),
                                        "x y;$(false)`id`"]


def test_command_script_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        command_script(["true"], {"A;B": "x"}, "/", "n0")
    with pytest.raises(ValueError):
        command_script([], {}, "/", "n0")


def test_share_with_unsafe_path_is_refused(tmp_path: Path) -> None:
    """The share's path goes on the kernel command line: spaces would split it."""
    share = tmp_path / "a share"
    share.mkdir()
    with pytest.raises(ValueError, match="only"):
        run_in_guest(["true"], share_dir=share, timeout=5)


def test_guest_env_has_sbin_venv_and_overrides() -> None:
    env = guest_env({"HOME": "/root", "EXTRA": "1"})
    path = env["PATH"].split(":")
    assert "/sbin" in path and "/usr/sbin" in path
    venv_bin = Path(__file__).resolve().parent.parent / ".venv" / "bin"
    if venv_bin.is_dir():
        assert path[0] == str(venv_bin)
    assert env["HOME"] == "/root" and env["EXTRA"] == "1"
    assert env["PYTEST_ADDOPTS"] == "-p no:cacheprovider"


def test_console_cleaning_and_command_section() -> None:
    raw = "\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\nBooting..\r\nFLYIO-VM-BEGIN abc\r\nhello\r\nworld\r\n\r\nFLYIO-VM-EXIT abc 3\r\n"
    console = clean_console(raw)
    assert "\x1b" not in console and "\r" not in console
    assert command_section(console) == "hello\nworld\n"
    assert command_section("FLYIO-VM-BEGIN abc\npartial") == "partial"
    assert command_section("no marker") == ""


def test_cpio_writer_output_extracts_with_cpio(tmp_path: Path) -> None:
    """The initramfs format is the one GNU cpio (and the kernel) read."""
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed")
    archive = CpioWriter()
    archive.directory("bin")
    archive.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    archive.file("odd", b"x" * 5)
    done = subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"], input=archive.finish(),
                          cwd=tmp_path, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(tmp_path / "bin" / "tool", os.X_OK)
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


# --------------------------------------------------------------------------- guests


@pytest.fixture(scope="module")
def assets() -> VmAssets:
    """The guest's kernel and initramfs, or a skip (under CI=true: a failure) saying why they cannot be had."""
    return require_guest()


@pytest.mark.vm
def test_assets_are_cached_complete_and_in_dependency_order(assets: VmAssets) -> None:
    started = time.monotonic()
    again = ensure_assets()
    assert time.monotonic() - started < 2.0, "a second ensure_assets() must reuse the cache"
    assert again == assets
    assert set(DOCUMENTED_MODULES) <= set(assets.modules)
    files = module_files(assets.kernel.parent.parent / "lib" / "modules" / assets.kernel_version)
    position = {name: i for i, name in enumerate(assets.modules)}
    for name in assets.modules:
        for dependency in module_depends(files[name]):
            assert position[dependency] < position[name], f"{name} is loaded before its dependency {dependency}"
    if assets.kernel.name.startswith("vmlinux-"):
        assert has_pvh_entry(assets.kernel.read_bytes())


@pytest.mark.vm
def test_guest_has_dm_thin(assets: VmAssets, tmp_path: Path) -> None:
    """Boot + `dmsetup version` + `dmsetup targets`: the driver is there and offers thin-pool."""
    result = run_in_guest(["sh", "-c", "dmsetup version && echo TARGETS && dmsetup targets"],
                          share_dir=tmp_path, timeout=GUEST_TIMEOUT)
    assert result.returncode == 0, _explain(result)
    out = result.command_output
    assert re.search(r"^Driver version:\s+4\.\d+\.\d+$", out, re.MULTILINE), out
    targets = {line.split()[0] for line in out.split("TARGETS\n", 1)[1].splitlines() if line.strip()}
    assert {"thin-pool", "thin", "linear", "error", "flakey", "delay"} <= targets, targets
    assert result.boot_seconds is not None and result.boot_seconds < result.wall_seconds


@pytest.mark.vm
def test_guest_runs_argv_in_cwd_with_env_and_propagates_exit_code(assets: VmAssets, tmp_path: Path) -> None:
    """argv/env/cwd arrive verbatim, the host's python3 (venv first) runs, / is read-only,
    the share is writable at the same path, and the exit code comes back."""
    script = (
        'printf "<%s>\\n" "$@"; echo "cwd=$(pwd)"; echo "foo=$FOO"; echo "python=$(command -v python3)"; '
        # SQLite in WAL mode on the share: needs the share's cache=mmap (shared mmap of -shm).
        'python3 -c "import sys, sqlite3; db = sqlite3.connect(\'wal.db\'); '
        'print(\'py\', sys.version_info[:2], db.execute(\'pragma journal_mode=wal\').fetchone()[0]); '
        'db.execute(\'create table t(x)\'); db.commit()"; '
        'touch /usr/.flyio-vm-probe 2>/dev/null && echo root-writable || echo root-read-only; '
        'echo from-guest > written.txt; exit 7'
    )
    result = run_in_guest(["sh", "-c", script, "sh", "a b", "it's", "*"], share_dir=tmp_path,
                          timeout=GUEST_TIMEOUT, env={"FOO": "x y;$(false)"}, cwd=str(tmp_path))
    assert result.returncode == 7, _explain(result)
    lines = result.command_output.splitlines()
    assert lines[:3] == ["<a b>", "<it's>", "<*>"], lines
    assert f"cwd={tmp_path}" in lines
    assert "foo=x y;$(false)" in lines
    assert f"python={shutil.which('python3', path=guest_env()['PATH'])}" in lines
    assert f"py {tuple(sys.version_info[:2])} wal" in lines
    assert "root-read-only" in lines
    assert (tmp_path / "written.txt").read_text() == "from-guest\n"
    assert not (tmp_path / ".flyio-vm").exists(), "the per-run folder is removed afterwards"


@pytest.mark.vm
def test_thin_pool_on_loop_files_in_the_share(assets: VmAssets, tmp_path: Path) -> None:
    """The guide's pool on 1M/64M files in the share, a thin volume with ext4, a file on it."""
    script = POOL_UP + NEW_THIN + r"""
echo hello > /tmp/mnt/hello
sync
echo "read=$(cat /tmp/mnt/hello)"
echo STATUS
dmsetup status
""" + TEARDOWN + "echo TORN-DOWN\n"
    result = run_in_guest(_shell(script, tmp_path), share_dir=tmp_path, timeout=GUEST_TIMEOUT)
    assert result.returncode == 0, _explain(result)
    out = result.command_output
    assert "read=hello" in out and "TORN-DOWN" in out, out
    status = _status_lines(out.split("STATUS\n", 1)[1])
    pool, thin = status["pool"], status["thin1"]
    # pool: 0 <len> thin-pool <transaction> <used>/<total meta> <used>/<total data> ...
    assert pool[:3] == ["0", "131072", "thin-pool"], pool
    meta_used, meta_total = map(int, pool[4].split("/"))
    data_used, data_total = map(int, pool[5].split("/"))
    assert data_total == 64 and 0 < data_used < data_total, pool  # 1 MiB blocks (2048 sectors)
    assert 0 < meta_used < meta_total, pool
    # thin: 0 <len> thin <mapped sectors> <highest mapped sector>
    assert thin[:3] == ["0", "65536", "thin"] and int(thin[3]) > 0, thin
    # What the loop devices wrote went through 9p into the host's files.
    assert (tmp_path / "pool_meta").stat().st_size == 1 << 20
    assert (tmp_path / "pool_data").stat().st_size == 64 << 20
    assert (tmp_path / "pool_data").stat().st_blocks > 0


@pytest.mark.vm
def test_hanging_command_is_killed_at_the_timeout(assets: VmAssets, tmp_path: Path) -> None:
    """A command that never ends: QEMU is SIGKILLed at the timeout, timed_out is set."""
    started_file = tmp_path / "started"
    guest = start_guest(["sh", "-c", 'touch "$1"; exec sleep 100000', "sh", str(started_file)], share_dir=tmp_path)
    with guest:
        assert guest.wait_for_path(started_file, GUEST_TIMEOUT), guest.output[-3000:]
        before = time.monotonic()
        result = guest.wait(timeout=3)
    assert time.monotonic() - before < 15
    assert result.timed_out and result.returncode is None, _explain(result)
    assert guest.process.poll() is not None
    # run_in_guest's own timeout, here ending the guest while it still boots.
    early = run_in_guest(["true"], share_dir=tmp_path, timeout=2)
    assert early.timed_out and early.returncode is None and early.wall_seconds < 15


@pytest.mark.vm
def test_power_cut_keeps_the_pool_for_a_fresh_guest(assets: VmAssets, tmp_path: Path) -> None:
    """Kill QEMU mid-job (after a sync), boot a fresh guest on the same share: the pool's
    metadata and the thin volume's data are back, the guide's kernel-panic recovery."""
    ready = tmp_path / "ready"
    first = POOL_UP + NEW_THIN + r"""
echo survived > /tmp/mnt/data
sync
touch "$d/ready"
exec sleep 100000
"""
    with start_guest(_shell(first, tmp_path), share_dir=tmp_path) as guest:
        assert guest.wait_for_path(ready, GUEST_TIMEOUT), guest.output[-3000:]
        guest.kill()
    assert guest.process.returncode == -9  # SIGKILL: a power cut, nothing shut down
    second = POOL_UP + r"""
if dmsetup message pool 0 "create_thin 1" 2>/dev/null; then echo thin-1-was-lost; fi
""" + THIN_UP + r"""
mount /dev/mapper/thin1 /tmp/mnt
echo "data=$(cat /tmp/mnt/data)"
dmsetup status pool
""" + TEARDOWN
    result = run_in_guest(_shell(second, tmp_path), share_dir=tmp_path, timeout=GUEST_TIMEOUT)
    assert result.returncode == 0, _explain(result)
    assert "data=survived" in result.command_output, _explain(result)
    assert "thin-1-was-lost" not in result.command_output
