"""The Operation Guard: serialization in threads and across real processes, the
acquire timeout, the health check before acquiring, logging, nesting."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import safeguards.guard as guard_module
from safeguards.guard import GuardConfig, GuardTimeout, HealthCheckFailed, OperationGuard, interruptible
from safeguards.health import CheckResult, HealthReport
from support.errors import TransientError
from support.proc import run_command

ROOT = Path(__file__).resolve().parents[1]


class Overlap:
    """Records how many operations ran at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.runs = 0

    def work(self, seconds: float) -> None:
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(seconds)
        with self._lock:
            self.active -= 1
            self.runs += 1


def run_in_threads(guard: OperationGuard, overlap: Overlap, threads: int, seconds: float) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(guard.with_operation, f"op-{i}", lambda: overlap.work(seconds)) for i in range(threads)]
        for f in futures:
            f.result()


def test_concurrency_one_serializes_threads() -> None:
    overlap = Overlap()
    run_in_threads(OperationGuard(GuardConfig(max_concurrent=1)), overlap, threads=6, seconds=0.03)
    assert overlap.runs == 6 and overlap.most == 1


def test_concurrency_two_allows_two_and_no_more() -> None:
    overlap = Overlap()
    run_in_threads(OperationGuard(GuardConfig(max_concurrent=2)), overlap, threads=6, seconds=0.15)
    assert overlap.runs == 6 and overlap.most == 2


def test_acquire_timeout_names_the_holder() -> None:
    guard = OperationGuard(GuardConfig(acquire_timeout=0.3))
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with guard.operation("unpack-image"):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        holding.wait(5)
        started = time.monotonic()
        with pytest.raises(GuardTimeout) as raised:
            with guard.operation("snapshot"):
                pytest.fail("ran without the guard")
        waited = time.monotonic() - started
    finally:
        release.set()
        holder.join()
    assert 0.3 <= waited < 1.5
    assert re.fullmatch(r"timed out after 0\.3s waiting for the operation guard "
                        r"\(held by: unpack-image since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", str(raised.value))
    assert isinstance(raised.value, TransientError)
    guard.with_operation("snapshot", lambda: None)  # free again


def failing_report() -> HealthReport:
    return HealthReport((CheckResult("memory_pressure", False, "available 3.1% < 5%"),
                         CheckResult("io_wait", True, "iowait 2%")))


def test_health_failure_prevents_acquisition() -> None:
    calls: list[str] = []
    guard = OperationGuard(GuardConfig(health_check=failing_report, acquire_timeout=0.2))
    with pytest.raises(HealthCheckFailed) as raised:
        guard.with_operation("create-device", lambda: calls.append("ran"))
    assert str(raised.value) == "health check failed before create-device: memory_pressure: available 3.1% < 5%"
    assert isinstance(raised.value, TransientError) and calls == []
    assert guard._slots.acquire(blocking=False)  # the slot was never taken
    guard._slots.release()


def test_health_check_runs_before_every_operation() -> None:
    checks: list[float] = []

    def healthy() -> HealthReport:
        checks.append(time.monotonic())
        return HealthReport((CheckResult("memory_pressure", True, "available 97.0%"),))

    guard = OperationGuard(GuardConfig(health_check=healthy))
    assert guard.with_operation("make-filesystem", lambda: 42) == 42
    guard.with_operation("snapshot", lambda: None)
    assert len(checks) == 2


def test_start_finish_and_failure_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    guard = OperationGuard(GuardConfig())
    with caplog.at_level("INFO"):
        guard.with_operation("make-filesystem", lambda: time.sleep(0.02))
        with pytest.raises(RuntimeError):
            with guard.operation("unpack-image"):
                raise RuntimeError("tar member escapes the root")
    events = [(r.getMessage(), r.fields) for r in caplog.records if r.name == "safeguards.guard"]
    assert [(m, f["operation"]) for m, f in events] == [
        ("operation started", "make-filesystem"), ("operation finished", "make-filesystem"),
        ("operation started", "unpack-image"), ("operation failed", "unpack-image")]
    assert events[1][1]["duration_ms"] >= 20
    assert events[3][1]["error"] == "RuntimeError: tar member escapes the root"
    guard.with_operation("snapshot", lambda: None)  # a failure released the guard


def test_nested_operation_in_one_thread_does_not_deadlock() -> None:
    guard = OperationGuard(GuardConfig(acquire_timeout=0.5))
    order: list[str] = []
    with guard.operation("snapshot"):
        with guard.operation("create-device"):
            order.append("inner")
        order.append("outer")
    assert order == ["inner", "outer"]


# -- across real processes ------------------------------------------------------------------

WORKER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from safeguards.guard import GuardConfig, OperationGuard, GuardTimeout
guard = OperationGuard(GuardConfig(state_dir=Path(sys.argv[2]), acquire_timeout=float(sys.argv[4])))
go = float(sys.argv[3])
time.sleep(max(0.0, go - time.time()))
spans = []
try:
    for i in range(int(sys.argv[5])):
        with guard.operation("unpack-image"):
            start = time.time()
            time.sleep(0.05)
            spans.append((start, time.time()))
except GuardTimeout as exc:
    print(json.dumps({"timeout": str(exc)}))
    raise SystemExit(0)
print(json.dumps({"spans": spans}))
"""


def run_worker(state_dir: Path, go: float, timeout: float, count: int) -> dict[str, object]:
    out = run_command([sys.executable, "-c", WORKER, str(ROOT), str(state_dir), str(go), str(timeout), str(count)],
                      timeout=60).stdout
    return json.loads(out)


def test_flock_serializes_two_real_processes(tmp_path: Path) -> None:
    go = time.time() + 1.0
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: run_worker(tmp_path, go, 30, 8), range(2)))
    spans = sorted(span for r in results for span in r["spans"])  # type: ignore[union-attr]
    assert len(spans) == 16
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, "two processes ran dm operations at once"
    assert (tmp_path / "fsm" / "dm-operations.lock").exists()


def test_cross_process_timeout_names_the_other_process(tmp_path: Path) -> None:
    guard = OperationGuard(GuardConfig(state_dir=tmp_path))
    with guard.operation("make-filesystem"):
        result = run_worker(tmp_path, time.time(), 0.4, 1)
    assert re.fullmatch(r"timed out after 0\.4s waiting for the operation guard \(held by: make-filesystem "
                        rf"\(pid {os.getpid()}\) since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)",
                        str(result["timeout"]))
    assert "spans" in run_worker(tmp_path, time.time(), 2, 1)  # released when the body ended


# -- giving up a wait when the job is told to stop --------------------------------------------

class Interrupted(Exception):
    """What a job's interrupt check raises (AbortRequested, in the product)."""


def interrupt_on_call(n: int) -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == n:
            raise Interrupted("abort requested")
    return calls, check


def test_an_interrupt_check_ends_the_wait_for_another_process_flock(tmp_path: Path) -> None:
    lock = tmp_path / "fsm" / "dm-operations.lock"
    lock.parent.mkdir(parents=True)
    held = os.open(lock, os.O_RDWR | os.O_CREAT)  # another open file: conflicts as another process would
    fcntl.flock(held, fcntl.LOCK_EX)
    guard = OperationGuard(GuardConfig(state_dir=tmp_path, acquire_timeout=300))
    calls, check = interrupt_on_call(3)
    try:
        with interruptible(check), pytest.raises(Interrupted):
            with guard.operation("unpack-image"):
                pytest.fail("ran without the lock")
    finally:
        os.close(held)
    assert len(calls) == 3  # checked before every poll; the third said stop
    guard.with_operation("snapshot", lambda: None)  # slot and descriptor were given back


def test_an_interrupt_check_ends_the_wait_for_a_slot() -> None:
    guard = OperationGuard(GuardConfig(acquire_timeout=300))
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with guard.operation("make-filesystem"):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    calls, check = interrupt_on_call(2)
    try:
        assert holding.wait(10)
        with interruptible(check), pytest.raises(Interrupted):
            guard.with_operation("create-device", lambda: pytest.fail("ran without a slot"))
    finally:
        release.set()
        holder.join()
    assert len(calls) == 2
    guard.with_operation("create-device", lambda: None)


def test_without_an_interrupt_check_nothing_is_called_and_nesting_restores_the_outer_one() -> None:
    outer, inner = (lambda: None), (lambda: None)
    with interruptible(outer):
        with interruptible(inner):
            assert guard_module._interrupt.check is inner
        assert guard_module._interrupt.check is outer
    assert guard_module._interrupt.check is None
