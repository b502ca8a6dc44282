"""The health check off the critical path: I/O wait read from the most recent window (the
sampler's or an earlier check's samples), never from a stale one, and one check per
guarded transition. Clock and sleeper are injected and counted; no timing assertions.
The failing side is unchanged: a job whose I/O-wait reading is over the limit waits, with
the reading as its reason (a real job from SeaweedFS on a real blockfile pool)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from devices.base import PoolStatus
from fsm.runner import Runner
from safeguards.guard import HealthCheckFailed
from safeguards.health import HealthThresholds, ProcReader, SystemHealthChecker
from safeguards.setup import build_safeguards
from states.names import ImageState
from tests.conftest import SampleBucket
from tests.test_health import FakeProc, healthy_pool
from tests.test_safeguards import first_job_once_waiting, needs_root, pool_state_dir  # noqa: F401 (fixture)


class Clock:
    """A monotonic clock that moves only when told to; `sleep` counts and advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclasses.dataclass
class CountingReader(ProcReader):
    """The fake /proc tree, counting what is read (one check_all reads meminfo once)."""

    reads: dict[str, int] = dataclasses.field(default_factory=dict)

    def read(self, relative: str) -> str:
        self.reads[relative] = self.reads.get(relative, 0) + 1
        return super().read(relative)


def counting_reader(fake: FakeProc, clock: Clock) -> CountingReader:
    base = fake.reader()
    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        fake.sleep(seconds)  # applies the queued /proc/stat values, as time passing would
    return CountingReader(proc=base.proc, kmsg=base.kmsg, dmesg=base.dmesg, sleep=sleep,
                          monotonic=clock, monotonic_usec=base.monotonic_usec)


@dataclasses.dataclass
class BusyReader(ProcReader):
    """/proc with a host in heavy I/O: 70 of every 100 CPU ticks between any two reads of
    /proc/stat are iowait, whenever they are taken (the sampler thread reads it too)."""

    ticks: int = 0

    def read(self, relative: str) -> str:
        if relative != "stat":
            return super().read(relative)
        self.ticks += 1
        return f"cpu  {1000 + 30 * self.ticks} 0 100 9000 {70 * self.ticks} 0 0 0 0 0\n"


class StubPool:
    def __init__(self, status: PoolStatus) -> None:
        self.status = status

    def get_pool_status(self) -> PoolStatus:
        return self.status


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def test_a_guard_on_a_healthy_host_never_calls_the_sleeper(fake: FakeProc, tmp_path: Path) -> None:
    """The product's wiring (build_safeguards): the sampler's first sample starts the
    window; a window later the transition guard passes from it, and the Operation Guard
    reuses that pass instead of checking again. Transitions within GUARD_REUSE_SECONDS of a
    pass (VMs' snapshots at tens a second) reuse it too: one check for the three."""
    from safeguards.setup import GUARD_REUSE_SECONDS

    clock = Clock()
    reader = counting_reader(fake, clock)
    health_guard, operation = build_safeguards(tmp_path / "state", StubPool(healthy_pool()), reader=reader)
    clock.now += 0.6  # the download before the first device state
    fake.set_cpu(1100, 110, 9400, 10)  # 10 of 510 ticks in iowait
    for _ in range(3):  # three guarded transitions, each followed by its device operation
        assert health_guard() is None
        with operation("create-device"):
            pass
        clock.now += 0.3
    assert clock.sleeps == []
    assert 2 * 0.3 < GUARD_REUSE_SECONDS  # the third transition is within a second of the first pass
    assert reader.reads["meminfo"] == 1  # one check for the three transitions and their operations


def test_the_operation_guard_checks_afresh_when_the_last_pass_is_old(fake: FakeProc, tmp_path: Path) -> None:
    clock = Clock()
    reader = counting_reader(fake, clock)
    health_guard, operation = build_safeguards(tmp_path / "state", StubPool(healthy_pool()), reader=reader)
    clock.now += 0.6
    assert health_guard() is None
    clock.now += 5.0  # a long step between the transition and its operation
    with operation("unpack-image"):
        pass
    assert reader.reads["meminfo"] == 2


def test_a_failing_check_is_never_reused(fake: FakeProc, tmp_path: Path) -> None:
    clock = Clock()
    reader = counting_reader(fake, clock)
    health_guard, operation = build_safeguards(tmp_path / "state", StubPool(healthy_pool()), reader=reader)
    clock.now += 0.6
    fake.set_cpu(1060, 110, 9050, 280)  # 280 of 400 new ticks in iowait: 70%
    assert health_guard() == "io_wait: iowait 70% > 50%"
    with pytest.raises(HealthCheckFailed, match=r"^health check failed before create-device: io_wait: iowait 70% > 50%$"):
        with operation("create-device"):
            pass
    assert reader.reads["meminfo"] == 2


def test_a_stale_sample_is_never_used(fake: FakeProc, tmp_path: Path) -> None:
    """A sample older than two windows would make the reading an average over a time long
    past (here: idle), hiding the iowait of the last window. The check waits a fresh one."""
    clock = Clock()
    c = SystemHealthChecker(None, HealthThresholds(), state_dir=tmp_path / "state", reader=counting_reader(fake, clock))
    c.start_sampler()
    c.stop_sampler()  # one sample, at 1000.0, idle so far
    clock.now += 1.01  # just over two windows: stale
    fake.set_cpu(1000, 100, 9000, 0)
    fake.cpu_after = (1060, 110, 9050, 280)  # the last window: 70% iowait
    result = c.check_iowait()
    assert clock.sleeps == [0.5]
    assert result.reading == "iowait 70% > 50%"


def test_the_clis_first_sample_opens_the_first_window(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI reads /proc/stat as it starts (safeguards/first_sample.py): a checker built
    later, on the same clock, measures its first window from there instead of pausing."""
    import time

    import safeguards.first_sample as first_sample

    monkeypatch.setattr(first_sample, "_reading", (time.monotonic() - 0.6, Path("/proc/stat").read_text()))
    pauses: list[float] = []
    c = SystemHealthChecker(None, HealthThresholds(), state_dir=tmp_path, reader=ProcReader(sleep=pauses.append))
    result = c.check_iowait()
    assert pauses == []
    assert result.detail.startswith("over 0.6")


def test_a_stale_first_sample_is_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import time

    import safeguards.first_sample as first_sample

    monkeypatch.setattr(first_sample, "_reading", (time.monotonic() - 5.0, Path("/proc/stat").read_text()))
    pauses: list[float] = []
    c = SystemHealthChecker(None, HealthThresholds(), state_dir=tmp_path, reader=ProcReader(sleep=pauses.append))
    c.check_iowait()
    assert pauses == [0.5]  # a whole window from now: the five-second-old reading started none


def test_a_sample_just_one_window_old_is_used(fake: FakeProc, tmp_path: Path) -> None:
    clock = Clock()
    c = SystemHealthChecker(None, HealthThresholds(), state_dir=tmp_path / "state", reader=counting_reader(fake, clock))
    c.start_sampler()
    c.stop_sampler()
    clock.now += 0.5
    fake.set_cpu(1060, 110, 9050, 280)
    result = c.check_iowait()
    assert clock.sleeps == []
    assert result.reading == "iowait 70% > 50%" and result.detail == "over 0.50s (400 ticks)"


def test_the_sampler_thread_keeps_a_window_fresh(tmp_path: Path) -> None:
    """On the real /proc: with the sampler running, a check a window or more later finds
    its start sample and does not pause."""
    pauses: list[float] = []
    reader = ProcReader(sleep=pauses.append)
    c = SystemHealthChecker(None, HealthThresholds(iowait_window_seconds=0.1), state_dir=tmp_path, reader=reader)
    c.start_sampler()
    try:
        threading.Event().wait(0.35)
        result = c.check_iowait()
    finally:
        c.stop_sampler()
    assert pauses == []
    assert result.detail.startswith("over 0.1")


@needs_root
def test_a_failing_iowait_reading_makes_a_real_job_wait_with_its_reason(
        pool_state_dir: Path, sample_bucket: SampleBucket, fake: FakeProc) -> None:  # noqa: F811
    from cli.app import open_store
    from states.registry import all_workflows, build_services
    from states.submit import resolve_request
    from states.workflow import WORKFLOW_NAME

    services = build_services(pool_state_dir, backend="blockfile", device_size_bytes=64 * 1024**2)
    health_guard, operation = build_safeguards(pool_state_dir, services.pool, reader=BusyReader(proc=fake.root))
    busy = dataclasses.replace(services, health_guard=health_guard, operation=operation)
    request = resolve_request(bucket=sample_bucket.name, s3_key="images/node/5.tar",
                              endpoint_url=sample_bucket.endpoint_url)
    stop = threading.Event()
    runner = Runner(open_store(pool_state_dir), all_workflows(busy), stop_event=stop)
    worker = threading.Thread(target=lambda: runner.start(WORKFLOW_NAME, request.idempotency_key,
                                                          request.job_context()))
    worker.start()
    try:
        job = first_job_once_waiting(runner)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    waited = runner.store.get(job.id)
    assert waited.state == ImageState.VERIFYING
    assert waited.error is not None and waited.error.startswith("waiting: io_wait: iowait 70% > 50%"), waited.error
    assert services.pool.list_devices() == []
