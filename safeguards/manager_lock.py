"""The guide's Manager Lock: one flyio-image-manager process per host.

`<state-dir>/fsm/flyio-manager.lock` is created with O_CREAT|O_EXCL and holds
{"pid", "timestamp", "command"}. The lock is stale when its timestamp predates this
boot (`btime` in /proc/stat: after a power cut early pids repeat, and the old holder's
pid may now be an unrelated live process), when its pid is dead (or a zombie,
or is this very process, which does not hold it: a pid reused after a restart), when
its timestamp is older than `stale_after` (5 minutes) even if the pid is alive, or
when its content is unreadable for longer than a grace period (a writer may be
between O_EXCL and its write).

Why a second file: judging a lock stale and removing it are two steps, and two
processes taking over the same stale lock must not both win. Every step that
*removes or rewrites* the lock file (stale takeover, refresh, release) therefore runs
under an flock on `<lock>.mutex`, a small file that is never deleted. Creation on an
absent path needs no mutex: O_EXCL lets exactly one creator win. Under the mutex the
lock file cannot change inode (only mutex holders unlink it, and O_EXCL creators fail
while it exists), so the file judged stale is the file removed, and a fresh lock made
by the winner is judged anew by every later contender.

A long-running holder (the daemon) calls `refresh()` well within 5 minutes: it
rewrites the timestamp in place (same inode, same length, pwrite + fsync) under the
mutex, after checking the file is still its own; if it was taken over, `LockLost`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from safeguards.procfs import parse_proc_stat_line
from support.errors import ManagerError
from support.log import get_logger
from support.proc import pid_alive

log = get_logger("safeguards.lock", component="manager-lock")

STALE_AFTER_SECONDS = 300.0
UNREADABLE_GRACE_SECONDS = 5.0
MUTEX_TIMEOUT_SECONDS = 10.0
_MAX_ATTEMPTS = 20

# Lock files this process holds (by path), so a lock naming our own pid that we do
# not hold is recognised as a pid reused after a restart (common for pid 1 in containers).
_HELD_HERE: set[str] = set()


class LockHeld(ManagerError):
    """Another live flyio-image-manager holds the lock."""


class LockLost(ManagerError):
    """This process's lock was removed or taken over while it believed it held it."""


@dataclass(frozen=True)
class LockInfo:
    """What the lock file says: who holds it, since when, for which command."""

    pid: int
    timestamp: float
    command: str

    @property
    def since(self) -> str:
        """The timestamp as ISO 8601 UTC, e.g. 2026-11-28T12:00:00Z."""
        return datetime.fromtimestamp(self.timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_lock(path: Path) -> LockInfo | None:
    """The lock's content, or None when absent or unreadable (for status displays)."""
    try:
        data = json.loads(Path(path).read_bytes())
        return LockInfo(pid=int(data["pid"]), timestamp=float(data["timestamp"]), command=str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def boot_time() -> float | None:
    """When this system booted (`btime` of /proc/stat, epoch seconds); None if unreadable."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _process_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie answers kill(pid, 0) but will never release)."""
    if pid <= 0 or not pid_alive(pid):
        return False
    try:
        return parse_proc_stat_line(Path(f"/proc/{pid}/stat").read_text()).state != "Z"
    except (OSError, ValueError):
        return True  # no /proc view of it: trust kill(0)


@dataclass(frozen=True)
class _Verdict:
    """Why the current lock file is stale (None: it is live), with what it says."""

    stale_reason: str | None
    info: LockInfo | None
    age_seconds: float
    gone: bool = False


class ManagerLock:
    """Acquire with `acquire()` (or `with`), keep fresh with `refresh()`, release with `release()`."""

    def __init__(self, path: Path, command: str, *, stale_after: float = STALE_AFTER_SECONDS,
                 unreadable_grace: float = UNREADABLE_GRACE_SECONDS) -> None:
        self.path = Path(path)
        self.command = command
        self.stale_after = stale_after
        self.unreadable_grace = unreadable_grace
        self.mutex_path = self.path.with_name(self.path.name + ".mutex")
        # The file we created, kept open while held: an open inode cannot be freed and
        # its number reused, so (st_dev, st_ino) reliably says whether `path` is still ours.
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._identity is not None

    # -- acquire ------------------------------------------------------------------------

    def acquire(self) -> "ManagerLock":
        """Take the lock, removing a stale one, or raise LockHeld naming the live holder."""
        if self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_MAX_ATTEMPTS):
            if self._create():
                return self
            with self._mutex():
                verdict = self._judge()
                if verdict.gone:
                    continue  # released between our create and our look: try again
                if verdict.stale_reason is None:
                    raise LockHeld(self._held_message(verdict.info))
                log.warning("removing stale manager lock", pid=verdict.info.pid if verdict.info else None,
                            age=f"{verdict.age_seconds:.0f}s", reason=verdict.stale_reason, lock_file=str(self.path))
                self.path.unlink(missing_ok=True)
                if self._create():
                    return self
        raise LockHeld(f"could not take the manager lock {self.path}: it kept changing hands")

    def _content(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "timestamp": int(time.time()), "command": self.command}).encode()

    def _create(self) -> bool:
        """O_CREAT|O_EXCL: exactly one creator of an absent path wins."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        _HELD_HERE.add(str(self.path.resolve()))
        return True

    def _judge(self) -> _Verdict:
        """Whether the lock file now at `path` is stale; call under the mutex."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return _Verdict(None, None, 0.0, gone=True)
        now = time.time()
        info = read_lock(self.path)
        if info is None:
            age = now - mtime
            reason = "unreadable" if age > self.unreadable_grace else None
            return _Verdict(reason, None, age)
        age = now - info.timestamp
        booted = boot_time()
        # The timestamp is whole seconds and btime is rounded: a second of slack.
        if booted is not None and info.timestamp < booted - 1:
            return _Verdict("written before this boot (pid reused after a reboot)", info, age)
        if info.pid == os.getpid() and str(self.path.resolve()) not in _HELD_HERE:
            return _Verdict(f"pid {info.pid} is this process, which does not hold it (pid reused)", info, age)
        if not _process_running(info.pid):
            return _Verdict(f"pid {info.pid} is not running", info, age)
        if age > self.stale_after:
            return _Verdict(f"older than {self.stale_after:g}s", info, age)
        return _Verdict(None, info, age)

    def _held_message(self, info: LockInfo | None) -> str:
        if info is None:
            return (f"another flyio-image-manager is starting (lock file still being written); "
                    f"lock file {self.path}")
        return (f"another flyio-image-manager is running (pid {info.pid}, command {info.command}, "
                f"since {info.since}); lock file {self.path}")

    # -- while held ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Rewrite the timestamp in place so a long-running holder never looks stale.

        Same inode and (until the year 2286) the same length, so readers never see a
        truncated file. Raises LockLost if the file is no longer ours."""
        if not self.held:
            return
        with self._mutex():
            self._check_still_ours()
            assert self._fd is not None
            content = self._content()
            os.pwrite(self._fd, content, 0)
            os.ftruncate(self._fd, len(content))
            os.fsync(self._fd)

    def _check_still_ours(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise LockLost(f"the manager lock {self.path} was removed while this process held it") from None
        if (st.st_dev, st.st_ino) != self._identity:
            info = read_lock(self.path)
            holder = f"pid {info.pid}, command {info.command}" if info else "unknown holder"
            raise LockLost(f"the manager lock {self.path} was taken over ({holder}) while this process held it")

    def release(self) -> None:
        """Remove the lock file if it is still ours (same inode); otherwise leave it alone."""
        if not self.held:
            return
        try:
            with self._mutex():
                self._check_still_ours()
                self.path.unlink()
        except LockLost as exc:
            log.warning("manager lock not removed", reason=str(exc))
        finally:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._identity = None, None
            _HELD_HERE.discard(str(self.path.resolve()))

    def __enter__(self) -> "ManagerLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the takeover mutex -------------------------------------------------------------

    @contextmanager
    def _mutex(self) -> Iterator[None]:
        """flock on `<lock>.mutex`, polled so a wedged peer cannot block us forever."""
        fd = os.open(self.mutex_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + MUTEX_TIMEOUT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockHeld(f"could not take the manager lock {self.path}: "
                                       f"{self.mutex_path} busy for {MUTEX_TIMEOUT_SECONDS:g}s") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing drops the flock
