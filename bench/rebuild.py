"""rebuild-db at 1,000 devices, and what a device's record costs (blockfile, real pool).

    sudo python3 -m bench.rebuild [--devices 1000] [--runs 3] [--cycles 200]

Setup: one image (one layer, file://, 64M devices) through process-image, then VM
snapshots of it through the device ledger (create_snap, mark ready, activate: VMs running
on them) until the pool holds `--devices` devices. Then, `--runs` times: images.db deleted
and `flyio-image-manager rebuild-db` run as an operator would (whole command, process start
to exit); its median, and what it rebuilt.

The record's cost: `--cycles` snapshot cycles (create_vm_snapshot + mark_ready + delete
through the ledger, no activation), alternating one with the records beside the pool and
one with a store whose writes do nothing; the median cycle of each and their difference
(each cycle writes three records: creating, ready, deleting, and removes one).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from catalog.device_records import DeviceRecord, RecordStore

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2


class NoRecords(RecordStore):
    """A record store that keeps nothing: the ledger's cost without records."""

    def write_device(self, record: DeviceRecord) -> None:
        pass

    def remove_device(self, device_id: int) -> None:
        pass

    def has_device(self, device_id: int) -> bool:
        return False


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "--quiet", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "FLYIO_BACKEND": "blockfile"})
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {done.stderr[-2000:]}")
    return done


def layer(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        body = b"bench\n" * 1000
        info = tarfile.TarInfo("srv/bench.txt")
        info.size, info.mtime = len(body), 1_700_000_000
        tar.addfile(info, io.BytesIO(body))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mkfs, the XFS pool)")

    from catalog.ledger import DeviceLedger, engine_transactions
    from cli.app import open_store
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool
    from states.snapshotting import origin_device

    with tempfile.TemporaryDirectory(prefix="bench-rebuild-", dir="/var/tmp") as scratch:
        state_dir = Path(scratch) / "state"
        pool = BlockfilePool(PoolConfig(directory=str(state_dir), data_size_bytes=4 * 1024**3))
        try:
            cli(state_dir, "setup-pool", "--data-size", "4G")
            cli(state_dir, "process-image", "--url", f"file://{layer(Path(scratch) / 'bench.tar')}",
                "--device-size", "64M")
            store = open_store(state_dir)
            ledger = DeviceLedger(pool, engine_transactions(store.engine))
            with store.transaction() as session:
                origin = origin_device(session, 1)

            # -- the record's cost per device operation --------------------------------------
            plain = DeviceLedger(pool, engine_transactions(store.engine), NoRecords(state_dir))
            timings: dict[str, list[float]] = {"with records": [], "without records": []}
            for cycle in range(args.cycles):
                for name, which in (("with records", ledger), ("without records", plain))[::1 if cycle % 2 else -1]:
                    started = time.perf_counter()
                    made = which.create_vm_snapshot(image_id=1, origin=origin, vm_id=f"cost-{cycle}-{name[:4]}",
                                                    size_bytes=origin.size_bytes, job_id=1)
                    which.mark_ready(made.device_id)
                    which.delete(made.device_id, why="bench")
                    timings[name].append(time.perf_counter() - started)

            # -- 1,000 devices, VMs running on them -------------------------------------------
            started = time.monotonic()
            while len(pool.list_devices()) < args.devices:
                for _ in range(min(100, args.devices - len(pool.list_devices()))):
                    vm = f"vm-{time.monotonic_ns()}"
                    made = ledger.create_vm_snapshot(image_id=1, origin=origin, vm_id=vm,
                                                     size_bytes=origin.size_bytes, job_id=1)
                    ledger.mark_ready(made.device_id)
                    ledger.activate(made.device_id)
            setup_seconds = time.monotonic() - started
            store.engine.dispose()
            devices = len(pool.list_devices())

            seconds: list[float] = []
            last = ""
            for _ in range(args.runs):
                for suffix in ("", "-wal", "-shm"):
                    (state_dir / f"images.db{suffix}").unlink(missing_ok=True)
                started = time.perf_counter()
                last = cli(state_dir, "rebuild-db").stdout
                seconds.append(time.perf_counter() - started)
            listed = cli(state_dir, "snapshots").stdout.count("\n") - 1
        finally:
            for device in pool.list_devices() if pool.get_pool_status().exists else []:
                if device.active:
                    pool.deactivate(device.device_id)
            pool.teardown_pool()

    with_records = statistics.median(timings["with records"]) * 1000
    without = statistics.median(timings["without records"]) * 1000
    print(f"record cost per snapshot cycle (create_vm_snapshot + mark_ready + delete, {args.cycles} each, alternating):")
    print(f"  with records     {with_records:8.2f} ms")
    print(f"  without records  {without:8.2f} ms")
    print(f"  difference       {with_records - without:8.2f} ms per cycle ({(with_records - without) / 3:.2f} ms per "
          f"record write)")
    print(f"rebuild-db of {devices} devices ({listed} snapshots listed after; setup {setup_seconds:.0f} s):")
    print(f"  median {statistics.median(seconds):.2f} s of {args.runs} runs "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f})")
    for line in last.strip().splitlines()[:2]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
