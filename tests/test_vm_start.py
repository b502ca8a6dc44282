"""A VM gets its disk at the same cost at the thousandth VM as at the first (issue 19), on
real parts: blockfile pool (XFS on a loop device, real loop devices), SQLite, the real
daemon on its socket. No timing is judged here (bench/vm_start.py measures): what is
checked is what makes the cost flat, and that the results are right."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.vm_start import oci_archive
from tests.test_gc import teardown

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
IMAGE = "image.tar"


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "FLYIO_BACKEND": "blockfile"})
    assert done.returncode == 0, (args, done.stderr[-3000:])
    return done


@pytest.fixture
def image_state(tmp_path: Path) -> Iterator[Path]:
    """A state dir with a pool and one processed three-layer image."""
    state_dir = tmp_path / "state"
    try:
        cli(state_dir, "setup-pool", "--data-size", "4G")
        cli(state_dir, "process-image", "--url", f"file://{oci_archive(tmp_path / IMAGE)}", "--device-size", "64M")
        yield state_dir
    finally:
        teardown(state_dir)


class Snapshots:
    """VM snapshots made in this process, as the daemon makes them (one runner, one set of services)."""

    def __init__(self, state_dir: Path) -> None:
        from cli.app import open_store
        from states.registry import open_environment

        self.store = open_store(state_dir)
        self.environment = open_environment(state_dir, self.store, backend="blockfile")
        self.made = 0

    def make(self, vm: str) -> Any:
        from states.vm_snapshot import process_snapshot_request, resolve_snapshot_request

        with self.store.transaction() as session:
            request = resolve_snapshot_request(session, IMAGE, vm, None)
        job = process_snapshot_request(self.environment.runner, request, self.environment.services)
        assert job.state == "complete", job.error
        self.made += 1
        return job

    def up_to(self, count: int) -> None:
        while self.made < count:
            self.make(f"vm-{self.made}")


def calls_of_one_snapshot(snapshots: Snapshots, vm: str, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every process started (by its program) and every loop-device kernel call one snapshot makes."""
    import subprocess as real
    from devices import loop

    counts: Counter[str] = Counter()
    original_run, original_in_kernel, original_identity = real.run, loop.in_kernel, loop.backing_identity

    def run(argv: Any, *args: Any, **kwargs: Any) -> Any:
        counts[f"process {Path(str(argv[0])).name}"] += 1
        return original_run(argv, *args, **kwargs)

    def in_kernel(call: Any, timeout: float, what: str) -> Any:
        counts[f"ioctl {what.split()[0]}"] += 1
        return original_in_kernel(call, timeout, what)

    def identity(device: str) -> Any:
        counts["ioctl LOOP_GET_STATUS64"] += 1
        return original_identity(device)

    from safeguards.health import SystemHealthChecker

    with monkeypatch.context() as patch:
        # Every health check runs afresh: a pass reused from the last second (safeguards/setup.py)
        # would make the count depend on how fast the previous snapshot was.
        patch.setattr(SystemHealthChecker, "check_recent", lambda self, _age: self.check_all())
        patch.setattr(real, "run", run)
        patch.setattr(loop, "in_kernel", in_kernel)
        patch.setattr(loop, "backing_identity", identity)
        snapshots.make(vm)
    return counts


def test_a_snapshot_makes_the_same_calls_at_10_and_at_200_devices(image_state: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    snapshots = Snapshots(image_state)
    snapshots.up_to(10)
    at_10 = calls_of_one_snapshot(snapshots, "counted-10", monkeypatch)
    snapshots.up_to(200)
    at_200 = calls_of_one_snapshot(snapshots, "counted-200", monkeypatch)
    devices = BlockfilePool(PoolConfig(directory=str(image_state))).list_devices()
    assert len(devices) >= 200 and sum(d.active for d in devices) >= 200  # 200 VMs' disks attached
    print(f"calls per snapshot at 10 and at 200 devices: {dict(at_10)}")
    assert at_10 == at_200
    assert at_10["ioctl attach"] == 1  # the snapshot's own loop
    assert "process losetup" not in at_10  # no listing of every loop device


def test_a_thousand_vms_then_a_reboot_and_the_pool_and_catalog_agree(image_state: Path) -> None:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    snapshots = Snapshots(image_state)
    snapshots.up_to(1000)
    snapshots.store.engine.dispose()
    listed = json.loads(cli(image_state, "snapshots", "--json").stdout)
    catalog = {row["device_name"] for row in listed}
    assert len(catalog) == 1001 and {row["state"] for row in listed} == {"ready"}  # process-image's and 1000 VMs'
    assert len({row["vm_id"] for row in listed}) == 1001
    pool = BlockfilePool(PoolConfig(directory=str(image_state)))
    for device in pool.list_devices():  # a simulated reboot: every loop gone, the pool unmounted
        if device.active:
            pool.deactivate(device.device_id)
    pool.teardown_pool()
    assert not pool.get_pool_status().exists
    reattached = cli(image_state, "setup-pool")
    assert "catalog reconciled with the pool" in reattached.stderr and "reactivated=1001" in reattached.stderr
    devices = pool.list_devices()
    assert {d.name for d in devices if d.active} == catalog  # every VM's disk back, and only those
    layers = {row[0] for row in _rows(image_state, "SELECT device_name FROM unpacked_images")}
    assert {d.name for d in devices} == catalog | layers
    dry = cli(image_state, "gc", "--dry-run")
    assert "orphaned=0" in dry.stdout and f"total_devices={len(catalog | layers)}" in dry.stdout


def test_after_a_reboot_a_vm_asking_again_gets_its_own_disk_at_its_new_path(image_state: Path,
                                                                            tmp_path: Path) -> None:
    """A reboot binds every VM's disk anew, to whatever loop numbers are free then: the path
    a VM's job first gave may now be another disk's. Asked again, the job hands out the
    path its own disk has now (and binds it, if nothing did)."""
    from devices import loop
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    first = {vm: dict(item.split("=", 1) for item in cli(image_state, "snapshot", IMAGE, "--vm", vm).stdout.split())
             for vm in ("vm-a", "vm-b", "vm-c")}
    pool = BlockfilePool(PoolConfig(directory=str(image_state)))
    for device in pool.list_devices():  # a simulated reboot
        if device.active:
            pool.deactivate(device.device_id)
    pool.teardown_pool()
    others = []  # meanwhile something else takes the lowest free loops
    for n in range(2):
        other = tmp_path / f"other-{n}.img"
        other.write_bytes(bytes(1024 * 1024))
        others.append(loop.attach(other))
    try:
        cli(image_state, "setup-pool")
        pool.deactivate(int(first["vm-c"]["snapshot"].removeprefix("thin-")))  # one disk left unbound
        for vm, before in first.items():
            again = dict(item.split("=", 1) for item in cli(image_state, "snapshot", IMAGE, "--vm", vm).stdout.split())
            assert again["job_id"] == before["job_id"] and again["snapshot"] == before["snapshot"]
            bound = loop.find_backing(pool.mount_point / f"{before['snapshot']}.img")
            assert bound == [again["snapshot_device"]], (vm, before, again, bound)
        contexts = {vm: json.loads(context)["snapshot_device"] for vm, context in
                    _rows(image_state, "SELECT json_extract(context, '$.vm_id'), context FROM jobs "
                                       "WHERE workflow = 'snapshot'")}
        assert {vm: contexts[vm] for vm in first} == {  # what `fsm show` and a polling client read too
            vm: loop.find_backing(pool.mount_point / f"{before['snapshot']}.img")[0] for vm, before in first.items()}
    finally:
        for other in others:
            loop.detach(other)


def test_after_a_reboot_process_image_again_names_its_snapshot_at_its_new_path(image_state: Path,
                                                                              tmp_path: Path) -> None:
    """The image job's own snapshot comes back on another loop after a reboot too. Run again,
    `process-image` names the path it has now, whether the command re-attaches the pool
    itself or `setup-pool` did it first, and whether its disk is bound or not."""
    from devices import loop
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    url = f"file://{tmp_path / IMAGE}"
    pool = BlockfilePool(PoolConfig(directory=str(image_state)))

    def process_again() -> dict[str, str]:
        done = cli(image_state, "process-image", "--url", url, "--device-size", "64M", "--quiet")
        return dict(item.split("=", 1) for item in done.stdout.split())

    def reboot() -> None:
        for device in pool.list_devices():
            if device.active:
                pool.deactivate(device.device_id)
        pool.teardown_pool()

    first = process_again()
    image_disk = pool.mount_point / f"{first['snapshot']}.img"
    others = []
    try:
        for how in ("the command re-attaches", "setup-pool first", "its disk left unbound"):
            reboot()
            other = tmp_path / f"other-{len(others)}.img"  # meanwhile something takes the lowest free loop
            other.write_bytes(bytes(1024 * 1024))
            others.append(loop.attach(other))
            if how != "the command re-attaches":
                cli(image_state, "setup-pool")
            if how == "its disk left unbound":
                pool.deactivate(int(first["snapshot"].removeprefix("thin-")))
            again = process_again()
            assert (again["job_id"], again["snapshot"]) == (first["job_id"], first["snapshot"]), how
            assert [again["snapshot_device"]] == loop.find_backing(image_disk), how
            context = _rows(image_state, f"SELECT context FROM jobs WHERE id = {first['job_id']}")[0][0]
            assert json.loads(context)["snapshot_device"] == again["snapshot_device"], how  # `fsm show` agrees
            assert process_again() == again, how  # and the next run answers at once with the same
    finally:
        for other in others:
            loop.detach(other)


def test_a_waiting_snapshot_request_is_answered_with_the_ready_device(image_state: Path, tmp_path: Path) -> None:
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(image_state), "daemon", "--backend",
                               "blockfile", "--metrics-port", "0"], cwd=REPO, stdout=log, stderr=log)
    try:
        sock = _connect(image_state, daemon)
        reader = sock.makefile("rb")
        replies = []
        for _ in range(2):  # the second ask of the same VM is the same job, answered at once
            sock.sendall(json.dumps({"op": "snapshot", "image": IMAGE, "vm": "vm-waits", "wait": True}).encode() + b"\n")
            replies.append(json.loads(reader.readline()))
        sock.close()
        first, again = replies
        assert first["ok"] and first["state"] == "complete" and first["final"] is True, first
        assert first["snapshot_device"].startswith("/dev/loop") and first["snapshot"].startswith("thin-")
        assert again["job_id"] == first["job_id"] and again["snapshot_device"] == first["snapshot_device"]
        row = _rows(image_state, "SELECT device_name, state FROM snapshots WHERE vm_id = 'vm-waits'")
        assert row == [(first["snapshot"], "ready")]
        with open(first["snapshot_device"], "rb") as device:  # the path is the VM's disk, readable now
            device.seek(1024 + 0x38)
            assert device.read(2) == b"\x53\xef"  # ext4's superblock magic
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)
        log.close()


def test_with_the_daemon_running_snapshot_and_delete_snapshot_are_handed_to_it(image_state: Path,
                                                                              tmp_path: Path) -> None:
    """The daemon holds the manager lock: the commands hand it their request (on its socket)
    instead of being refused, and print what they print when they run the job themselves."""
    alone = cli(image_state, "snapshot", IMAGE, "--vm", "vm-alone")  # no daemon: the command runs the job
    log_path = tmp_path / "daemon.log"
    log = log_path.open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "cli", "--state-dir", str(image_state), "daemon", "--backend",
                               "blockfile", "--metrics-port", "0"], cwd=REPO, stdout=log, stderr=log)
    try:
        _connect(image_state, daemon).close()
        handed = cli(image_state, "snapshot", IMAGE, "--vm", "vm-handed")
        assert "handed to the running daemon" in handed.stderr and "op=snapshot" in handed.stderr
        fields = dict(item.split("=", 1) for item in handed.stdout.split())
        assert list(fields) == [item.split("=", 1)[0] for item in alone.stdout.split()]  # the same line
        assert fields["state"] == "complete" and fields["vm"] == "vm-handed"
        assert _rows(image_state, "SELECT device_name, state FROM snapshots WHERE vm_id = 'vm-handed'") == [
            (fields["snapshot"], "ready")]
        job_line = f"job_id={fields['job_id']}"
        assert job_line in log_path.read_text()  # the daemon ran it
        refused = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(image_state), "snapshot", "nope",
                                  "--vm", "vm-x"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
            "error: image 'nope' not found; `images` lists them")
        deleted = cli(image_state, "delete-snapshot", "--vm", "vm-handed")
        assert deleted.stdout.strip() == f"deleted VM vm-handed's snapshot ({fields['snapshot']})"
        assert "op=delete-snapshot" in deleted.stderr
        assert _rows(image_state, "SELECT id FROM snapshots WHERE vm_id = 'vm-handed'") == []
        assert not (image_state / "pool" / f"{fields['snapshot']}.img").exists()
    finally:
        daemon.terminate()
        daemon.wait(timeout=120)
        log.close()
    assert "handed" not in cli(image_state, "delete-snapshot", "--vm", "vm-alone").stderr  # stopped: run here


def _connect(state_dir: Path, daemon: subprocess.Popen[bytes]) -> socket.socket:
    path = state_dir / "fsm" / "manager.sock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert daemon.poll() is None, "the daemon exited"
        if path.exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except OSError:
                sock.close()
        time.sleep(0.05)  # until the daemon's socket answers, with a deadline
    raise AssertionError("the daemon's socket never answered")


def _rows(state_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    import sqlite3

    with sqlite3.connect(state_dir / "images.db") as db:
        return db.execute(sql).fetchall()
