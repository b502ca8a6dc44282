"""The guide's Manager Lock: one flyio-image-manager process per host.

`<state-dir>/fsm/flyio-manager.lock`, created with O_EXCL, holds {"pid", "timestamp",
"command"}. A lock is stale when its pid is dead, it is older than 5 minutes, or it is
unreadable after a grace period; a stale lock is moved aside with rename() (atomic: of
two processes taking it over, only one rename succeeds) and the lock is created again.
A long-running holder (the daemon) calls `refresh()` to stay younger than 5 minutes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from support.errors import ManagerError
from support.log import get_logger
from support.proc import pid_alive

log = get_logger("safeguards.lock", component="manager-lock")

STALE_AFTER_SECONDS = 300.0
UNREADABLE_GRACE_SECONDS = 5.0


class LockHeld(ManagerError):
    """Another live flyio-image-manager holds the lock."""


@dataclass(frozen=True)
class LockInfo:
    pid: int
    timestamp: float
    command: str


def read_lock(path: Path) -> LockInfo | None:
    """The lock's content, or None when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
        return LockInfo(pid=int(data["pid"]), timestamp=float(data["timestamp"]), command=str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ManagerLock:
    """Acquire with `acquire()` (or `with`), release with `release()`."""

    def __init__(self, path: Path, command: str, *, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.path = Path(path)
        self.command = command
        self.stale_after = stale_after
        self.held = False

    def _content(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "timestamp": int(time.time()), "command": self.command}).encode()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _stale_reason(self) -> str | None:
        info = read_lock(self.path)
        now = time.time()
        if info is None:
            try:
                age = now - self.path.stat().st_mtime
            except FileNotFoundError:
                return "gone"
            return "unreadable" if age > UNREADABLE_GRACE_SECONDS else None
        if not pid_alive(info.pid):
            return f"pid {info.pid} is not running"
        if now - info.timestamp > self.stale_after:
            return f"older than {self.stale_after:g}s"
        return None

    def acquire(self) -> "ManagerLock":
        """Take the lock or raise LockHeld naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            reason = self._stale_reason()
            if reason is None:
                info = read_lock(self.path)
                holder = (f"pid {info.pid}, command {info.command}, since "
                          f"{datetime.fromtimestamp(info.timestamp, timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"
                          if info else "being written")
                raise LockHeld(f"another flyio-image-manager is running ({holder}); lock file {self.path}")
            if reason == "gone":
                continue
            aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{time.monotonic_ns()}")
            try:
                os.rename(self.path, aside)  # only one of several racing processes wins this
            except FileNotFoundError:
                continue
            # The file we moved may be a fresh lock another process created after our check.
            moved = read_lock(aside)
            if moved is not None and pid_alive(moved.pid) and time.time() - moved.timestamp <= self.stale_after:
                try:
                    os.link(aside, self.path)  # put the live lock back; fails if a third created one
                except FileExistsError:
                    pass
                os.unlink(aside)
                continue
            os.unlink(aside)
            log.warning("removing stale manager lock", reason=reason, pid=moved.pid if moved else None)
        raise LockHeld(f"could not take the manager lock {self.path}: contended")

    def refresh(self) -> None:
        """Rewrite the timestamp in place (same inode) so a long holder never looks stale."""
        if not self.held:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            content = self._content()
            os.ftruncate(fd, 0)
            os.pwrite(fd, content, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.held:
            return
        info = read_lock(self.path)
        if info is not None and info.pid == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "ManagerLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
