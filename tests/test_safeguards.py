"""The safeguards as the product wires them: build_safeguards' health guard on the image
workflow's transitions, with a real pool, real /proc and a real job from SeaweedFS.

Each safeguard on its own is tested where it lives:
  tests/test_manager_lock.py  acquire/release, a real second process gets LockHeld naming
                              pid and command (lock unchanged), stale by dead pid, stale by
                              age with a live pid, garbage past the grace, 8 processes
                              racing for one stale lock (exactly one wins)
  tests/test_health.py        procfs parsers on live /proc/self/stat, /proc/meminfo,
                              /proc/stat and edge cases (comm with spaces and ')'); every
                              check passing on this host; each threshold's failing side on
                              a fake /proc tree (D-state kdmflush, 3% available, 70%
                              iowait, needs_check / read-only / out of space / 95% full);
                              a real /dev/kmsg line caught once (cursor)
  tests/test_guard.py         concurrency 1 and 2, acquire timeout, failing health check,
                              two real processes serialized by the flock
This file adds the one thing none of them shows: a failing check makes a real job wait
(`fsm show` says "waiting: ..."), and the same guard passes on this host.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsm.models import Job
from fsm.runner import Runner
from tests.conftest import SampleBucket

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the blockfile pool's loop device")


@pytest.fixture
def pool_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir with an attached blockfile pool, torn down afterwards."""
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    state_dir = tmp_path / "state"
    pool = BlockfilePool(PoolConfig(directory=str(state_dir), data_size_bytes=512 * 1024**2))
    try:
        pool.ensure_pool_exists()
        yield state_dir
    finally:
        if (state_dir / "pool").exists():
            for device in pool.list_devices():
                if device.active:
                    pool.deactivate(device.device_id)
            pool.teardown_pool()


def services_with(state_dir: Path, **thresholds: float) -> object:
    """The product's services, with the health guard built from these thresholds."""
    from safeguards.health import HealthThresholds
    from safeguards.setup import build_safeguards
    from states.registry import build_services

    services = build_services(state_dir, backend="blockfile", device_size_bytes=64 * 1024**2)
    health_guard, operation = build_safeguards(state_dir, services.pool, HealthThresholds(**thresholds))
    return dataclasses.replace(services, health_guard=health_guard, operation=operation)


@needs_root

def first_job_once_waiting(runner: Runner, timeout: float = 60) -> Job:
    """The runner's first job, once it records `waiting: ...` (fails the test otherwise)."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        jobs = runner.store.list_jobs()
        job = jobs[0] if jobs else None
        if job is not None and (job.error or "").startswith("waiting:"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"the job never waited: {job and (job.state, job.error)}")

def test_the_products_health_guard_passes_on_this_host(pool_state_dir: Path) -> None:
    services = services_with(pool_state_dir)
    assert services.health_guard() is None  # type: ignore[attr-defined]


@needs_root
def test_a_failing_health_check_makes_a_real_job_wait(pool_state_dir: Path, sample_bucket: SampleBucket) -> None:
    from cli.app import open_store
    from states.registry import all_workflows
    from states.submit import resolve_request
    from states.workflow import WORKFLOW_NAME

    services = services_with(pool_state_dir, min_memory_available=0.999)
    request = resolve_request(bucket=sample_bucket.name, s3_key="images/node/5.tar",
                              endpoint_url=sample_bucket.endpoint_url)
    stop = threading.Event()
    runner = Runner(open_store(pool_state_dir), all_workflows(services), stop_event=stop)  # type: ignore[arg-type]
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(
        job=runner.start(WORKFLOW_NAME, request.idempotency_key, request.job_context())))
    worker.start()
    try:
        job = first_job_once_waiting(runner)
        shown = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(pool_state_dir), "fsm", "show",
                                str(job.id)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "waiting: memory_pressure: available" in shown.stdout, shown.stdout
        assert "< 99.9%" in shown.stdout or "< 100%" in shown.stdout, shown.stdout
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    waited = runner.store.get(job.id)
    # Downloaded and verified, then held before any device was made: nothing in the pool.
    assert waited.state == "verifying"
    assert waited.error is not None and waited.error.startswith("waiting: memory_pressure")
    assert services.pool.list_devices() == []  # type: ignore[attr-defined]
    assert waited.owner_pid is None  # stopped at a safe point: `fsm resume` picks it up


@needs_root
def test_the_operation_guard_checks_health_and_the_job_waits_then_completes(
        pool_state_dir: Path, sample_bucket: SampleBucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """The product's Operation Guard runs the health check before it takes the lock. With the
    transition guard out of the way, the guard is what holds the job: in creating_device,
    `waiting: health check failed before create-device: ...`, not aborted, no device made.
    The threshold comes from the operator's variable through the real builder."""
    from cli.app import open_store
    from safeguards.guard import HealthCheckFailed
    from states.registry import all_workflows, build_services
    from states.submit import resolve_request
    from states.workflow import WORKFLOW_NAME

    monkeypatch.setenv("FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT", "99.9")
    services = build_services(pool_state_dir, backend="blockfile", device_size_bytes=64 * 1024**2)
    with pytest.raises(HealthCheckFailed, match=r"before probe: .*memory_pressure: available .*< 99\.9%"):
        with services.operation("probe"):
            pass
    assert "< 99.9%" in (services.health_guard() or "")
    unguarded = dataclasses.replace(services, health_guard=lambda: None)
    request = resolve_request(bucket=sample_bucket.name, s3_key="images/golang/1.tar",
                              endpoint_url=sample_bucket.endpoint_url)
    stop = threading.Event()
    runner = Runner(open_store(pool_state_dir), all_workflows(unguarded), stop_event=stop)
    worker = threading.Thread(target=lambda: runner.start(WORKFLOW_NAME, request.idempotency_key,
                                                          request.job_context()))
    worker.start()
    try:
        job = first_job_once_waiting(runner)
        time.sleep(3)  # several waits: still waiting, not retried into an abort
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    waited = runner.store.get(job.id)
    assert waited.state == "creating_device", waited.state
    assert waited.error is not None
    assert waited.error.startswith("waiting: health check failed before create-device: memory_pressure: available")
    assert services.pool.list_devices() == []
    assert "aborted" not in [e.to_state for e in runner.store.history(job.id)]

    # Healthy again (the variable unset): the same job goes on to complete.
    monkeypatch.delenv("FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT")
    healthy = build_services(pool_state_dir, backend="blockfile", device_size_bytes=64 * 1024**2)
    done = Runner(open_store(pool_state_dir), all_workflows(healthy)).run(job.id)
    assert done.state == "complete", done.error
