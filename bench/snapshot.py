"""Snapshot cost by origin size, and the latency of each thin-pool call, on one backend.

    sudo python3 -m bench.snapshot [--backend blockfile] [--sizes-mb 10,1024] [--repeats 7]

For each size an origin device is created, activated and filled with data (written
straight to the block device, fsynced), then deactivated; then `create_snapshot` of it
is timed `--repeats` times (each snapshot a new id, deleted afterwards). With reflink
(or dm-thin) the time and the pool space a snapshot takes must not grow with the
origin's data; with copies (`blockfile-directory` on a host without reflink) they do.
Then the median latency of create_thin, create_snapshot, activate (fresh and again),
deactivate and delete on small devices.

`--backend devicemapper` on a host without device-mapper boots a QEMU guest (tests/vm)
and runs there; use `--sizes-mb 10,200` (TCG writes slowly).

Then the cost of one whole `flyio-image-manager snapshot IMAGE --vm VM` command (process
start to exit, `--command-runs` times on a small processed image, each a new VM), and of
the pool work inside it: the Operation Guard's `snapshot` operation (create_snap,
activate, mark ready) as its `operation finished ... duration_ms` log line reports it.

Backends are entries of BACKENDS: a function from (PoolConfig) to a ThinPool; add one
there (e.g. devicemapper) and every figure is measured the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from devices.base import PoolConfig, ThinPool
from devices.blockfile import BlockfilePool

MiB = 1024**2
FILL_CHUNK = 4 * MiB
SMALL_DEVICE = 64 * MiB


def blockfile(config: PoolConfig) -> ThinPool:
    return BlockfilePool(config)


def blockfile_directory(config: PoolConfig) -> ThinPool:
    """The fallback without XFS: device files on the host filesystem (copies where it has no reflink)."""
    return BlockfilePool(config, use_xfs=False)


def devicemapper(config: PoolConfig) -> ThinPool:
    """dm-thin; on a host without device-mapper, main() re-runs the benchmark in a QEMU guest."""
    from devices.devicemapper import DevicemapperPool

    return DevicemapperPool(config)


BACKENDS: dict[str, Callable[[PoolConfig], ThinPool]] = {
    "blockfile": blockfile,
    "blockfile-directory": blockfile_directory,
    "devicemapper": devicemapper,
}


def run_in_vm(argv: list[str], timeout: float = 3600) -> None:
    """This benchmark with `argv`, inside a dm-thin guest (tests/vm); pool files on a share.
    TCG emulation: compare shapes (growth with size), not absolute milliseconds."""
    from tests.vm import run_in_guest

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-vm-", dir="/var/tmp") as share:
        result = run_in_guest([sys.executable, "-m", "bench.snapshot", *argv, "--work-dir", share],
                              share_dir=share, timeout=timeout, cwd=str(repo), root_cache="loose")
    print(result.command_output.strip())
    if result.returncode != 0:
        raise SystemExit(f"benchmark in the guest failed (returncode {result.returncode}, timed out: {result.timed_out})")


@contextmanager
def open_pool(backend: str, directory: Path, pool_bytes: int) -> Iterator[ThinPool]:
    """A fresh pool of `backend` in `directory`, torn down afterwards (files are left to the caller)."""
    pool = BACKENDS[backend](PoolConfig(directory=str(directory), data_size_bytes=pool_bytes))
    pool.ensure_pool_exists()
    try:
        yield pool
    finally:
        for device in pool.list_devices():
            if device.active:
                pool.deactivate(device.device_id)
        teardown = getattr(pool, "teardown_pool", None)
        if teardown is not None:
            teardown()


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def fill(device: str, size: int) -> None:
    """Write `size` bytes of incompressible data to the block device, then fsync it."""
    chunk = os.urandom(FILL_CHUNK)
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        written = 0
        while written < size:
            written += os.write(fd, chunk[: min(FILL_CHUNK, size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)


def used_bytes(pool: ThinPool) -> int:
    status = pool.get_pool_status()
    return status.used_data_blocks * status.data_block_bytes


def snapshot_cost(pool: ThinPool, origin_id: int, size: int, repeats: int, next_id: Iterator[int]) -> tuple[float, int]:
    """(median seconds, median pool bytes) of a snapshot of a device holding `size` bytes of data."""
    pool.create_thin(origin_id, size)
    fill(pool.activate(origin_id, size), size)
    pool.deactivate(origin_id)
    seconds, grown, made = [], [], []
    for _ in range(repeats):
        snapshot_id = next(next_id)
        before = used_bytes(pool)
        seconds.append(timed(lambda: pool.create_snapshot(snapshot_id, origin_id)))
        grown.append(used_bytes(pool) - before)
        made.append(snapshot_id)
    for snapshot_id in made:
        pool.delete(snapshot_id)
    pool.delete(origin_id)
    return statistics.median(seconds), int(statistics.median(grown))


def call_latencies(pool: ThinPool, repeats: int, next_id: Iterator[int]) -> dict[str, float]:
    """Median seconds of each pool call on small, empty devices."""
    samples: dict[str, list[float]] = {name: [] for name in
                                        ("create_thin", "create_snapshot", "activate", "activate (again)",
                                         "deactivate", "delete")}
    for _ in range(repeats):
        origin, snapshot = next(next_id), next(next_id)
        samples["create_thin"].append(timed(lambda: pool.create_thin(origin, SMALL_DEVICE)))
        samples["create_snapshot"].append(timed(lambda: pool.create_snapshot(snapshot, origin)))
        samples["activate"].append(timed(lambda: pool.activate(snapshot, SMALL_DEVICE)))
        samples["activate (again)"].append(timed(lambda: pool.activate(snapshot, SMALL_DEVICE)))
        samples["deactivate"].append(timed(lambda: pool.deactivate(snapshot)))
        samples["delete"].append(timed(lambda: pool.delete(snapshot)))
        pool.delete(origin)
    return {name: statistics.median(values) for name, values in samples.items()}


def command_cost(backend: str, work: Path, runs: int) -> dict[str, float]:
    """Median ms of a whole `snapshot` command, of the Operation Guard's snapshot operation
    inside it, and of the job's transitions (JSON log lines), over `runs` new VMs."""
    repo = Path(__file__).resolve().parents[1]
    layer = work / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        for n in range(20):
            body = os.urandom(16 * 1024)
            info = tarfile.TarInfo(f"srv/file-{n}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    state = work / "command-state"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state), "--log-format", "json", *args],
                              cwd=repo, capture_output=True, text=True, timeout=900, check=True)

    cli("process-image", "--url", f"file://{layer}", "--backend", backend, "--device-size", "64M")
    figures: dict[str, list[float]] = {"command": [], "pool work (guarded snapshot)": [], "job transitions": []}
    try:
        for n in range(runs):
            started = time.perf_counter()
            done = cli("snapshot", "layer.tar", "--vm", f"bench-{n}", "--backend", backend)
            figures["command"].append((time.perf_counter() - started) * 1000)
            events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
            figures["pool work (guarded snapshot)"].extend(
                e["duration_ms"] for e in events if e.get("msg") == "operation finished" and e.get("operation") == "snapshot")
            figures["job transitions"].append(sum(e["duration_ms"] for e in events if e.get("msg") == "transition"))
    finally:
        with open_pool(backend, state, 2 * 1024**3):
            pass  # deactivates every device and detaches the pool's loop devices
    return {name: statistics.median(values) for name, values in figures.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="blockfile")
    parser.add_argument("--sizes-mb", default="10,1024", help="origin sizes (all filled with data)")
    parser.add_argument("--repeats", type=int, default=7, help="samples per figure (the median is printed)")
    parser.add_argument("--work-dir", default=None, help="where the pool files go (default: a new temp dir)")
    parser.add_argument("--command-runs", type=int, default=5, help="whole `snapshot` commands to time (0: none)")
    args = parser.parse_args()
    if args.backend == "devicemapper" and not Path("/dev/mapper/control").exists():
        run_in_vm(sys.argv[1:])
        return
    sizes = [int(float(s) * MiB) for s in args.sizes_mb.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    # Room for the largest origin twice over (a copying backend duplicates it) plus the 10% floor.
    pool_bytes = max(2 * 1024**3, 3 * max(sizes))
    ids = iter(range(1, 2**24))
    print(f"backend={args.backend} pool={pool_bytes // MiB} MiB at {work} repeats={args.repeats}")
    with open_pool(args.backend, work / "state", pool_bytes) as pool:
        print(pool.get_pool_status().raw)
        print(f"{'origin data':>12} {'snapshot ms':>12} {'pool growth':>12}")
        for size in sizes:
            seconds, grown = snapshot_cost(pool, next(ids), size, args.repeats, ids)
            print(f"{size / MiB:>8.0f} MiB {seconds * 1000:>12.2f} {grown / MiB:>8.2f} MiB")
        print(f"{'call':>18} {'median ms':>10}")
        for name, seconds in call_latencies(pool, args.repeats, ids).items():
            print(f"{name:>18} {seconds * 1000:>10.2f}")
    if args.command_runs:
        print(f"one `snapshot` command, median of {args.command_runs} (ms)")
        for name, ms in command_cost(args.backend, work, args.command_runs).items():
            print(f"{name:>30} {ms:>10.1f}")


if __name__ == "__main__":
    main()
