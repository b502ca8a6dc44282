"""Print real `dmsetup status` lines of thin pools in every state the parser must know.

Run inside a dm-thin guest (the fixtures in tests/test_dmstatus.py came from here):

    python -m tests.vm --share /tmp/cap -- python tests/guest/capture_dm_status.py /tmp/cap

States: a fresh pool, after writes, a read-only pool (`read_only` feature), a pool out
of data space (`error_if_no_space` so the write fails at once instead of queueing 60 s),
a pool whose metadata superblock has the needs_check flag set, and a pool whose metadata
device starts failing writes (dm-flakey), which the kernel turns read-only or Fail.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from support.proc import CommandFailed, run_command

SUPERBLOCK_CSUM_XOR = 160774
NEEDS_CHECK_FLAG = 1
DATA_BLOCK_SECTORS = 2048


def sh(*argv: str, check: bool = True) -> str:
    return run_command(list(argv), timeout=120, check=check).stdout.strip()


def crc32c(data: bytes) -> int:
    """Standard CRC-32C (Castagnoli), bitwise: only 4 KiB at a time here."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def superblock_checksum(block: bytes) -> int:
    """dm-persistent-data's dm_bm_checksum: crc32c(~0, ...) without final inversion, ^ xor."""
    return (~crc32c(block[4:]) & 0xFFFFFFFF) ^ SUPERBLOCK_CSUM_XOR


def set_needs_check(meta_file: Path) -> None:
    """Set THIN_METADATA_NEEDS_CHECK_FLAG in a (deactivated) pool's superblock."""
    with open(meta_file, "r+b") as fh:
        block = bytearray(fh.read(4096))
        stored = struct.unpack_from("<I", block, 0)[0]
        if superblock_checksum(bytes(block)) != stored:
            raise SystemExit("superblock checksum does not match our computation; not touching it")
        flags = struct.unpack_from("<I", block, 4)[0] | NEEDS_CHECK_FLAG
        struct.pack_into("<I", block, 4, flags)
        struct.pack_into("<I", block, 0, superblock_checksum(bytes(block)))
        fh.seek(0)
        fh.write(block)


def make_files(folder: Path, name: str, data_mb: int, meta_mb: int = 4) -> tuple[Path, Path]:
    meta, data = folder / f"{name}_meta", folder / f"{name}_data"
    for path, size in ((meta, meta_mb), (data, data_mb)):
        with open(path, "wb") as fh:
            fh.truncate(size << 20)
    return meta, data


def create_pool(name: str, meta_dev: str, data_dev: str, data_mb: int, features: list[str]) -> None:
    sectors = (data_mb << 20) // 512
    table = f"0 {sectors} thin-pool {meta_dev} {data_dev} {DATA_BLOCK_SECTORS} 32768 {len(features)} {' '.join(features)}"
    sh("dmsetup", "create", name, "--table", table.strip())
    sh("dmsetup", "mknodes")


def thin(pool: str, device_id: int, name: str, size_mb: int) -> str:
    sh("dmsetup", "message", pool, "0", f"create_thin {device_id}")
    sh("dmsetup", "create", name, "--table", f"0 {(size_mb << 20) // 512} thin /dev/mapper/{pool} {device_id}")
    sh("dmsetup", "mknodes")
    return f"/dev/mapper/{name}"


def report(label: str, device: str) -> None:
    print(f"STATUS {label}: {sh('dmsetup', 'status', device)}", flush=True)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    loops: list[str] = []

    def attach(path: Path) -> str:
        dev = sh("losetup", "--find", "--show", str(path))
        loops.append(dev)
        return dev

    # Healthy, then after writes.
    meta, data = make_files(folder, "a", 64)
    m, d = attach(meta), attach(data)
    create_pool("cap-a", m, d, 64, [])
    report("fresh", "cap-a")
    dev = thin("cap-a", 1, "cap-a-1", 32)
    report("thin-unwritten", "cap-a-1")
    sh("dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=8", "oflag=direct")
    report("after-writes", "cap-a")
    report("thin-written", "cap-a-1")
    sh("dmsetup", "remove", "cap-a-1")
    sh("dmsetup", "remove", "cap-a")

    # read_only feature.
    create_pool("cap-a", m, d, 64, ["read_only"])
    report("read-only", "cap-a")
    sh("dmsetup", "remove", "cap-a")

    # needs_check: the flag in the superblock of that same (now inactive) metadata.
    set_needs_check(meta)
    create_pool("cap-a", m, d, 64, [])
    report("needs-check", "cap-a")
    sh("dmsetup", "remove", "cap-a")

    # Out of data space: 8 data blocks, a 64 MB thin, error_if_no_space.
    meta, data = make_files(folder, "b", 8)
    create_pool("cap-b", attach(meta), attach(data), 8, ["error_if_no_space"])
    dev = thin("cap-b", 1, "cap-b-1", 64)
    try:
        sh("dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=16", "oflag=direct")
        print("WARNING: filling the pool did not fail")
    except CommandFailed:
        pass
    report("out-of-data-space", "cap-b")
    sh("dmsetup", "remove", "cap-b-1")
    sh("dmsetup", "remove", "cap-b")

    # Metadata device failing writes: flakey in front of the metadata loop.
    meta, data = make_files(folder, "c", 64)
    m = attach(meta)
    meta_sectors = (4 << 20) // 512
    sh("dmsetup", "create", "cap-c-meta", "--table", f"0 {meta_sectors} flakey {m} 0 1 0")
    sh("dmsetup", "mknodes")
    create_pool("cap-c", "/dev/mapper/cap-c-meta", attach(data), 64, [])
    dev = thin("cap-c", 1, "cap-c-1", 32)
    sh("dmsetup", "suspend", "cap-c-meta")
    sh("dmsetup", "reload", "cap-c-meta", "--table", f"0 {meta_sectors} flakey {m} 0 0 1 1 error_writes")
    sh("dmsetup", "resume", "cap-c-meta")
    sh("dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=4", "oflag=direct", check=False)
    sh("sync")
    sh("dmsetup", "message", "cap-c", "0", "create_thin 2", check=False)
    report("metadata-write-errors", "cap-c")
    for name in ("cap-c-1", "cap-c", "cap-c-meta"):
        sh("dmsetup", "remove", "--force", name, check=False)
    for dev in loops:
        sh("losetup", "--detach", dev, check=False)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/capture"))
