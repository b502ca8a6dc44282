"""devices/dmstatus.py against real `dmsetup status` lines.

The fixtures marked "guest" were captured on 2026-11-29 from Debian's 6.1.0-56-amd64
kernel (dm-thin-pool v1.22.0) in the QEMU guest, by
`python -m tests.vm --share /tmp/cap -- python tests/guest/capture_dm_status.py /tmp/cap`
(see that script for how each state was produced). `Fail` and the old-kernel line were
written by hand from the kernel's pool_status(): those states could not be produced
there (a failing metadata device made the pool read-only + needs_check, not Fail).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from devices.dmstatus import DmStatusError, parse_pool_status, parse_thin_status

# guest: a fresh 64 MB pool (4 MB metadata), table "... 2048 32768"
FRESH = "0 131072 thin-pool 0 111/1024 0/64 - rw no_discard_passdown queue_if_no_space - 256"
# guest: after 8 MB written to a thin device
AFTER_WRITES = "0 131072 thin-pool 0 112/1024 8/64 - rw no_discard_passdown queue_if_no_space - 256"
# guest: the table's `read_only` feature (on a clean pool)
READ_ONLY = "0 131072 thin-pool 0 112/1024 8/64 - ro no_discard_passdown queue_if_no_space - 256"
# guest: superblock with THIN_METADATA_NEEDS_CHECK_FLAG set ("unable to switch pool to write mode until repaired")
NEEDS_CHECK = "0 131072 thin-pool 0 112/1024 8/64 - ro no_discard_passdown queue_if_no_space needs_check 256"
# guest: an 8-block pool with error_if_no_space, filled by dd
OUT_OF_SPACE = "0 16384 thin-pool 0 112/1024 8/8 - out_of_data_space no_discard_passdown error_if_no_space - 256"
# guest: metadata behind dm-flakey failing writes; dm_pool_commit_metadata failed with -5
METADATA_ERRORS = "0 131072 thin-pool 0 112/1024 0/64 - ro no_discard_passdown queue_if_no_space needs_check 256"
# hand-written: fail mode
FAILED = "0 4194304 thin-pool Fail"
# hand-written: a kernel before needs_check and the watermark (3.x), with a held root
OLD_KERNEL = "0 4194304 thin-pool 7 20/256 100/2048 42 rw discard_passdown queue_if_no_space"
# guest: thin device status lines
THIN_UNWRITTEN = "0 65536 thin 0 -"
THIN_WRITTEN = "0 65536 thin 16384 16383"


def test_fresh_pool() -> None:
    s = parse_pool_status(FRESH)
    assert not s.failed and s.mode == "rw" and not s.read_only and not s.needs_check
    assert (s.transaction_id, s.used_metadata_blocks, s.total_metadata_blocks) == (0, 111, 1024)
    assert (s.used_data_blocks, s.total_data_blocks) == (0, 64)
    assert s.held_metadata_root is None
    assert s.discard == "no_discard_passdown" and s.no_space_policy == "queue_if_no_space"
    assert s.metadata_low_watermark == 256


def test_after_writes_counts_data_blocks() -> None:
    s = parse_pool_status(AFTER_WRITES)
    assert s.used_data_blocks == 8 and s.used_metadata_blocks == 112


def test_read_only() -> None:
    s = parse_pool_status(READ_ONLY)
    assert s.read_only and not s.needs_check and not s.out_of_data_space


@pytest.mark.parametrize("line", [NEEDS_CHECK, METADATA_ERRORS])
def test_needs_check_is_read_only(line: str) -> None:
    s = parse_pool_status(line)
    assert s.needs_check and s.read_only and not s.failed


def test_out_of_data_space() -> None:
    s = parse_pool_status(OUT_OF_SPACE)
    assert s.out_of_data_space and not s.read_only
    assert s.used_data_blocks == s.total_data_blocks == 8
    assert s.no_space_policy == "error_if_no_space"


@pytest.mark.parametrize("line", [FAILED, "Fail", "0 4194304 thin-pool Error"])
def test_failed_pool(line: str) -> None:
    s = parse_pool_status(line)
    assert s.failed and s.total_data_blocks == 0


def test_old_kernel_without_needs_check_or_watermark() -> None:
    s = parse_pool_status(OLD_KERNEL)
    assert not s.needs_check and s.mode == "rw" and s.metadata_low_watermark is None
    assert s.held_metadata_root == 42 and s.transaction_id == 7
    assert (s.used_data_blocks, s.total_data_blocks) == (100, 2048)


def test_args_without_target_prefix() -> None:
    args = FRESH.split(" ", 3)[3]
    assert parse_pool_status(args) == replace(parse_pool_status(FRESH), raw=args)


def test_unknown_future_token_does_not_shift_flags() -> None:
    s = parse_pool_status(FRESH.replace(" - 256", " - 256 some_new_flag"))
    assert s.mode == "rw" and not s.needs_check and s.metadata_low_watermark == 256


@pytest.mark.parametrize("line", [
    "",
    "0 131072 linear 8:0 0",
    "0 131072 thin-pool x 111/1024 0/64 - rw",
    "0 131072 thin-pool 0 111-1024 0/64 - rw",
    "0 131072 thin-pool 0 111/1024 0/64 root rw",
    "0 131072 thin-pool 0 111/1024",
])
def test_garbage_is_refused_in_one_line(line: str) -> None:
    with pytest.raises(DmStatusError) as err:
        parse_pool_status(line)
    assert "\n" not in str(err.value)


def test_thin_status() -> None:
    unwritten, written = parse_thin_status(THIN_UNWRITTEN), parse_thin_status(THIN_WRITTEN)
    assert unwritten.active and unwritten.mapped_sectors == 0 and unwritten.highest_mapped_sector is None
    assert written.mapped_sectors == 16384 and written.highest_mapped_sector == 16383
    assert not parse_thin_status("0 65536 thin -").active
    assert parse_thin_status("0 65536 thin Fail").failed
    with pytest.raises(DmStatusError):
        parse_thin_status("0 65536 thin many sectors")
