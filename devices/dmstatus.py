"""Parse `dmsetup status` lines of thin-pool and thin targets (pure functions, no I/O).

A thin-pool's status, after `<start> <length> thin-pool`, is (kernel 6.1):

    <transaction id> <used meta>/<total meta> <used data>/<total data> <held root or ->
    ro|rw|out_of_data_space [no_]discard_passdown|ignore_discard
    error_if_no_space|queue_if_no_space needs_check|- <metadata low watermark>

Older kernels stop before `needs_check` (and before the watermark); a pool in fail mode
prints just `Fail`, one whose metadata cannot be read prints `Error`. The counted fields
are parsed by position, the flags by what they say, so a token added by a future kernel
does not shift the meaning of the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from support.errors import ManagerError

MODES = ("rw", "ro", "out_of_data_space")
DISCARD_FLAGS = ("discard_passdown", "no_discard_passdown", "ignore_discard")
NO_SPACE_FLAGS = ("error_if_no_space", "queue_if_no_space")
FAILED_WORDS = ("Fail", "Error")


class DmStatusError(ManagerError):
    """A status line that is not what dm-thin prints."""


@dataclass(frozen=True)
class ThinPoolStatusLine:
    """One thin-pool status. Counts are in metadata blocks (4 KiB) and data blocks."""

    failed: bool
    transaction_id: int = 0
    used_metadata_blocks: int = 0
    total_metadata_blocks: int = 0
    used_data_blocks: int = 0
    total_data_blocks: int = 0
    held_metadata_root: int | None = None
    mode: str = ""
    discard: str = ""
    no_space_policy: str = ""
    needs_check: bool = False
    metadata_low_watermark: int | None = None
    raw: str = ""

    @property
    def read_only(self) -> bool:
        return self.mode == "ro"

    @property
    def out_of_data_space(self) -> bool:
        return self.mode == "out_of_data_space"


@dataclass(frozen=True)
class ThinStatusLine:
    """One thin device status: mapped sectors and the highest mapped sector (None if none)."""

    active: bool
    failed: bool = False
    mapped_sectors: int = 0
    highest_mapped_sector: int | None = None
    raw: str = ""


def _target_args(line: str, target: str) -> list[str]:
    """The tokens after `<start> <length> <target>`; a line without that prefix is taken as args."""
    tokens = line.split()
    if len(tokens) >= 3 and tokens[0].isdigit() and tokens[1].isdigit():
        if tokens[2] != target:
            raise DmStatusError(f"status line is a {tokens[2]} target, not {target}: {line.strip()!r}")
        return tokens[3:]
    return tokens


def _ratio(token: str, what: str, line: str) -> tuple[int, int]:
    used, sep, total = token.partition("/")
    if not sep or not used.isdigit() or not total.isdigit():
        raise DmStatusError(f"thin-pool status has no {what} used/total where expected: {line.strip()!r}")
    return int(used), int(total)


def parse_pool_status(line: str) -> ThinPoolStatusLine:
    """The fields of one `dmsetup status <pool>` line (raises DmStatusError if unparseable)."""
    args = _target_args(line, "thin-pool")
    raw = line.strip()
    if not args:
        raise DmStatusError(f"empty thin-pool status: {raw!r}")
    if args[0] in FAILED_WORDS:
        return ThinPoolStatusLine(failed=True, raw=raw)
    if len(args) < 4 or not args[0].isdigit():
        raise DmStatusError(f"thin-pool status too short or without a transaction id: {raw!r}")
    used_meta, total_meta = _ratio(args[1], "metadata", raw)
    used_data, total_data = _ratio(args[2], "data", raw)
    held = args[3]
    if held != "-" and not held.isdigit():
        raise DmStatusError(f"thin-pool status has a held root that is neither a block nor '-': {raw!r}")
    flags = args[4:]
    mode = next((t for t in flags if t in MODES), "")
    discard = next((t for t in flags if t in DISCARD_FLAGS), "")
    no_space = next((t for t in flags if t in NO_SPACE_FLAGS), "")
    watermark = next((int(t) for t in reversed(flags) if t.isdigit()), None)
    return ThinPoolStatusLine(
        failed=False,
        transaction_id=int(args[0]),
        used_metadata_blocks=used_meta, total_metadata_blocks=total_meta,
        used_data_blocks=used_data, total_data_blocks=total_data,
        held_metadata_root=None if held == "-" else int(held),
        mode=mode, discard=discard, no_space_policy=no_space,
        needs_check="needs_check" in flags,
        metadata_low_watermark=watermark,
        raw=raw,
    )


def parse_thin_status(line: str) -> ThinStatusLine:
    """One `dmsetup status thin-<id>` line: `<mapped sectors> <highest or ->`, `-` when not open."""
    args = _target_args(line, "thin")
    raw = line.strip()
    if not args or args == ["-"]:
        return ThinStatusLine(active=False, raw=raw)
    if args[0] in FAILED_WORDS:
        return ThinStatusLine(active=True, failed=True, raw=raw)
    if not args[0].isdigit() or len(args) < 2 or not (args[1] == "-" or args[1].isdigit()):
        raise DmStatusError(f"thin status is not '<mapped> <highest>': {raw!r}")
    return ThinStatusLine(active=True, mapped_sectors=int(args[0]),
                          highest_mapped_sector=None if args[1] == "-" else int(args[1]), raw=raw)
