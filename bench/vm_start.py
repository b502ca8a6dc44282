"""A VM's disk on the critical path: N snapshots of one image through the daemon (blockfile).

    sudo python3 -m bench.vm_start [--vms 1000] [--clients 4] [--commands 7]

Setup (untimed): a pool, one small image processed by `process-image` (three layers, an OCI
archive from file://), then `flyio-image-manager daemon` on its socket.

1. One client sends `{"op": "snapshot", "image": ..., "vm": "vm-N", "wait": true}` for
   `--vms` VMs in a row and times each request, from the request sent to the reply saying
   the snapshot is ready and recorded (`--poll` instead asks `{"op": "job"}` every 2 ms, as
   a client of a daemon without "wait" must). Median, p90, p99, the first 50's and the last
   50's medians and VMs/s.
2. `--clients` clients in parallel, `--vms` more VMs between them: VMs/s.
3. With every VM's snapshot there, the daemon stopped: `snapshots`, `fsm list`, `gc
   --dry-run` and `monitor --once`, each timed as a whole command; then a simulated reboot
   (every loop device detached, the pool unmounted) and `setup-pool`, which re-attaches the
   pool and reconciles the catalog with it (every VM's disk activated again), timed.
   The same disks bound by hand (`losetup --find --show`, one per disk), for comparison.
4. `--commands` whole `snapshot IMAGE --vm` commands and as many `delete-snapshot --vm`,
   alternating, each timed from process start to exit: medians; once with the daemon
   running (the commands hand their requests to it), once with none (they run the job).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FLYIO_BACKEND": "blockfile"}


def cli(state_dir: Path, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=3600, env=ENV)
    seconds = time.perf_counter() - started
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return seconds, done


def oci_archive(path: Path) -> Path:
    """A three-layer OCI image layout as one tar (what `docker save`/skopeo write)."""
    import hashlib

    def layer(n: int) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            body = f"layer {n}\n".encode() * 2000
            info = tarfile.TarInfo(f"srv/layer-{n}.txt")
            info.size, info.mtime = len(body), 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
        return buffer.getvalue()

    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layers = [add(layer(n)) for n in range(1, 4)]
    config = add(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [d["digest"] for d in layers]}}).encode())
    manifest = add(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {**config, "mediaType": "application/vnd.oci.image.config.v1+json"},
                               "layers": [{**d, "mediaType": "application/vnd.oci.image.layer.v1.tar"}
                                          for d in layers]}).encode())
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {**manifest, "mediaType": "application/vnd.oci.image.manifest.v1+json"}]}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index),
                           *((f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Client:
    """One connection to the daemon's socket, one JSON line each way."""

    def __init__(self, state_dir: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(state_dir / "fsm" / "manager.sock"))
        self.reader = self.sock.makefile("rb")

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        reply = json.loads(self.reader.readline())
        if not reply.get("ok"):
            raise SystemExit(f"daemon refused {message}: {reply.get('error')}")
        return reply

    def snapshot(self, image: str, vm: str, poll: bool) -> dict[str, Any]:
        if not poll:
            reply = self.ask({"op": "snapshot", "image": image, "vm": vm, "wait": True})
            if reply.get("state") != "complete":
                raise SystemExit(f"snapshot of {vm} ended {reply}")
            return reply
        request_id = self.ask({"op": "snapshot", "image": image, "vm": vm})["id"]
        while True:
            status = self.ask({"op": "job", "id": request_id})
            if status.get("final"):
                if status.get("state") != "complete":
                    raise SystemExit(f"snapshot of {vm} ended {status}")
                return status
            time.sleep(0.002)  # what a polling client does: this is the cost "wait" removes

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def figures(name: str, seconds: list[float]) -> None:
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    head, tail = ms_of(seconds[:50]), ms_of(seconds[-50:])
    print(f"{name}: {len(ms)} VMs  median {statistics.median(ms):.1f} ms  p90 {q[89]:.1f} ms  p99 {q[98]:.1f} ms  "
          f"first-50 median {head:.1f} ms  last-50 median {tail:.1f} ms  (last/first {tail / head:.2f})  "
          f"{len(ms) / sum(seconds):.1f} VMs/s")


def ms_of(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def start_daemon(state_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "--quiet", "daemon",
                               "--metrics-port", "0"], cwd=REPO, stdout=log, stderr=log, env=ENV)
    path = state_dir / "fsm" / "manager.sock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists():
            try:
                Client(state_dir).close()
                return daemon
            except OSError:
                pass
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)  # waiting for the daemon's socket to answer, with a deadline
    raise SystemExit("the daemon's socket never answered")


def commands(state_dir: Path, image: str, count: int, tag: str, where: str) -> None:
    """`count` whole `snapshot IMAGE --vm` commands and as many `delete-snapshot --vm`,
    alternating, each timed from process start to exit: medians."""
    made_s, deleted_s = [], []
    for n in range(count):
        made_s.append(cli(state_dir, "snapshot", image, "--vm", f"cmd-{tag}-{n}")[0])
        deleted_s.append(cli(state_dir, "delete-snapshot", "--vm", f"cmd-{tag}-{n}")[0])
    print(f"whole commands {where}: snapshot IMAGE --vm median {ms_of(made_s):.0f} ms, "
          f"delete-snapshot --vm median {ms_of(deleted_s):.0f} ms ({count} each)")


def bind_by_hand(pool: Any, names: set[str]) -> float:
    """What an operator's shell would do after a reboot: `losetup --find --show FILE` per VM
    disk, one after another (then unbound again). Seconds."""
    devices = [device for device in pool.list_devices() if device.active and device.name in names]
    for device in devices:
        pool.deactivate(device.device_id)
    started = time.perf_counter()
    bound = [subprocess.run(["losetup", "--find", "--show", str(pool.mount_point / f"{device.name}.img")],
                            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
             for device in devices]
    seconds = time.perf_counter() - started
    for path in bound:
        subprocess.run(["losetup", "--detach", path], capture_output=True, timeout=60, check=True)
    pool.activate_all([(device.device_id, (pool.mount_point / f"{device.name}.img").stat().st_size)
                       for device in devices])  # bound again, as the reconciliation left them
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--commands", type=int, default=7)
    parser.add_argument("--poll", action="store_true", help="poll {op: job} every 2 ms instead of wait: true")
    parser.add_argument("--pool-size", default="16G")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loop devices, mkfs, the XFS pool)")

    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    with tempfile.TemporaryDirectory(prefix="bench-vm-start-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        state_dir = work / "state"
        pool = BlockfilePool(PoolConfig(directory=str(state_dir)))
        try:
            cli(state_dir, "setup-pool", "--data-size", args.pool_size)
            _, made = cli(state_dir, "process-image", "--url", f"file://{oci_archive(work / 'image.tar')}",
                          "--device-size", "64M", "--quiet")
            image = "image.tar"
            daemon = start_daemon(state_dir, work / "daemon.log")
            try:
                client = Client(state_dir)
                one: list[float] = []
                for n in range(args.vms):
                    started = time.perf_counter()
                    client.snapshot(image, f"vm-{n}", args.poll)
                    one.append(time.perf_counter() - started)
                client.close()
                figures("one client", one)
                print("  medians per 100 VMs, in order: " + " ".join(
                    f"{ms_of(one[start:start + 100]):.1f}" for start in range(0, len(one), 100)) + " ms")

                counts = [args.vms // args.clients + (1 if i < args.vms % args.clients else 0)
                          for i in range(args.clients)]

                def worker(index: int, count: int, out: list[float]) -> None:
                    mine = Client(state_dir)
                    for n in range(count):
                        started = time.perf_counter()
                        mine.snapshot(image, f"par-{index}-{n}", args.poll)
                        out.append(time.perf_counter() - started)
                    mine.close()

                results: list[list[float]] = [[] for _ in counts]
                threads = [threading.Thread(target=worker, args=(i, c, results[i])) for i, c in enumerate(counts)]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall = time.perf_counter() - started
                every = [s for r in results for s in r]
                print(f"{args.clients} clients: {len(every)} VMs in {wall:.1f} s = {len(every) / wall:.1f} VMs/s  "
                      f"(median {ms_of(every):.1f} ms per request)")
                total = args.vms + sum(counts)
                commands(state_dir, image, args.commands, "handed", f"at {total} VMs, the daemon running "
                         "(each command hands its request to it)")
            finally:
                daemon.terminate()
                daemon.wait(timeout=300)

            print(f"with {total} VM snapshots of one image (the daemon stopped), whole commands:")
            for command in (["snapshots"], ["fsm", "list"], ["gc", "--dry-run"], ["monitor", "--once"]):
                seconds, done = cli(state_dir, *command)
                print(f"  {' '.join(command):<16} {seconds * 1000:8.0f} ms")
            seconds, done = cli(state_dir, "gc", "--dry-run")
            assert "orphaned=0" in done.stdout, done.stdout[-2000:]
            catalog = {row["device_name"] for row in json.loads(cli(state_dir, "snapshots", "--json")[1].stdout)}
            for device in pool.list_devices():  # a simulated reboot: every loop gone, the pool unmounted
                if device.active:
                    pool.deactivate(device.device_id)
            pool.teardown_pool()
            seconds, done = cli(state_dir, "setup-pool")
            active = {d.name for d in pool.list_devices() if d.active}
            reconciled = next(line for line in done.stderr.splitlines() if "catalog reconciled" in line)
            print(f"  {'reboot: setup-pool (re-attach, reconcile)':<16} {seconds * 1000:8.0f} ms, of which the "
                  f"reconciliation {reconciled.split('duration_ms=')[1].split()[0]} ms  "
                  f"({len(active & catalog)} of {len(catalog)} VM disks active again; pool and catalog agree: "
                  f"{active == catalog})")
            bound = bind_by_hand(pool, catalog)
            print(f"  {'the same disks bound by hand (losetup --find --show, one per disk)':<16} {bound * 1000:8.0f} ms")

            commands(state_dir, image, args.commands, "alone", f"at {total} VMs, no daemon (each command runs "
                     "its job itself)")
        finally:
            if pool.get_pool_status().exists:
                for device in pool.list_devices():
                    if device.active:
                        pool.deactivate(device.device_id)
                pool.teardown_pool()


if __name__ == "__main__":
    main()
