"""The guide's Operation Guard: device-mapper-heavy operations run one at a time.

    guard = OperationGuard(GuardConfig(max_concurrent=1, health_check=checker.check_all,
                                       state_dir=state_dir))
    with guard.operation("unpack-image"):
        unpack()

In order: the health check runs (a failure raises HealthCheckFailed, a NotReadyError:
the job waits, `waiting: health check failed before ...`, and runs the step again); a slot of a BoundedSemaphore is taken (threads of this
process); an flock on `<state-dir>/fsm/dm-operations.lock` is taken (other processes:
the daemon and a CLI never run dm operations at once). Both waits share one deadline,
`acquire_timeout`; missing it raises GuardTimeout naming the holder (a NotReadyError too:
a job waits and runs the step again). Start, finish
(with duration_ms) and failure are logged. An operation started inside another one in
the same thread runs under the outer one's slot instead of deadlocking on it.

Both waits can be given up early: inside `with interruptible(check):` they call `check()`
at least every WAIT_SLICE_SECONDS and let what it raises end the wait (the image workflow
passes the job's `ctx.check_interrupt`, so `fsm abort` or a shutdown reaches a job queued
behind another process's unpack at once). The body itself is never interrupted.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from safeguards.health import HealthReport
from support.errors import NotReadyError
from support.log import StructLogger, get_logger

T = TypeVar("T")

FLOCK_POLL_SECONDS = 0.05
WAIT_SLICE_SECONDS = 0.25  # the semaphore wait checks for an interrupt this often

_interrupt = threading.local()  # .check: this thread's interrupt check, see interruptible()


class HealthCheckFailed(NotReadyError):
    """The pre-operation health check failed; the job waits and tries again later."""


class GuardTimeout(NotReadyError):
    """The guard was not acquired within its timeout. For a job, like a failing health
    check, a reason to wait and try again (another job's long unpack holds the guard),
    not to abort; a command run by hand gets it as its one-line error."""


@dataclass(frozen=True)
class GuardConfig:
    """How many operations at once, how long to wait, what to check first, where to lock."""

    max_concurrent: int = 1
    acquire_timeout: float = 300.0
    health_check: Callable[[], HealthReport] | None = None
    logger: StructLogger | None = None
    state_dir: Path | None = None  # set: also serialize across processes by flock

    @property
    def lock_path(self) -> Path | None:
        return self.state_dir / "fsm" / "dm-operations.lock" if self.state_dir else None


@dataclass(frozen=True)
class _Holder:
    name: str
    since: float

    def describe(self) -> str:
        return f"{self.name} since {_iso(self.since)}"


class OperationGuard:
    """Serializes device-mapper-heavy operations, after a health check; see the module doc."""

    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        if config.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.config = config
        self.log = config.logger or get_logger("safeguards.guard", component="operation-guard")
        self._slots = threading.BoundedSemaphore(config.max_concurrent)
        self._holders: dict[int, _Holder] = {}  # by thread id
        self._holders_lock = threading.Lock()
        self._depth = threading.local()

    @contextmanager
    def operation(self, name: str) -> Iterator[None]:
        """Run the body as the operation `name`: checked, serialized, timed, logged."""
        if getattr(self._depth, "value", 0) > 0:  # nested in this thread: the outer holds the guard
            self._depth.value += 1
            try:
                yield
            finally:
                self._depth.value -= 1
            return
        self._check_health(name)
        deadline = time.monotonic() + self.config.acquire_timeout
        self._take_slot(name, deadline)
        lock_fd: int | None = None
        try:
            lock_fd = self._lock_across_processes(name, deadline)
            with self._holders_lock:
                self._holders[threading.get_ident()] = _Holder(name, time.time())
            self._depth.value = 1
            started = time.monotonic()
            self.log.info("operation started", operation=name)
            try:
                yield
            except BaseException as exc:
                self.log.warning("operation failed", operation=name, duration_ms=_ms_since(started),
                                 error=f"{type(exc).__name__}: {exc}")
                raise
            self.log.info("operation finished", operation=name, duration_ms=_ms_since(started))
        finally:
            self._depth.value = 0
            with self._holders_lock:
                self._holders.pop(threading.get_ident(), None)
            if lock_fd is not None:
                os.close(lock_fd)  # closing the descriptor drops the flock
            self._slots.release()

    def with_operation(self, name: str, fn: Callable[[], T]) -> T:
        """`fn()` run as the operation `name`; its result."""
        with self.operation(name):
            return fn()

    def _check_health(self, name: str) -> None:
        if self.config.health_check is None:
            return
        report = self.config.health_check()
        if not report.passed:
            self.log.warning("operation blocked by health check", operation=name, reason=report.summary())
            raise HealthCheckFailed(f"health check failed before {name}: {report.summary()}")

    def _take_slot(self, name: str, deadline: float) -> None:
        """A slot of the semaphore, waited for in slices until the deadline; between slices
        the thread's interrupt check may end the wait."""
        while not self._slots.acquire(timeout=min(WAIT_SLICE_SECONDS, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise GuardTimeout(self._timeout_message(self._describe_holders()))
            self._check_interrupt(name)

    def _check_interrupt(self, name: str) -> None:
        check = getattr(_interrupt, "check", None)
        if check is None:
            return
        try:
            check()
        except BaseException as exc:
            self.log.info("wait for the guard given up", operation=name, reason=f"{type(exc).__name__}: {exc}")
            raise

    def _timeout_message(self, holders: str) -> str:
        return (f"timed out after {self.config.acquire_timeout:g}s waiting for the operation guard "
                f"(held by: {holders})")

    def _describe_holders(self) -> str:
        with self._holders_lock:
            holders = list(self._holders.values())
        return ", ".join(h.describe() for h in holders) or "unknown"

    def _lock_across_processes(self, name: str, deadline: float) -> int | None:
        """flock on the shared lock file, polled with LOCK_NB until the deadline; then the
        holder's name goes into the file so a waiter that times out can say who it was."""
        path = self.config.lock_path
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._poll_flock(fd, name, deadline)
        except BaseException:
            os.close(fd)
            raise
        record = f"{name} (pid {os.getpid()}) since {_iso(time.time())}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd

    def _poll_flock(self, fd: int, name: str, deadline: float) -> None:
        """Until the flock is ours: GuardTimeout at the deadline, the thread's interrupt
        check before every poll."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise GuardTimeout(self._timeout_message(_read_holder(fd))) from None
            self._check_interrupt(name)
            time.sleep(FLOCK_POLL_SECONDS)


@contextmanager
def interruptible(check: Callable[[], None]) -> Iterator[None]:
    """While the body runs, every Operation Guard wait in this thread calls `check` between
    polls and gives up with whatever it raises (a job's abort request, a shutdown)."""
    previous = getattr(_interrupt, "check", None)
    _interrupt.check = check
    try:
        yield
    finally:
        _interrupt.check = previous


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
