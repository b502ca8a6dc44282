"""Bad input at the VM path's edges (issue 23): VM ids with whitespace at either end, and
sizes past what the backend can make, are refused up front with one line, in the CLI and
the daemon alike: no job row, no device, no request queued. Real SQLite, a real blockfile
pool on loop devices, SeaweedFS, and the daemon as a child process."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.test_capacity import errors
from tests.test_daemon import DaemonProcess, free_port
from tests.test_vm_snapshots import (catalog_dump, db_rows, images_bucket, manager, pool_devices, process,  # noqa: F401
                                     state_dir)

HUGE = "99999999999999999999"
VM_ID_ERROR = "error: invalid VM id {!r}: 1-128 printable characters, no '/', no whitespace at either end"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


def one_error(result: Any) -> str:
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert len(errors(result)) == 1, result.stderr[-2000:]
    return errors(result)[0]


def test_sizes_are_exact_and_absurd_ones_are_one_line() -> None:
    from support.errors import PermanentError
    from support.sizes import parse_size

    assert parse_size(HUGE) == int(HUGE)  # exact: the callers' limits name themselves
    assert parse_size("9007199254740993") == 9007199254740993  # not rounded through a float
    assert parse_size("1.5M") == 3 * 1024**2 // 2
    for text, reason in (("1e400", "SQLite's largest INTEGER"), ("inf", "use e.g."), ("nan", "use e.g."),
                         ("0.1", "must be positive")):
        with pytest.raises(PermanentError, match=re.escape(f"invalid size {text!r}: ") + ".*" + re.escape(reason)):
            parse_size(text)


def test_the_device_limit_names_the_bound_that_binds(tmp_path: Path) -> None:
    from devices.base import PoolConfig
    from devices.devicemapper import DevicemapperPool
    from devices.limits import EXT4_MAX_BYTES, check_device_size, max_file_bytes
    from support.errors import PermanentError

    pool = DevicemapperPool(PoolConfig(directory=str(tmp_path)))  # nothing made: the limit needs no pool
    assert check_device_size("--size", EXT4_MAX_BYTES, pool) == EXT4_MAX_BYTES
    with pytest.raises(PermanentError) as refused:
        check_device_size("--size", EXT4_MAX_BYTES + 1, pool)
    assert str(refused.value) == (f"--size {EXT4_MAX_BYTES + 1} bytes (256.0 PiB) is larger than the largest device "
                                  f"the devicemapper backend makes: {EXT4_MAX_BYTES} bytes (256.0 PiB, ext4's largest "
                                  "filesystem at 1 KiB blocks: 2^48 - 1 blocks)")
    # The probe finds this filesystem's largest file exactly: it takes that size, not one byte more.
    largest = max_file_bytes(tmp_path)
    probe = tmp_path / "probe"
    with probe.open("wb") as fh:
        fh.truncate(largest)
        if largest < 2**63 - 1:
            with pytest.raises(OSError) as too_big:
                fh.truncate(largest + 1)
            assert too_big.value.errno in (errno.EFBIG, errno.EINVAL)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".size-probe-")]


@needs_root
def test_cli_refuses_bad_vm_ids_and_sizes_before_anything_is_recorded(state_dir: Path,
                                                                     images_bucket: dict[str, str]) -> None:
    made = process(state_dir, images_bucket, "fa", "64M")
    assert made.returncode == 0, made.stderr[-3000:]
    before, devices = catalog_dump(state_dir), pool_devices(state_dir)

    for vm_id in (" ", "   ", " vm-1", "vm-1 ", "\tvm-1"):
        result = manager(state_dir, "snapshot", "fa", "--vm", vm_id)
        assert one_error(result) == VM_ID_ERROR.format(vm_id), result.stderr[-2000:]
    huge = one_error(manager(state_dir, "snapshot", "fa", "--vm", "vm-1", "--size", HUGE))
    assert re.fullmatch(rf"error: --size {HUGE} bytes \(86\.7 EiB\) is larger than the largest device the blockfile "
                        r"backend makes: \d+ bytes \([\d.]+ [PT]iB, .*\)", huge), huge
    device = one_error(manager(state_dir, "process-image", "--image", "fb", "--bucket", images_bucket["bucket"],
                               "--endpoint-url", images_bucket["endpoint"], "--device-size", HUGE))
    assert device.startswith(f"error: --device-size {HUGE} bytes (86.7 EiB) is larger than the largest device "), device
    grow = one_error(manager(state_dir, "setup-pool", "--backend", "blockfile", "--grow", HUGE))
    assert grow.startswith(f"error: --grow {HUGE} bytes (86.7 EiB) is larger than the largest pool file (blockfile): "), grow
    assert catalog_dump(state_dir) == before and pool_devices(state_dir) == devices

    # A well-formed request still works after all that.
    fine = manager(state_dir, "snapshot", "fa", "--vm", "vm 1")  # inner whitespace is a VM id's own business
    assert fine.returncode == 0, fine.stderr[-2000:]
    assert db_rows(state_dir, "SELECT vm_id FROM snapshots WHERE vm_id IS NOT NULL") == [("vm 1",)]


@needs_root
def test_daemon_refuses_bad_vm_ids_and_sizes_before_any_job(state_dir: Path, images_bucket: dict[str, str],
                                                           tmp_path: Path) -> None:
    from daemon.protocol import DaemonError, request

    made = process(state_dir, images_bucket, "fa", "64M")
    assert made.returncode == 0, made.stderr[-3000:]
    refused = one_error(manager(state_dir, "daemon", "--backend", "blockfile", "--metrics-port", "0",
                                "--device-size", HUGE))
    assert refused.startswith(f"error: --device-size {HUGE} bytes (86.7 EiB) is larger than the largest device "), refused
    jobs = db_rows(state_dir, "SELECT id, state FROM jobs ORDER BY id")
    devices = pool_devices(state_dir)
    daemon = DaemonProcess(state_dir, free_port(), tmp_path / "daemon.log")
    try:
        daemon.start()
        for message, expected in (
                ({"op": "snapshot", "image": "fa", "vm": " "}, VM_ID_ERROR.format(" ")[len("error: "):]),
                ({"op": "snapshot", "image": "fa", "vm": "vm-1 "}, VM_ID_ERROR.format("vm-1 ")[len("error: "):]),
                ({"op": "snapshot", "image": "fa", "vm": "vm-1", "size": HUGE}, f"size {HUGE} bytes (86.7 EiB) is larger"),
                ({"op": "snapshot", "image": "fa", "vm": "vm-1", "size": int(HUGE)}, f"size {HUGE} bytes (86.7 EiB)"),
                ({"op": "process-image", "image": "fb", "device_size": HUGE}, f"device_size {HUGE} bytes (86.7 EiB)"),
                ({"op": "process-image", "image": "fb", "device_size": True}, "device_size must be a size")):
            with pytest.raises(DaemonError) as answer:
                request(state_dir, message)
            assert str(answer.value).startswith(expected), (message, str(answer.value))
        submitted = one_error(manager(state_dir, "submit", "--snapshot", "fa", "--vm", "vm-1", "--size", HUGE))
        assert submitted.startswith(f"error: size {HUGE} bytes (86.7 EiB) is larger than the largest device "), submitted
        client = one_error(manager(state_dir, "submit", "--snapshot", "fa", "--vm", " "))
        assert client == VM_ID_ERROR.format(" ")
        assert not list((state_dir / "fsm" / "requests").glob("*.json")), "a refused request was queued"
        assert db_rows(state_dir, "SELECT id, state FROM jobs ORDER BY id") == jobs
        assert pool_devices(state_dir) == devices
        assert manager(state_dir, "shutdown").returncode == 0
        assert daemon.wait() == 0
    finally:
        daemon.kill()


def test_a_bad_unpack_setting_is_one_line_before_any_job_or_pool(tmp_path: Path) -> None:
    """FLYIO_UNPACK_DEVICES (and the other FLYIO_UNPACK_* values) are checked where the
    services are built: not a layer aborted half-way with its device left for gc."""
    import io
    import subprocess
    import sys
    import tarfile

    layer = tmp_path / "one.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"vm\n"))
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state), "process-image", "--url",
                           f"file://{layer}", "--backend", "blockfile", "--device-size", "64M"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLYIO_UNPACK_DEVICES": "bogus"})
    assert one_error(done) == "error: FLYIO_UNPACK_DEVICES='bogus': expected one of create, skip"
    assert not (state / "pool_data").exists() and not (state / "pool").exists()
    assert not (state / "images.db").exists() or db_rows(state, "SELECT count(*) FROM jobs") == [(0,)]
