"""The Manager Lock against real processes: held, stale by dead pid, by age, by garbage,
and eight processes racing to take over one stale lock."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from safeguards.manager_lock import LockHeld, LockLost, ManagerLock, boot_time, read_lock
from support.paths import lock_path
from support.proc import run_command

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, timeout: float = 30.0) -> str:
    """Run `code` in a fresh interpreter that can import the project; its stdout."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    return run_command([sys.executable, "-c", prelude + code, *args], timeout=timeout).stdout.strip()


def dead_pid() -> int:
    """The pid of a process that has run and exited (and been reaped)."""
    pid = int(run_python("import os; print(os.getpid())"))
    assert not Path(f"/proc/{pid}").exists()
    return pid


def write_lock(path: Path, pid: int, timestamp: float, command: str = "process-image") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.dumps({"pid": pid, "timestamp": int(timestamp), "command": command}).encode()
    path.write_bytes(content)
    return content


TRY_ACQUIRE = """
from pathlib import Path
from safeguards.manager_lock import ManagerLock, LockHeld
try:
    ManagerLock(Path(sys.argv[1]), "gc").acquire()
    print("ACQUIRED")
except LockHeld as exc:
    print("HELD", exc)
"""


def test_acquire_writes_the_guide_format_and_release_removes_it(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    with ManagerLock(path, "process-image") as lock:
        assert lock.held
        data = json.loads(path.read_text())
        assert data["pid"] == os.getpid() and data["command"] == "process-image"
        assert isinstance(data["timestamp"], int) and abs(data["timestamp"] - time.time()) < 5
        assert read_lock(path) is not None and read_lock(path).pid == os.getpid()
    assert not path.exists()
    assert read_lock(path) is None


def test_second_process_gets_lock_held_and_the_lock_is_unchanged(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    lock = ManagerLock(path, "process-image").acquire()
    before = path.read_bytes()
    out = run_python(TRY_ACQUIRE, str(path))
    assert out.startswith("HELD another flyio-image-manager is running (pid ")
    assert f"(pid {os.getpid()}, command process-image, since " in out
    assert out.endswith(f"); lock file {path}")
    assert path.read_bytes() == before
    lock.release()
    assert run_python(TRY_ACQUIRE, str(path)) == "ACQUIRED"  # the child exits without releasing...
    assert read_lock(path) is not None  # ...so its lock stays behind, naming a dead pid
    ManagerLock(path, "process-image").acquire().release()  # and is taken over as stale


def test_second_acquire_in_same_process_is_refused(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    with ManagerLock(path, "daemon"):
        with pytest.raises(LockHeld, match="command daemon"):
            ManagerLock(path, "gc").acquire()


def test_stale_by_dead_pid_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = lock_path(tmp_path)
    pid = dead_pid()
    write_lock(path, pid, time.time())
    with caplog.at_level("WARNING"), ManagerLock(path, "process-image"):
        assert read_lock(path).pid == os.getpid()
    stale_logs = [r for r in caplog.records if r.getMessage() == "removing stale manager lock"]
    assert len(stale_logs) == 1 and stale_logs[0].fields["pid"] == pid
    assert "not running" in stale_logs[0].fields["reason"]


def test_stale_by_age_even_with_a_live_pid(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    live = os.getppid()
    write_lock(path, live, time.time() - 301)
    with ManagerLock(path, "process-image"):
        assert read_lock(path).pid == os.getpid()
    write_lock(path, live, time.time() - 200)  # younger than 5 minutes: held
    with pytest.raises(LockHeld, match=f"pid {live}"):
        ManagerLock(path, "process-image").acquire()
    ManagerLock(path, "process-image", stale_after=100).acquire().release()  # configurable


def test_garbage_is_held_during_grace_then_stale(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00{not json")
    with pytest.raises(LockHeld, match="being written"):
        ManagerLock(path, "process-image").acquire()
    old = time.time() - 10
    os.utime(path, (old, old))
    with ManagerLock(path, "process-image"):
        assert read_lock(path).pid == os.getpid()
    path.write_bytes(b"")  # empty (a writer died between O_EXCL and write)
    os.utime(path, (old, old))
    ManagerLock(path, "process-image").acquire().release()
    assert not path.exists()


def test_refresh_keeps_the_inode_and_advances_the_timestamp(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    lock = ManagerLock(path, "daemon").acquire()
    data = json.loads(path.read_text())
    data["timestamp"] -= 250
    path.write_text(json.dumps(data))  # same inode, an older timestamp
    inode = path.stat().st_ino
    lock.refresh()
    assert path.stat().st_ino == inode
    assert abs(read_lock(path).timestamp - time.time()) < 5
    lock.release()


def test_a_taken_over_lock_is_neither_refreshed_nor_removed(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    mine = ManagerLock(path, "daemon").acquire()
    data = json.loads(path.read_text())
    data["timestamp"] -= 400
    path.write_text(json.dumps(data))  # as if this holder forgot to refresh for 6 minutes
    theirs_content = run_python(TRY_ACQUIRE + "print(open(sys.argv[1]).read())", str(path))
    assert theirs_content.startswith("ACQUIRED")
    before = path.read_bytes()
    with pytest.raises(LockLost, match="taken over"):
        mine.refresh()
    mine.release()
    assert path.read_bytes() == before  # the new holder's file is left alone


RACER = """
import time
from pathlib import Path
from safeguards.manager_lock import ManagerLock, LockHeld
path, go, done = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
time.sleep(max(0.0, go - time.time()))
try:
    ManagerLock(path, "racer").acquire()
except LockHeld as exc:
    print("LOST")
    raise SystemExit(0)
print("WON")
sys.stdout.flush()
deadline = time.time() + 20
while not done.exists() and time.time() < deadline:  # hold it until every racer has tried
    time.sleep(0.02)
"""


def test_eight_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    done = tmp_path / "done"
    for round_number in range(3):
        done.unlink(missing_ok=True)
        write_lock(path, dead_pid(), time.time())
        go = time.time() + 1.5  # everyone starts together, after interpreter start-up
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(run_python, RACER, str(path), str(go), str(done)) for _ in range(8)]
            deadline = time.time() + 25
            while sum(f.done() for f in futures) < 7 and time.time() < deadline:
                time.sleep(0.05)
            done.touch()
            outcomes = sorted(f.result() for f in futures)
        assert outcomes == ["LOST"] * 7 + ["WON"], f"round {round_number}: {outcomes}"



def test_lock_from_before_this_boot_is_stale_even_if_its_pid_now_lives(tmp_path: Path) -> None:
    """After a power cut early pids repeat: the old holder's pid can be a live, unrelated
    process (seen in the QEMU power-cut test: it was the new process-image's parent).
    The guide's format has no boot id, so the timestamp is compared with btime."""
    path = lock_path(tmp_path)
    live = os.getppid()
    booted = boot_time()
    assert booted is not None and booted < time.time()
    never_by_age = 10.0**9  # so only the boot-time rule can make it stale
    write_lock(path, live, booted - 30)  # 30 s before this boot, pid alive
    with ManagerLock(path, "process-image", stale_after=never_by_age):
        assert read_lock(path).pid == os.getpid()
    write_lock(path, live, booted + 5)  # this boot, live pid: held
    with pytest.raises(LockHeld, match=f"pid {live}"):
        ManagerLock(path, "process-image", stale_after=never_by_age).acquire()
