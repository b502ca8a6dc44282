"""Unpacking speed of images/unpack.py against GNU tar, and its peak memory by layer size.

    sudo .venv/bin/python -m bench.unpack [--size-mb 200] [--file-kb 60] [--tar PATH] [--target ext4]
                                          [--rounds 5] [--rss-sizes-mb 50,500]

One layer (generated: a realistic mix of many small files, some medium and a few large
ones, directories, symlinks and hardlinks; with `--file-kb N` instead files of about N KB
of random, incompressible bytes; or `--tar PATH`) is unpacked by unpack_layer and by
`tar -xf X -C DIR --numeric-owner -p --xattrs` into fresh directories on the same
filesystem (the work directory's, or with `--target ext4` a loop-mounted ext4 image), in
this one run, alternately, `--rounds` times each. Printed: MB/s of each (median), the
ratio ours / GNU tar of throughput without and with write-back (`sync` after the unpack,
inside the timing), then for each of `--rss-sizes-mb` the peak RSS (VmHWM) of a child
process that unpacks a generated layer of that size (same generator), and that peak
minus a child that only imports the unpacker. No assertions: figures only.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from devices.loop import attach, detach
from devices.mount import mount, unmount
from support.proc import run_command

REPO = Path(__file__).resolve().parents[1]

# The size mix of a Debian-like root: most files are small, most bytes are in few files.
SMALL = (128, 16 << 10)  # 80% of files
MEDIUM = (16 << 10, 512 << 10)  # 19.5%
LARGE = (1 << 20, 16 << 20)  # 0.5%: about 50 KB a file on average, as in real roots
FILES_PER_DIR = 40


def _size(rng: random.Random) -> int:
    pick = rng.random()
    low, high = SMALL if pick < 0.80 else MEDIUM if pick < 0.995 else LARGE
    return int(low * (high / low) ** rng.random())  # log-uniform within the band


def generate_layer(path: Path, size_mb: float, seed: int = 1, file_kb: float | None = None) -> Path:
    """Write a deterministic layer of about `size_mb` MB of file content to `path`: the mix
    of sizes below, or with `file_kb` files of 0.5x to 1.5x that many KB of random bytes."""
    if file_kb is not None:
        return _uniform_layer(path, size_mb, file_kb, seed)
    rng = random.Random(seed)
    budget = int(size_mb * 1e6)
    block = rng.randbytes(1 << 20) + bytes(1 << 19)  # half random, some zeros: like binaries
    written, index = 0, 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            info.mtime = 1_700_000_000
            tar.addfile(info, None if data is None else _Reader(data, info.size))

        dirs: list[str] = []
        for top in ("usr", "usr/lib", "usr/share", "usr/bin", "etc", "var/lib"):
            for part in _prefixes(top):
                if part not in dirs:
                    dirs.append(part)
                    add(_info(part, tarfile.DIRTYPE, 0o755))
        while written < budget:
            # files come grouped by directory, as a walk of a real tree writes them
            package = index // FILES_PER_DIR
            parent = f"{('usr/lib', 'usr/share', 'etc', 'var/lib')[package % 4]}/pkg{package}"
            if parent not in dirs:
                dirs.append(parent)
                add(_info(parent, tarfile.DIRTYPE, 0o755))
            name = f"{parent}/f{index}"
            size = min(_size(rng), budget - written + 256)
            info = _info(name, tarfile.REGTYPE, 0o755 if index % 10 == 0 else 0o644)
            info.size = size
            add(info, block)
            written += size
            if index % 25 == 0:
                link = _info(f"usr/bin/l{index}", tarfile.SYMTYPE, 0o777)
                link.linkname = f"/{name}"
                add(link)
            if index % 97 == 0:
                hard = _info(f"{name}.hard", tarfile.LNKTYPE, 0o644)
                hard.linkname = name
                add(hard)
            index += 1
    return path


def _uniform_layer(path: Path, size_mb: float, file_kb: float, seed: int) -> Path:
    """Files of about `file_kb` KB, incompressible (slices of 16 MiB of random bytes), grouped
    by directory, as `generate_layer` without links: the kind of layer issue 13 measures."""
    rng = random.Random(seed)
    block = rng.randbytes(16 << 20)
    budget, written, index = int(size_mb * 1e6), 0, 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            info.mtime = 1_700_000_000
            tar.addfile(info, None if data is None else _Reader(data, info.size))

        for top in ("usr", "usr/lib"):
            add(_info(top, tarfile.DIRTYPE, 0o755))
        while written < budget:
            if index % FILES_PER_DIR == 0:
                add(_info(f"usr/lib/pkg{index // FILES_PER_DIR}", tarfile.DIRTYPE, 0o755))
            info = _info(f"usr/lib/pkg{index // FILES_PER_DIR}/f{index}", tarfile.REGTYPE, 0o644)
            info.size = min(int(file_kb * 1000 * (0.5 + rng.random())), budget - written + 256)
            add(info, block)
            written += info.size
            index += 1
    return path


class _Reader:
    """File content for tarfile: `size` bytes cycled from one pre-made block (fast)."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block, self.left, self.offset = block, size, (size * 7919) % len(block)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.block) - self.offset)
            out += self.block[self.offset:self.offset + take]
            self.offset = (self.offset + take) % len(self.block)
        self.left -= n
        return bytes(out)


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    return info


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def content_mb(tar_path: Path) -> float:
    """MB of regular-file content in the tar (what both unpackers write)."""
    with tarfile.open(tar_path, "r|") as tar:
        return sum(m.size for m in tar if m.isreg()) / 1e6


# --- the two unpackers --------------------------------------------------------------------

def ours(tar_path: Path, target: Path) -> None:
    from images.unpack import unpack_layer

    with tar_path.open("rb") as stream:
        unpack_layer(stream, target)


def gnu_tar(tar_path: Path, target: Path) -> None:
    run_command(["tar", "-xf", str(tar_path), "-C", str(target), "--numeric-owner", "-p", "--xattrs"], timeout=3600)


def timed(unpack: Callable[[Path, Path], None], tar_path: Path, target: Path) -> tuple[float, float]:
    """(seconds to extract, seconds to extract and sync) into a fresh `target`."""
    target.mkdir(parents=True)
    os.sync()  # start from clean page cache writeback, for both
    started = time.perf_counter()
    unpack(tar_path, target)
    extracted = time.perf_counter() - started
    os.sync()
    return extracted, time.perf_counter() - started


def compare(tar_path: Path, where: Path, rounds: int) -> None:
    import images.unpack  # noqa: F401  (imported before the clock starts: what is timed is the unpack, not the import)

    mb = content_mb(tar_path)
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "gnu tar": []}
    order: tuple[tuple[str, Callable[[Path, Path], None]], ...] = (("ours", ours), ("gnu tar", gnu_tar))
    for round_ in range(rounds):
        for label, unpack in order if round_ % 2 == 0 else order[::-1]:  # neither always goes first
            target = where / f"{label.replace(' ', '-')}-{round_}"
            results[label].append(timed(unpack, tar_path, target))
            run_command(["rm", "-rf", str(target)], timeout=600)
    print(f"layer {tar_path.name}: {mb:.1f} MB of file content, unpacked into {where} ({rounds} rounds, median)")
    print(f"{'':>8} {'extract s':>10} {'MB/s':>8} {'+sync s':>9} {'MB/s':>8}")
    medians = {}
    for label, runs in results.items():
        extract = statistics.median(r[0] for r in runs)
        synced = statistics.median(r[1] for r in runs)
        medians[label] = (extract, synced)
        print(f"{label:>8} {extract:>10.2f} {mb / extract:>8.1f} {synced:>9.2f} {mb / synced:>8.1f}")
    (ours_x, ours_s), (gnu_x, gnu_s) = medians["ours"], medians["gnu tar"]
    print(f"ratio ours / gnu tar (throughput): extract {gnu_x / ours_x:.2f}, with sync {gnu_s / ours_s:.2f}")
    print(f"ratio per round (extract / with sync): "
          + ", ".join(f"{g[0] / o[0]:.2f}/{g[1] / o[1]:.2f}" for o, g in zip(results["ours"], results["gnu tar"])))


# --- peak memory -------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from images.unpack import unpack_layer
entries = 0
if sys.argv[1] != "-":
    with open(sys.argv[1], "rb") as stream:
        entries = unpack_layer(stream, Path(sys.argv[2])).entries
status = Path("/proc/self/status").read_text()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), entries)
"""


def peak_rss(tar_path: Path | None, target: Path) -> tuple[int, int]:
    """(VmHWM in KiB, entries) of a fresh Python process that unpacks `tar_path` (None: that
    only imports the unpacker: the interpreter's own peak)."""
    target.mkdir(parents=True)
    result = run_command([sys.executable, "-c", CHILD, str(tar_path or "-"), str(target)], timeout=3600)
    run_command(["rm", "-rf", str(target)], timeout=600)
    kib, entries = result.stdout.split()
    return int(kib), int(entries)


# --- where to unpack ------------------------------------------------------------------------

def ext4_target(stack: ExitStack, work: Path, size_mb: float) -> Path:
    """A loop-mounted ext4 image big enough for one unpack at a time; cleaned up by `stack`."""
    image = work / "ext4.img"
    with image.open("wb") as fh:
        fh.truncate(int(max(512, size_mb * 3)) << 20)
    stack.callback(image.unlink)
    device = attach(image)
    stack.callback(detach, device)
    run_command(["mkfs.ext4", "-q", "-F", device], timeout=600)
    mount_point = work / "ext4"
    mount_point.mkdir()
    mount(device, mount_point)
    stack.callback(unmount, mount_point)
    return mount_point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="size of the generated layer")
    parser.add_argument("--file-kb", type=float, help="generate files of about this many KB (random bytes) "
                                                     "instead of the mix of sizes")
    parser.add_argument("--tar", type=Path, help="unpack this tar instead of a generated one")
    parser.add_argument("--target", choices=("same", "ext4"), default="same",
                        help="same: the work directory's filesystem; ext4: a loop-mounted ext4 image (root)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-sizes-mb", default="50,200", help="layer sizes for the peak-RSS child runs")
    parser.add_argument("--work-dir", type=Path, help="where to put layers and unpacks (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-unpack-", dir=args.work_dir))
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}, python {sys.version.split()[0]}")
    try:
        tar_path = args.tar or generate_layer(work / f"layer-{args.size_mb:g}.tar", args.size_mb,
                                              file_kb=args.file_kb)
        with ExitStack() as stack:
            where = ext4_target(stack, work, content_mb(tar_path)) if args.target == "ext4" else work / "out"
            compare(tar_path, where, args.rounds)
        base, _ = peak_rss(None, work / "rss-base")
        above = []
        print(f"{'layer MB':>9} {'entries':>8} {'peak RSS MB (VmHWM)':>20}")
        for size in [float(s) for s in args.rss_sizes_mb.split(",")]:
            layer = generate_layer(work / f"rss-{size:g}.tar", size, file_kb=args.file_kb)
            kib, entries = peak_rss(layer, work / f"rss-{size:g}")
            print(f"{content_mb(layer):>9.1f} {entries:>8} {kib / 1024:>20.1f}")
            above.append(f"+{(kib - base) / 1024:.1f} MB ({size:g} MB layer)")
            layer.unlink()
        print(f"peak RSS above the interpreter ({base / 1024:.1f} MB with the unpacker imported): {', '.join(above)}")
    finally:
        run_command(["rm", "-rf", str(work)], timeout=600)


if __name__ == "__main__":
    main()
