"""The guide's Operation Guard: device-mapper-heavy operations run one at a time.

A semaphore (default 1) serializes threads of one process; an flock on
`<state-dir>/fsm/dm-operations.lock` serializes processes (the daemon and a CLI).
A health check runs before acquiring; acquisition times out with a clear error.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from safeguards.health import HealthReport
from support.errors import TransientError
from support.log import get_logger

log = get_logger("safeguards.guard", component="operation-guard")

T = TypeVar("T")


class HealthCheckFailed(TransientError):
    """The pre-operation health check failed; try again later."""


class GuardTimeout(TransientError):
    """The guard was not acquired within its timeout."""


@dataclass(frozen=True)
class GuardConfig:
    max_concurrent: int = 1
    acquire_timeout: float = 300.0
    health_check: Callable[[], HealthReport] | None = None
    state_dir: Path | None = None


class OperationGuard:
    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        self.config = config
        self._slots = threading.BoundedSemaphore(config.max_concurrent)
        self._holders: dict[int, tuple[str, float]] = {}
        self._lock_path = config.state_dir / "fsm" / "dm-operations.lock" if config.state_dir else None

    @contextmanager
    def operation(self, name: str) -> Iterator[None]:
        """Run the body as the operation `name`: checked, serialized, timed, logged."""
        if self.config.health_check is not None:
            report = self.config.health_check()
            if not report.passed:
                raise HealthCheckFailed(f"health check failed before {name}: {report.summary()}")
        deadline = time.monotonic() + self.config.acquire_timeout
        if not self._slots.acquire(timeout=self.config.acquire_timeout):
            raise GuardTimeout(f"timed out after {self.config.acquire_timeout:g}s waiting for the operation guard "
                               f"(held by: {self._describe_holders()}) for {name}")
        lock_fd = None
        try:
            lock_fd = self._lock_across_processes(name, deadline)
            self._holders[threading.get_ident()] = (name, time.time())
            started = time.monotonic()
            log.info("operation started", operation=name)
            try:
                yield
            except BaseException as exc:
                log.warning("operation failed", operation=name, duration_ms=int((time.monotonic() - started) * 1000),
                            error=str(exc))
                raise
            log.info("operation finished", operation=name, duration_ms=int((time.monotonic() - started) * 1000))
        finally:
            self._holders.pop(threading.get_ident(), None)
            if lock_fd is not None:
                os.close(lock_fd)  # closing drops the flock
            self._slots.release()

    def with_operation(self, name: str, fn: Callable[[], T]) -> T:
        with self.operation(name):
            return fn()

    def _describe_holders(self) -> str:
        holders = list(self._holders.values())
        if not holders:
            return "another process"
        return ", ".join(f"{name} since {time.strftime('%H:%M:%S', time.localtime(since))}" for name, since in holders)

    def _lock_across_processes(self, name: str, deadline: float) -> int | None:
        if self._lock_path is None:
            return None
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise GuardTimeout(f"timed out after {self.config.acquire_timeout:g}s waiting for the operation "
                                       f"guard (held by another process) for {name}") from None
                time.sleep(0.05)
