"""A fuzz campaign against the tar decoder and the unpacker, grown from a seed corpus.

    sudo nice -n 10 .venv/bin/python -m bench.fuzz_tar [--inputs 1000000] [--seed 1]
                                                       [--time-limit 2] [--report-every 100000]

Seeds: every layer of tests/hostile_tars.py and tests/format_tars.py (and the lower layers
of the hostile cases). Each input is a seed (sometimes two spliced) with 1 to 4 mutations:
bit flips, interesting bytes, a header field rewritten (octal, base-256 positive or
negative, blanks, garbage; the checksum recomputed nine times in ten, so the input goes
past the checksum), a pax record's length, key or value changed, blocks duplicated,
dropped or inserted (zeros, a header of another seed), truncation (anywhere, or at a
block boundary).

Each input goes through what production does with a blob: the download-time check
(images/verify.py's BlobCheck, fed in random pieces); if it passes, the unpacker applies it
onto an empty root in a sandbox beside a canary directory. Counted:

* exceptions: anything but the PermanentErrors the check and the unpacker raise for a
  refused input (an uncaught exception is a bug);
* hangs: an input whose check or unpack takes longer than --time-limit seconds (SIGALRM);
* escapes: the canary changed, or anything appeared in the sandbox beside the root or at
  the probe paths in /, /etc, /tmp;
* mismatches: the unpacker met a structural error ("truncated or corrupt tar: ...") in an
  input the check let through (the check and the unpacker read it differently).

Prints the totals (and the first few examples of each kind); exit status 1 if any count
but `refused_by_check`/`refused_by_unpacker`/`applied` is not zero.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from images.formats import DEFAULT_LIMITS
from images.tardecoder import BLOCK, checksum_ok
from images.unpack import UnpackLimits, unpack_layer
from images.verify import BlobCheck
from support.errors import PermanentError

PROBE_NAME = "flyio-hostile-probe"
PROBES = (Path("/etc") / PROBE_NAME, Path("/tmp") / PROBE_NAME, Path("/") / PROBE_NAME)
MAX_SEED_BYTES = 256 << 10
INTERESTING = (0, 0x20, 0x2F, 0x30, 0x37, 0x38, 0x0A, 0x3D, 0x80, 0xFF, 0x7F, 0x2E)
# Header fields: (offset, length)
FIELDS = ((0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1), (157, 100),
          (257, 8), (329, 8), (337, 8), (345, 155), (386, 96), (482, 1), (483, 12))
TYPES = b"0\x001234567xXgLKSVDMN"
# Small enough that a mutated size cannot make an input write much; the check and the
# unpacker use the same bounds production derives from these.
LIMITS = DEFAULT_LIMITS.__class__(max_uncompressed_bytes=64 << 20, max_entry_bytes=16 << 20,
                                  max_entries=20_000, ratio_grace_bytes=64 << 20)


class Hang(Exception):
    """An input ran past the time limit."""


@dataclass
class Report:
    inputs: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(detail)

    @property
    def failures(self) -> int:
        return sum(self.counts[kind] for kind in ("exceptions", "hangs", "escapes", "mismatches"))

    def lines(self) -> list[str]:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        out = [f"inputs {self.inputs}  ({self.seconds:.0f} s, {rate:.0f}/s)"]
        for kind in ("applied", "refused_by_check", "refused_by_unpacker", "exceptions", "hangs", "escapes",
                     "mismatches"):
            out.append(f"  {kind:20} {self.counts[kind]}")
        for kind, examples in self.examples.items():
            if kind in ("exceptions", "hangs", "escapes", "mismatches"):
                out.extend(f"  {kind}: {example}" for example in examples)
        return out


# --- the seed corpus and the mutations --------------------------------------------------

def seed_corpus() -> list[bytes]:
    """Every layer the corpora build (a case's lower layer too), cut to MAX_SEED_BYTES."""
    from tests.format_tars import FORMAT_CASES
    from tests.hostile_tars import HOSTILE_CASES

    seeds = []
    for case in HOSTILE_CASES:
        seeds.append(case.build())
        if case.lower:
            seeds.append(case.lower())
    seeds.extend(case.build() for case in FORMAT_CASES)
    return [seed[:MAX_SEED_BYTES] for seed in seeds if seed]


def _header_offsets(data: bytes | bytearray) -> list[int]:
    return [at for at in range(0, min(len(data), MAX_SEED_BYTES) - BLOCK + 1, BLOCK)
            if data[at + 148: at + 149] != b"\0" and checksum_ok(bytes(data[at: at + BLOCK]))]


def _rechecksum(data: bytearray, at: int) -> None:
    data[at + 148: at + 156] = b" " * 8
    data[at + 148: at + 156] = b"%06o\0 " % sum(data[at: at + BLOCK])


def _field_value(rng: random.Random, length: int) -> bytes:
    pick = rng.randrange(9)
    if pick == 0:
        return b"%0*o\0" % (length - 1, rng.randrange(8 ** min(length - 1, 11)))
    if pick == 1:
        return b"\x80" + rng.randrange(256 ** (length - 1)).to_bytes(length - 1, "big")
    if pick == 2:
        return b"\xff" + rng.randrange(256 ** (length - 1)).to_bytes(length - 1, "big")
    if pick == 3:
        return b" " * length
    if pick == 4:
        return bytes(length)
    if pick == 5:
        return rng.choice((b"../", b"/", b"a/", b".wh.", b"./", b"x\0y")) * (length // 3)
    if pick == 6:
        return b"%o" % rng.randrange(1 << 40) + rng.choice((b"x", b" ", b"\0", b"-"))
    if pick == 7:
        return bytes([rng.choice(TYPES)]) * min(length, 1) + rng.randbytes(length - 1)
    return rng.randbytes(length)


def _mutate_header(rng: random.Random, data: bytearray) -> None:
    headers = _header_offsets(data)
    if not headers:
        return
    at = rng.choice(headers)
    offset, length = rng.choice(FIELDS)
    value = _field_value(rng, length)[:length]
    data[at + offset: at + offset + len(value)] = value
    if rng.random() < 0.9:
        _rechecksum(data, at)


def _mutate_pax(rng: random.Random, data: bytearray) -> None:
    at = data.find(b"=", rng.randrange(len(data)) if data else 0)
    if at < 0:
        at = data.find(b"=")
    if at < 0:
        return
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    end = len(data) if end < 0 else end
    pick = rng.randrange(5)
    if pick == 0:  # the length
        space = data.find(b" ", start, at)
        if space > start:
            data[start:space] = str(max(0, int(data[start:space] or b"0") + rng.randint(-3, 3))
                                    if data[start:space].isdigit() else rng.randrange(100)).encode()
    elif pick == 1:  # the value
        data[at + 1: end] = rng.choice((b"", b"nan", b"-1", b"1e9", b"99999999999999999999999", b"12x",
                                        b"1600000000.5abc", b"../../../x", b"0,1,2", b"\xff\x00", b"1,2,3,4",
                                        b"9" * 5000, b"1," * 3000 + b"1", b"0.000000000001"))
    elif pick == 2:  # the key
        data[start: at] = data[start: at].split(b" ")[0] + b" " + rng.choice(
            (b"path", b"linkpath", b"size", b"uid", b"mtime", b"GNU.sparse.map", b"GNU.sparse.major",
             b"GNU.sparse.realsize", b"GNU.sparse.name", b"GNU.sparse.offset", b"SCHILY.xattr.user.x", b""))
    elif pick == 3:
        del data[end: end + 1]
    else:
        data[at: at + 1] = b""
    # pax headers precede their member: fix the checksum of the header before, sometimes
    header = start // BLOCK * BLOCK - BLOCK
    if header >= 0 and rng.random() < 0.5:
        _rechecksum(data, header)


def _mutate_blocks(rng: random.Random, data: bytearray, other: bytes) -> None:
    if len(data) < BLOCK:
        return
    at = rng.randrange(len(data) // BLOCK) * BLOCK
    pick = rng.randrange(4)
    if pick == 0:
        data[at:at] = data[at: at + BLOCK]
    elif pick == 1:
        del data[at: at + BLOCK]
    elif pick == 2:
        data[at:at] = bytes(BLOCK)
    else:
        headers = _header_offsets(other)
        if headers:
            source = rng.choice(headers)
            data[at:at] = other[source: source + BLOCK]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    if rng.random() < 0.1:  # splice: the head of one, the tail of another
        other = rng.choice(seeds)
        data = data[: rng.randrange(len(data) + 1) // BLOCK * BLOCK] + other[rng.randrange(len(other) + 1) // BLOCK
                                                                             * BLOCK:]
    for _ in range(rng.randint(1, 4)):
        pick = rng.random()
        if pick < 0.35:
            _mutate_header(rng, data)
        elif pick < 0.5:
            _mutate_pax(rng, data)
        elif pick < 0.6:
            _mutate_blocks(rng, data, rng.choice(seeds))
        elif pick < 0.7 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif pick < 0.8 and data:
            data[rng.randrange(len(data))] = rng.choice(INTERESTING)
        elif pick < 0.9 and data:
            del data[rng.randrange(len(data)):]
        elif data:
            del data[rng.randrange(len(data) // BLOCK + 1) * BLOCK:]
    return bytes(data)


# --- running one input ----------------------------------------------------------------------

def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def _pieces(rng: random.Random, data: bytes) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        step = rng.choice((1, 100, 512, 4096, 65536, 1 << 20))
        yield data[at: at + step]
        at += step


class Sandbox:
    """`<dir>/root` (made empty for each input) beside `<dir>/outside/secret`, a canary."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        (base / "outside").mkdir()
        self.canary = base / "outside" / "secret"
        self.canary.write_bytes(b"canary\n")
        self._expected = self._state()

    def _state(self) -> tuple[object, ...]:
        outside = sorted((p.name, p.lstat().st_mode, p.lstat().st_size) for p in (self.base / "outside").iterdir())
        beside = sorted(name for name in os.listdir(self.base) if name != "root")
        return (beside, outside, hashlib.sha256(self.canary.read_bytes()).hexdigest(),
                [os.path.lexists(probe) for probe in PROBES])

    def reset(self) -> None:
        if os.path.lexists(self.root):
            shutil.rmtree(self.root)
        self.root.mkdir()

    def escaped(self) -> bool:
        return self._state() != self._expected


def run_one(data: bytes, rng: random.Random, sandbox: Sandbox, report: Report, time_limit: float) -> None:
    report.inputs += 1
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    stage = "check"
    try:
        check = BlobCheck(len(data), LIMITS)
        try:
            for piece in _pieces(rng, data):
                check.feed(piece)
            check.finish()
        except PermanentError:
            report.counts["refused_by_check"] += 1
            return
        stage = "unpack"
        sandbox.reset()
        try:
            unpack_layer(io.BytesIO(data), sandbox.root, limits=UnpackLimits.from_format_limits(LIMITS))
            report.counts["applied"] += 1
        except PermanentError as exc:
            if str(exc).startswith("truncated or corrupt tar"):
                report.note("mismatches", f"{exc} (input sha256 {hashlib.sha256(data).hexdigest()[:16]})")
            else:
                report.counts["refused_by_unpacker"] += 1
    except Hang:
        report.note("hangs", f"{stage}: input sha256 {hashlib.sha256(data).hexdigest()[:16]}, {len(data)} bytes")
    except Exception as exc:  # noqa: BLE001 - counting what nothing should raise is the point
        where = traceback.extract_tb(exc.__traceback__)[-1]
        report.note("exceptions", f"{stage}: {type(exc).__name__}: {exc} at {where.filename}:{where.lineno}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if stage == "unpack" and sandbox.escaped():
        report.note("escapes", f"input sha256 {hashlib.sha256(data).hexdigest()[:16]}")
        raise SystemExit("a write outside the root: stopping (inspect the sandbox)")


def campaign(inputs: int, seed: int = 1, time_limit: float = 2.0, report_every: int = 0,
             workdir: Path | None = None) -> Report:
    """Run `inputs` mutated inputs; the Report of what happened."""
    rng = random.Random(seed)
    seeds = seed_corpus()
    logging.disable(logging.WARNING)  # "entry skipped" and the like, a million times over
    report = Report()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    base = Path(tempfile.mkdtemp(prefix="fuzz-tar-", dir=workdir or _fast_dir()))
    started = time.monotonic()
    try:
        sandbox = Sandbox(base)
        for i in range(inputs):
            run_one(mutate(rng, seeds), rng, sandbox, report, time_limit)
            if report_every and (i + 1) % report_every == 0:
                report.seconds = time.monotonic() - started
                print("\n".join(report.lines()), flush=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
        report.seconds = time.monotonic() - started
        shutil.rmtree(base, ignore_errors=True)
        logging.disable(logging.NOTSET)
    return report


def _fast_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_tar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds per input")
    parser.add_argument("--report-every", type=int, default=100_000)
    args = parser.parse_args(argv)
    report = campaign(args.inputs, args.seed, args.time_limit, args.report_every)
    print("final:")
    print("\n".join(report.lines()))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
