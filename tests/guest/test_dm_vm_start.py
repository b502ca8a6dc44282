"""A VM's snapshot on dm-thin makes the same device-mapper calls whatever the pool holds,
INSIDE the QEMU guest (tests/test_vm.py runs tests/guest/): the dmsetup (and every other
tool's) invocations of one snapshot are counted with 10 thin devices in the pool and again
with 200. Under TCG the count and its shape are the figures; times mean little here."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool

pytestmark = pytest.mark.skipif(not Path("/dev/mapper/control").exists(),
                                reason="needs a device-mapper kernel (/dev/mapper/control); run via tests/test_vm.py")

REPO = Path(__file__).resolve().parents[2]
FILLER_BASE = 100_000  # thin ids of the devices that only fill the pool


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get("GUEST_SHARE")
    directory = Path(base) / "vm-start-state" if base else tmp_path / "state"
    yield directory
    pool = DevicemapperPool(PoolConfig(directory=str(directory)))
    for device in pool.list_devices():
        if device.active:
            pool.deactivate(device.device_id)
    pool.teardown_pool()


def test_a_snapshot_makes_the_same_dmsetup_calls_at_10_and_at_200_devices(state_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.app import open_store
    from states.registry import open_environment
    from states.vm_snapshot import process_snapshot_request, resolve_snapshot_request

    layer = tmp_path / "vm.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"vm\n"))
    made = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--url",
                           f"file://{layer}", "--backend", "devicemapper", "--device-size", "64M"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    # Every health check runs afresh (no reuse of a recent pass by the transition guard or
    # the Operation Guard: under TCG whether a pass is still fresh depends on how slow the
    # emulation was just then, not on the devices).
    monkeypatch.setattr("safeguards.setup.GUARD_REUSE_SECONDS", 0.0)
    monkeypatch.setattr("safeguards.setup.RECENT_PASS_SECONDS", 0.0)
    store = open_store(state_dir)
    environment = open_environment(state_dir, store, backend="devicemapper")
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))

    def snapshot(vm: str) -> None:
        with store.transaction() as session:
            request = resolve_snapshot_request(session, "vm.tar", vm, None)
        job = process_snapshot_request(environment.runner, request, environment.services)
        assert job.state == "complete", job.error

    callers: dict[str, list[str]] = defaultdict(list)

    def counted(vm: str) -> Counter[str]:
        counts: Counter[str] = Counter()
        real_run = subprocess.run

        def run(argv: Any, *args: Any, **kwargs: Any) -> Any:
            words = [str(a) for a in argv]
            tool = Path(words[0]).name
            name = f"{tool} {words[1]}" if tool == "dmsetup" and len(words) > 1 else tool
            stack = [f.name for f in reversed(traceback.extract_stack(limit=9)[:-2])]
            # A health check (one `dmsetup status` of the pool each) runs again while the host
            # is busy (under TCG, after 190 creates, the I/O-wait check may fail once): counted
            # apart, since how often the host is unhealthy is not what the devices cost.
            counts["health check: " + name if "check_all" in stack else name] += 1
            callers[vm].append(name + " <- " + " < ".join(stack))
            return real_run(argv, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(subprocess, "run", run)
            snapshot(vm)
        return counts

    def fill_to(count: int) -> None:
        present = len(pool.list_devices())
        for n in range(count - present):
            pool.create_thin(FILLER_BASE + present + n, 64 * 1024**2)  # in the pool's metadata, never activated
        assert len(pool.list_devices()) == count

    fill_to(10)
    at_10 = counted("vm-at-10")
    fill_to(200)
    at_200 = counted("vm-at-200")
    print(f"calls per snapshot on dm-thin, at 10 and at 200 thin devices: {dict(at_10)}; {dict(at_200)}")
    device_calls = [{k: v for k, v in c.items() if not k.startswith("health check: ")} for c in (at_10, at_200)]
    assert device_calls[0] == device_calls[1], "\n".join(["at 10:", *callers["vm-at-10"], "at 200:",
                                                          *callers["vm-at-200"]])
    assert {k for k in at_10 | at_200 if k.startswith("health check: ")} == {"health check: dmsetup status"}
    at_10 = Counter(device_calls[0])
    assert at_10["dmsetup message"] == 1  # create_snap, the one metadata message
    assert at_10["dmsetup create"] == 1  # the VM's device mapped
    assert "thin_ls" not in at_10 and "dmsetup ls" not in at_10  # nothing lists every device
