"""The guide's Health Checker: D-state, pool status, kernel log, memory, I/O wait.

Each check returns a CheckResult with a short reading ("available 3.1% < 5%").
`check_all()` runs the five; `as_guard()` is the condition of every transition into a
device state: a failure makes the job wait with the summary as its reason and retry
with backoff, never abort. Readings that need two samples come from the most recent
window (`start_sampler()` keeps one fresh in long-running processes), so a check on a
healthy host takes milliseconds, not a window. Every limit is a field of HealthThresholds; an operator sets the
main ones with FLYIO_HEALTH_* variables (`thresholds_from_env`, the checker's default);
everything read comes through a ProcReader, so tests can point the checks at a tree of real-format
files with chosen values.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from devices.base import PoolStatus
from safeguards.procfs import (CpuTimes, KernelRecord, ProcStat, iowait_share, parse_context_switches, parse_cpu_times,
                               parse_dmesg_json, parse_kmsg_record, parse_meminfo, parse_proc_stat_line)
from support.errors import ManagerError
from support.log import get_logger
from support.proc import run_command

log = get_logger("safeguards.health", component="health-checker")

# Processes whose uninterruptible sleep means the dm/loop/filesystem stack is wedged.
DSTATE_PATTERN = (r"dm[-_]|kdmflush|kcopyd|kworker.*\bdm|loop|mkfs|mount|jbd2|losetup|dmsetup|e2fsck|"
                  r"flyio")

# Kernel messages that mean the kernel is in trouble. A bare "dm-" would match every
# "EXT4-fs (dm-3): mounted filesystem" line, so device names count only with an error.
KERNEL_PATTERNS: tuple[str, ...] = (
    r"\bBUG\b", r"\bpanic\b", r"\bOops\b", r"Out of memory", r"oom-kill",
    r"device-mapper: thin", r"device-mapper: .*(error|fail)", r"\bdm-\d+\b.*error",
    r"blk_update_request: I/O error", r"I/O error, dev", r"Buffer I/O error", r"EXT4-fs error",
    r"hung_task", r"blocked for more than \d+ seconds",
)
# Matching messages that are harmless (dm-thin says this when a pool is made on a
# device without discard support).
KERNEL_IGNORE_PATTERNS: tuple[str, ...] = (r"discard unsupported",)

CPU_SAMPLES_KEPT = 16  # at two a window, several windows back: more than the staleness bound needs
KMSG_RECORD_MAX = 8192  # CONSOLE_EXT_LOG_MAX: a read() of /dev/kmsg returns one whole record


@dataclass(frozen=True)
class HealthThresholds:
    """Every limit the checker applies; each one configurable."""

    min_memory_available: float = 0.05       # MemAvailable/MemTotal below this blocks
    max_iowait: float = 0.50                 # iowait share above this blocks
    iowait_window_seconds: float = 0.5       # shortest sampling window of /proc/stat
    block_pool_data_used: float = 0.95       # pool data used at or above this blocks
    warn_pool_data_used: float = 0.80        # ... and at or above this says so in the reading
    block_pool_metadata_used: float = 0.95   # full metadata turns a pool read-only: block early
    dstate_pattern: str = DSTATE_PATTERN     # regex on comm of processes whose D state blocks
    dstate_confirm_seconds: float = 0.5      # D at two samples this far apart, not run between; 0: one sample
    kernel_patterns: tuple[str, ...] = KERNEL_PATTERNS
    kernel_ignore_patterns: tuple[str, ...] = KERNEL_IGNORE_PATTERNS
    kernel_include_user_messages: bool = False  # lines programs write to /dev/kmsg (facility != kernel)
    kernel_lookback_seconds: float = 0.0     # first check ever: also report this much earlier log


# The operator's overrides of HealthThresholds: variable -> (field, unit). Percents are
# 0-100 (the field holds the fraction); seconds are >= 0.
THRESHOLD_VARIABLES: dict[str, tuple[str, str]] = {
    "FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT": ("min_memory_available", "percent"),
    "FLYIO_HEALTH_MAX_IOWAIT_PERCENT": ("max_iowait", "percent"),
    "FLYIO_HEALTH_BLOCK_POOL_DATA_PERCENT": ("block_pool_data_used", "percent"),
    "FLYIO_HEALTH_WARN_POOL_DATA_PERCENT": ("warn_pool_data_used", "percent"),
    "FLYIO_HEALTH_BLOCK_POOL_METADATA_PERCENT": ("block_pool_metadata_used", "percent"),
    "FLYIO_HEALTH_IOWAIT_WINDOW_SECONDS": ("iowait_window_seconds", "seconds"),
    "FLYIO_HEALTH_DSTATE_CONFIRM_SECONDS": ("dstate_confirm_seconds", "seconds"),
}


def thresholds_from_env(environ: Mapping[str, str] | None = None) -> HealthThresholds:
    """HealthThresholds with every FLYIO_HEALTH_* variable that is set applied; the one
    place they are read. A bad value is a ManagerError naming the variable."""
    env = os.environ if environ is None else environ
    changes: dict[str, float] = {}
    for variable, (name, unit) in THRESHOLD_VARIABLES.items():
        raw = env.get(variable, "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        limit = 100.0 if unit == "percent" else float("inf")
        if not (math.isfinite(value) and 0 <= value <= limit):
            expected = "a percent from 0 to 100" if unit == "percent" else "a number of seconds >= 0"
            raise ManagerError(f"{variable}={raw!r} is not {expected}")
        changes[name] = value / 100 if unit == "percent" else value
    return replace(HealthThresholds(), **changes)


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: `reading` is the short text an operator sees, `detail` the rest."""

    name: str
    passed: bool
    reading: str
    detail: str = ""


@dataclass(frozen=True)
class HealthReport:
    results: tuple[CheckResult, ...]
    duration_ms: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        """One line naming each failing check and its reading ("" when all pass)."""
        return "; ".join(f"{r.name}: {r.reading}" for r in self.failures)


def run_dmesg_json() -> str:
    """The kernel log through util-linux dmesg, for hosts where /dev/kmsg cannot be opened."""
    return run_command(["dmesg", "--json"], timeout=10).stdout


@dataclass
class ProcReader:
    """Where the checks read from; tests point it at a tree of real-format files."""

    proc: Path = Path("/proc")
    kmsg: Path = Path("/dev/kmsg")
    dmesg: Callable[[], str] = field(default=run_dmesg_json)
    sleep: Callable[[float], None] = field(default=time.sleep)
    monotonic: Callable[[], float] = field(default=time.monotonic)
    monotonic_usec: Callable[[], int] = field(default=lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def read(self, relative: str) -> str:
        return (self.proc / relative).read_text()

    def pids(self) -> Iterator[str]:
        return (entry.name for entry in self.proc.iterdir() if entry.name.isdigit())

    def boot_id(self) -> str:
        try:
            return self.read("sys/kernel/random/boot_id").strip()
        except OSError:
            return ""


@dataclass(frozen=True)
class KernelCursor:
    """The newest kernel record a check has seen, in `<state-dir>/fsm/kmsg.cursor`.

    Sequence numbers restart at boot, so the boot id says whether they still apply."""

    boot_id: str
    sequence: int
    usec: int


class SystemHealthChecker:
    """Runs every check; `check_all()` -> HealthReport. Safe to share between threads."""

    def __init__(self, pool_status: Callable[[], PoolStatus] | None, thresholds: HealthThresholds | None = None,
                 state_dir: Path | None = None, reader: ProcReader | None = None) -> None:
        self.pool_status = pool_status
        self.thresholds = thresholds or thresholds_from_env()
        self.reader = reader or ProcReader()
        # Without a state dir the cursor lives in memory (monitor, daemon housekeeping).
        self.cursor_path = (state_dir / "fsm" / "kmsg.cursor") if state_dir else None
        self._cursor: KernelCursor | None = None
        self._kernel_lock = threading.Lock()
        self._cpu_lock = threading.Lock()
        self._cpu_samples: deque[CpuSample] = deque(maxlen=CPU_SAMPLES_KEPT)
        if self.reader.monotonic is time.monotonic and self.reader.proc == Path("/proc"):
            self._seed_first_sample()  # the CLI's reading at start (same clock, same file) opens the first window
        self._sampler_stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._last_pass: tuple[float, HealthReport] | None = None  # (reader.monotonic(), report)
        self._dstate_re = re.compile(self.thresholds.dstate_pattern)
        self._kernel_re = re.compile("|".join(f"(?:{p})" for p in self.thresholds.kernel_patterns))
        self._ignore_re = (re.compile("|".join(f"(?:{p})" for p in self.thresholds.kernel_ignore_patterns))
                           if self.thresholds.kernel_ignore_patterns else None)

    def check_all(self) -> HealthReport:
        """Run the five checks; a check that cannot run fails. Milliseconds on a healthy
        host once a window of /proc/stat samples exists (see check_iowait); plus
        dstate_confirm_seconds when a matching process is in D state."""
        started = time.monotonic()
        checks: tuple[tuple[str, Callable[[], CheckResult]], ...] = (
            ("dstate", self.check_dstate), ("pool", self.check_pool), ("kernel_log", self.check_kernel_log),
            ("memory_pressure", self.check_memory), ("io_wait", self.check_iowait))
        results = []
        for name, check in checks:
            try:
                results.append(check())
            except (OSError, ValueError, ManagerError) as exc:
                results.append(CheckResult(name, False, f"could not check: {exc}"))
        report = HealthReport(tuple(results), duration_ms=(time.monotonic() - started) * 1000)
        for r in report.failures:
            log.warning("health check failed", check=r.name, reading=r.reading)
        if report.passed:
            self._last_pass = (self.reader.monotonic(), report)
        return report

    def check_recent(self, max_age_seconds: float) -> HealthReport:
        """The report of a check_all() that passed at most `max_age_seconds` ago, else a
        new check_all(). A failing report is never reused: every wait re-checks.

        The Operation Guard's pre-check right after the transition guard passed: one
        check per guarded transition, not two."""
        last = self._last_pass
        if last is not None and 0 <= self.reader.monotonic() - last[0] <= max_age_seconds:
            return last[1]
        return self.check_all()

    def start_sampler(self) -> None:
        """Keep a fresh /proc/stat sample in a background (daemon) thread, every half
        window, so check_iowait() finds a window that has already elapsed instead of
        waiting one out. For long-running processes (a job run, the daemon); idempotent."""
        window = self.thresholds.iowait_window_seconds
        if window <= 0 or (self._sampler is not None and self._sampler.is_alive()):
            return
        self._sampler_stop.clear()

        def sample() -> None:
            try:
                self._sample_cpu()
            except (OSError, ValueError):
                pass  # the check reads /proc/stat too, and reports the error

        def sample_forever() -> None:
            while not self._sampler_stop.wait(window / 2):
                sample()

        sample()  # the first window starts now, not half a window later

        self._sampler = threading.Thread(target=sample_forever, name="health-iowait-sampler", daemon=True)
        self._sampler.start()

    def stop_sampler(self) -> None:
        """Stop the background sampler (if any) and wait for it."""
        self._sampler_stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
            self._sampler = None

    def as_guard(self, reuse_pass_seconds: float = 0.0) -> Callable[[], str | None]:
        """The condition of transitions into device states: None when healthy, else the
        one-line summary of what failed (the job waits with it and retries). A check that
        passed at most `reuse_pass_seconds` ago stands (check_recent); a failure never does."""
        def health_guard() -> str | None:
            report = self.check_recent(reuse_pass_seconds) if reuse_pass_seconds > 0 else self.check_all()
            return None if report.passed else report.summary()
        return health_guard

    # -- 1. D state ---------------------------------------------------------------------

    def check_dstate(self) -> CheckResult:
        """Matching processes in uninterruptible sleep, confirmed stuck by a second sample."""
        candidates = {stat.pid: stat for stat in self._scan_processes()
                      if stat.state == "D" and self._dstate_re.search(stat.comm)}
        if candidates and self.thresholds.dstate_confirm_seconds > 0:
            switches = {pid: self._context_switches(pid) for pid in candidates}
            self.reader.sleep(self.thresholds.dstate_confirm_seconds)
            candidates = {pid: stat for pid, stat in candidates.items()
                          if self._still_stuck(pid, switches[pid])}
        if not candidates:
            return CheckResult("dstate", True, "no dm/loop/mkfs/mount process in D state")
        stuck = [f"{s.comm}[{s.pid}]" for s in candidates.values()]
        detail = ", ".join(f"pid {s.pid} comm {s.comm} wchan {self._wchan(s.pid)}" for s in candidates.values())
        return CheckResult("dstate", False, f"{len(stuck)} process(es) in D state: {', '.join(stuck)}", detail)

    def _scan_processes(self) -> Iterator[ProcStat]:
        for pid in self.reader.pids():
            try:
                yield parse_proc_stat_line(self.reader.read(f"{pid}/stat"))
            except (OSError, ValueError):
                continue  # the process ended while we looked

    def _context_switches(self, pid: int) -> int | None:
        try:
            return parse_context_switches(self.reader.read(f"{pid}/status"))
        except (OSError, ValueError):
            return None

    def _still_stuck(self, pid: int, switches_before: int | None) -> bool:
        try:
            if parse_proc_stat_line(self.reader.read(f"{pid}/stat")).state != "D":
                return False
        except (OSError, ValueError):
            return False  # gone
        return switches_before is None or self._context_switches(pid) in (None, switches_before)

    def _wchan(self, pid: int) -> str:
        try:
            return self.reader.read(f"{pid}/wchan").strip() or "?"
        except OSError:
            return "?"

    # -- 2. pool status -----------------------------------------------------------------

    def check_pool(self) -> CheckResult:
        """Exists, none of needs_check / read-only / out_of_data_space / error, and room left."""
        if self.pool_status is None:
            return CheckResult("pool", True, "no pool to check")
        status = self.pool_status()
        t = self.thresholds
        if not status.exists:
            return CheckResult("pool", False, "pool does not exist", status.raw)
        for flag, text in ((status.error_state, "pool is in error state"), (status.needs_check, "pool needs_check"),
                           (status.read_only, "pool is read-only"),
                           (status.out_of_data_space, "pool is out of data space")):
            if flag:
                return CheckResult("pool", False, text, status.raw)
        data, meta = status.data_used_fraction, status.metadata_used_fraction
        if data >= t.block_pool_data_used:
            return CheckResult("pool", False, f"data {_pct(data)} used >= {_pct(t.block_pool_data_used)}", status.raw)
        if meta >= t.block_pool_metadata_used:
            return CheckResult("pool", False, f"metadata {_pct(meta)} used >= {_pct(t.block_pool_metadata_used)}",
                               status.raw)
        reading = f"data {_pct(data)} used, metadata {_pct(meta)} used"
        if data >= t.warn_pool_data_used:
            reading += f" (warning: above {_pct(t.warn_pool_data_used)}; run gc, delete snapshots)"
        return CheckResult("pool", True, reading, status.raw)

    # -- 3. kernel log ------------------------------------------------------------------

    def check_kernel_log(self) -> CheckResult:
        """Matching kernel messages since the last check (cursor by sequence number).

        The first check ever (no cursor, or a cursor from another boot) starts at the
        end of the log, less `kernel_lookback_seconds`: what happened before the manager
        looked is not a reason to hold its jobs."""
        with self._kernel_lock:
            try:
                records, source = self._read_kmsg(), "/dev/kmsg"
            except PermissionError as exc:
                records, source = None, f"/dev/kmsg: {exc.strerror}"
            except FileNotFoundError:
                records, source = None, "/dev/kmsg: absent"
            if records is None:
                try:
                    records, source = parse_dmesg_json(self.reader.dmesg()), f"dmesg ({source})"
                except (ManagerError, OSError, ValueError) as exc:
                    return CheckResult("kernel_log", True, "kernel log unavailable",
                                       f"{source}; dmesg: {exc}; the kernel log check is skipped")
            return self._scan_kernel_records(records, source)

    def _read_kmsg(self) -> list[KernelRecord]:
        fd = os.open(self.reader.kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        records = []
        try:
            while True:
                try:
                    chunk = os.read(fd, KMSG_RECORD_MAX)
                except BlockingIOError:
                    break  # EAGAIN: read everything there is
                except OSError as exc:
                    if exc.errno == errno.EPIPE:
                        continue  # records were overwritten under us; the next read goes on
                    raise
                if not chunk:
                    break
                record = parse_kmsg_record(chunk.decode(errors="replace"))
                if record is not None:
                    records.append(record)
        finally:
            os.close(fd)
        return records

    def _scan_kernel_records(self, records: list[KernelRecord], source: str) -> CheckResult:
        boot_id, cursor = self.reader.boot_id(), self._read_cursor()
        if cursor is not None and cursor.boot_id == boot_id:
            new = [r for r in records if _after(r, cursor)]
        else:  # first check on this boot
            since = self.reader.monotonic_usec() - int(self.thresholds.kernel_lookback_seconds * 1_000_000)
            new = [r for r in records if r.usec >= since] if self.thresholds.kernel_lookback_seconds > 0 else []
        hits = [r for r in new if self._is_kernel_error(r)]
        if records:
            newest = max(records, key=lambda r: (r.sequence, r.usec))
            self._write_cursor(KernelCursor(boot_id, newest.sequence, newest.usec))
        elif cursor is None or cursor.boot_id != boot_id:  # an empty log: "since now" by time
            self._write_cursor(KernelCursor(boot_id, -1, self.reader.monotonic_usec()))
        if hits:
            detail = " | ".join(r.message[:200] for r in hits[-5:])
            return CheckResult("kernel_log", False,
                               f"{len(hits)} kernel error(s) since last check, latest: {hits[-1].message[:120]}",
                               f"source {source}; {detail}")
        return CheckResult("kernel_log", True, "no kernel errors since last check",
                           f"source {source}; {len(new)} new record(s)")

    def _is_kernel_error(self, record: KernelRecord) -> bool:
        if record.facility != 0 and not self.thresholds.kernel_include_user_messages:
            return False  # written by a program, not the kernel
        if not self._kernel_re.search(record.message):
            return False
        return self._ignore_re is None or not self._ignore_re.search(record.message)

    def _read_cursor(self) -> KernelCursor | None:
        if self.cursor_path is None:
            return self._cursor
        try:
            data = json.loads(self.cursor_path.read_text())
            return KernelCursor(str(data["boot_id"]), int(data["sequence"]), int(data["usec"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: start from now

    def _write_cursor(self, cursor: KernelCursor) -> None:
        self._cursor = cursor
        if self.cursor_path is None:
            return
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cursor_path.with_name(f"{self.cursor_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"boot_id": cursor.boot_id, "sequence": cursor.sequence, "usec": cursor.usec}))
        os.replace(tmp, self.cursor_path)  # readers see the old cursor or the new, never half

    # -- 4. memory pressure ---------------------------------------------------------------

    def check_memory(self) -> CheckResult:
        """MemAvailable / MemTotal from /proc/meminfo."""
        info = parse_meminfo(self.reader.read("meminfo"))
        share = info.available_fraction
        detail = f"MemAvailable {info.available_kb // 1024} MiB of MemTotal {info.total_kb // 1024} MiB"
        if share < self.thresholds.min_memory_available:
            return CheckResult("memory_pressure", False,
                               f"available {share:.1%} < {_pct(self.thresholds.min_memory_available)}", detail)
        return CheckResult("memory_pressure", True, f"available {share:.1%}", detail)

    # -- 5. I/O wait ----------------------------------------------------------------------

    def check_iowait(self) -> CheckResult:
        """iowait share of all CPU time over the most recent window of /proc/stat: from a
        sample one to two `iowait_window_seconds` old (kept by the sampler thread or an
        earlier check) to one taken now.

        An older sample is stale and never starts the window. Without a usable one (the
        first check of a process without a sampler) the check waits for the rest of the
        window from its oldest sample younger than one window, or for a whole window."""
        window = self.thresholds.iowait_window_seconds
        end = self._sample_cpu()
        start = self._window_start(end.at, window)
        if start is None:
            start = self._oldest_younger_than(end.at, window) or end
            wait = window - (end.at - start.at)
            if wait > 0:
                self.reader.sleep(wait)
            end = self._sample_cpu()
        share = iowait_share(start.times, end.times)
        detail = f"over {max(end.at - start.at, window):.2f}s ({end.times.total - start.times.total} ticks)"
        if share > self.thresholds.max_iowait:
            return CheckResult("io_wait", False, f"iowait {_pct(share)} > {_pct(self.thresholds.max_iowait)}", detail)
        return CheckResult("io_wait", True, f"iowait {_pct(share)}", detail)

    def _seed_first_sample(self) -> None:
        from safeguards.first_sample import first_sample

        reading = first_sample()
        if reading is not None:
            try:
                self._cpu_samples.append(CpuSample(reading[0], parse_cpu_times(reading[1])))
            except ValueError:
                pass  # the check's own reading reports a malformed /proc/stat

    def _sample_cpu(self) -> CpuSample:
        sample = CpuSample(self.reader.monotonic(), parse_cpu_times(self.reader.read("stat")))
        with self._cpu_lock:
            self._cpu_samples.append(sample)
        return sample

    def _window_start(self, now: float, window: float) -> CpuSample | None:
        """The newest sample between one and two windows before `now` (None: none fresh)."""
        with self._cpu_lock:
            usable = [s for s in self._cpu_samples if window <= now - s.at <= 2 * window]
        return max(usable, key=lambda s: s.at) if usable else None

    def _oldest_younger_than(self, now: float, window: float) -> CpuSample | None:
        with self._cpu_lock:
            young = [s for s in self._cpu_samples if 0 <= now - s.at < window]
        return min(young, key=lambda s: s.at) if young else None


@dataclass(frozen=True)
class CpuSample:
    """One reading of /proc/stat's cpu line and when it was taken (ProcReader.monotonic)."""

    at: float
    times: CpuTimes


def _after(record: KernelRecord, cursor: KernelCursor) -> bool:
    if record.sequence >= 0 and cursor.sequence >= 0:
        return record.sequence > cursor.sequence
    return record.usec > cursor.usec  # dmesg records carry no sequence number


def _pct(fraction: float) -> str:
    """95% / 3.1%: whole percents unless that would hide the difference."""
    percent = fraction * 100
    return f"{percent:.0f}%" if abs(percent - round(percent)) < 0.05 else f"{percent:.1f}%"
