"""The guide's Health Checker: D-state, pool status, kernel log, memory, I/O wait.

Each check reports pass/fail with its reading. `as_guard()` is the condition of every
transition into a device state: a failure makes the job wait, never abort.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devices.base import PoolStatus
from safeguards.procfs import iowait_share, parse_cpu_times, parse_kmsg_line, parse_meminfo, parse_proc_stat_line
from support.log import get_logger

log = get_logger("safeguards.health", component="health-checker")

DSTATE_PATTERN = r"dm[-_]|kdmflush|kcopyd|loop|mkfs|mount|umount|jbd2|losetup|dmsetup|flyio"
KERNEL_PATTERN = (r"BUG|panic|Oops|Out of memory|oom-kill|device-mapper: thin|device-mapper:.*error"
                  r"|blk_update_request: I/O error|I/O error, dev|hung_task|blocked for more than")


@dataclass(frozen=True)
class HealthThresholds:
    """Every limit the checker applies; each one configurable."""

    min_available_memory: float = 0.05
    max_iowait: float = 0.50
    iowait_window_seconds: float = 0.2
    max_pool_data_used: float = 0.95
    warn_pool_data_used: float = 0.80
    dstate_pattern: str = DSTATE_PATTERN
    kernel_pattern: str = KERNEL_PATTERN


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reading: str


@dataclass(frozen=True)
class HealthReport:
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        """One line naming each failing check and its reading ("" when all pass)."""
        return "; ".join(f"{r.name}: {r.reading}" for r in self.failures)


@dataclass
class ProcReader:
    """Where the checks read from; tests point it at a tree of real-format files."""

    proc: Path = Path("/proc")
    kmsg: Path = Path("/dev/kmsg")
    sleep: Callable[[float], None] = field(default=time.sleep)

    def read(self, relative: str) -> str:
        return (self.proc / relative).read_text()


class SystemHealthChecker:
    """Runs every check; `check_all()` -> HealthReport."""

    def __init__(self, pool_status: Callable[[], PoolStatus] | None, thresholds: HealthThresholds | None = None,
                 state_dir: Path | None = None, reader: ProcReader | None = None) -> None:
        self.pool_status = pool_status
        self.thresholds = thresholds or HealthThresholds()
        self.reader = reader or ProcReader()
        self.cursor_path = (state_dir / "fsm" / "kmsg.cursor") if state_dir else None
        self._cursor: int | None = None

    def check_all(self) -> HealthReport:
        results = (self.check_dstate(), self.check_pool(), self.check_kernel_log(),
                   self.check_memory(), self.check_iowait())
        report = HealthReport(results)
        for r in report.failures:
            log.warning("health check failed", check=r.name, reading=r.reading)
        return report

    def as_guard(self) -> Callable[[], str | None]:
        """None when healthy, else the one-line summary of what failed."""
        def guard() -> str | None:
            report = self.check_all()
            return None if report.passed else report.summary()
        return guard

    # -- the checks -------------------------------------------------------------------

    def check_dstate(self) -> CheckResult:
        pattern = re.compile(self.thresholds.dstate_pattern)
        stuck: list[str] = []
        for entry in self.reader.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = parse_proc_stat_line(self.reader.read(f"{entry.name}/stat"))
            except (OSError, ValueError):
                continue  # the process ended while we looked
            if stat.state == "D" and pattern.search(stat.comm):
                stuck.append(f"{stat.comm}[{stat.pid}]")
        if stuck:
            return CheckResult("dstate", False, f"processes in uninterruptible sleep: {', '.join(stuck)}")
        return CheckResult("dstate", True, "no dm/loop/mkfs/mount process in D state")

    def check_pool(self) -> CheckResult:
        if self.pool_status is None:
            return CheckResult("pool", True, "no pool to check")
        status = self.pool_status()
        if not status.exists:
            return CheckResult("pool", False, "pool does not exist")
        for flag, text in ((status.error_state, "pool is in error state"), (status.needs_check, "pool needs_check"),
                           (status.read_only, "pool is read-only"), (status.out_of_data_space, "pool is out of data space")):
            if flag:
                return CheckResult("pool", False, text)
        used = status.data_used_fraction
        if used >= self.thresholds.max_pool_data_used:
            return CheckResult("pool", False, f"data {used:.0%} used >= {self.thresholds.max_pool_data_used:.0%}")
        note = " (above 80%: run gc, delete snapshots)" if used >= self.thresholds.warn_pool_data_used else ""
        return CheckResult("pool", True, f"data {used:.0%} used, metadata {status.metadata_used_fraction:.0%} used{note}")

    def check_kernel_log(self) -> CheckResult:
        """Kernel messages matching the pattern since the last check (cursor by sequence number).

        The first check ever starts at the current end of the log: old messages from before
        the manager ran are not its business."""
        try:
            fd = os.open(self.reader.kmsg, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return CheckResult("kernel_log", True, f"kernel log unavailable ({exc.strerror})")
        pattern = re.compile(self.thresholds.kernel_pattern)
        last_seen = self._read_cursor()
        newest, hits = last_seen, []
        try:
            while True:
                try:
                    chunk = os.read(fd, 8192)
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:
                        break
                    if exc.errno == errno.EPIPE:  # overwritten records; keep reading
                        continue
                    raise
                record = parse_kmsg_line(chunk.decode(errors="replace"))
                if record is None:
                    continue
                newest = max(newest or 0, record.sequence)
                if last_seen is not None and record.sequence > last_seen and pattern.search(record.message):
                    hits.append(record.message[:160])
        finally:
            os.close(fd)
        self._write_cursor(newest)
        if hits:
            return CheckResult("kernel_log", False, f"{len(hits)} kernel error(s) since last check, latest: {hits[-1]}")
        return CheckResult("kernel_log", True, "no kernel errors since last check")

    def check_memory(self) -> CheckResult:
        info = parse_meminfo(self.reader.read("meminfo"))
        share = info.available_fraction
        reading = f"available {share:.1%}"
        if share < self.thresholds.min_available_memory:
            return CheckResult("memory_pressure", False, f"{reading} < {self.thresholds.min_available_memory:.0%}")
        return CheckResult("memory_pressure", True, reading)

    def check_iowait(self) -> CheckResult:
        before = parse_cpu_times(self.reader.read("stat"))
        self.reader.sleep(self.thresholds.iowait_window_seconds)
        after = parse_cpu_times(self.reader.read("stat"))
        share = iowait_share(before, after)
        reading = f"iowait {share:.0%} over {self.thresholds.iowait_window_seconds:g}s"
        if share > self.thresholds.max_iowait:
            return CheckResult("io_wait", False, f"{reading} > {self.thresholds.max_iowait:.0%}")
        return CheckResult("io_wait", True, reading)

    # -- the kernel log cursor ----------------------------------------------------------

    def _read_cursor(self) -> int | None:
        if self.cursor_path is None:
            return self._cursor
        try:
            return int(self.cursor_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _write_cursor(self, sequence: int | None) -> None:
        if sequence is None:
            return
        self._cursor = sequence
        if self.cursor_path is not None:
            self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cursor_path.with_suffix(".tmp")
            tmp.write_text(str(sequence))
            os.replace(tmp, self.cursor_path)
