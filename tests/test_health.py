"""The Health Checker: parsers against this machine's real /proc and /dev/kmsg text and
hand-made edge cases; every check's failing side on a fake /proc tree (real formats,
chosen values); the real checks on this host; the kernel-log cursor on the real /dev/kmsg."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from devices.base import PoolStatus
from safeguards.health import HealthThresholds, ProcReader, SystemHealthChecker
from safeguards.procfs import (iowait_share, parse_context_switches, parse_cpu_times, parse_dmesg_json,
                               parse_kmsg_record, parse_meminfo, parse_proc_stat_line)
from support.errors import ManagerError
from support.proc import run_command

# -- parsers against real text ------------------------------------------------------------


def test_proc_stat_of_this_process() -> None:
    stat = parse_proc_stat_line(Path("/proc/self/stat").read_text())
    assert stat.pid == os.getpid()
    assert stat.comm == Path("/proc/self/comm").read_text().strip()
    assert stat.state == "R"  # reading its own stat, it is running
    assert stat.ppid == os.getppid()


def test_proc_stat_with_a_hostile_comm_set_by_a_real_thread() -> None:
    """The kernel prints comm verbatim: parentheses and spaces inside it are real."""
    seen: dict[str, str] = {}
    ready, done = threading.Event(), threading.Event()

    def worker() -> None:
        Path("/proc/thread-self/comm").write_text("x) (D 9 y)")
        seen["tid"] = str(threading.get_native_id())
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        ready.wait(5)
        deadline = time.monotonic() + 5
        while True:  # until it is asleep in done.wait()
            text = Path(f"/proc/self/task/{seen['tid']}/stat").read_text()
            if text.rsplit(")", 1)[1].split()[0] == "S" or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    finally:
        done.set()
        thread.join()
    stat = parse_proc_stat_line(text)
    assert stat.comm == "x) (D 9 y)"
    assert stat.state == "S"  # waiting on the event, not the "D" inside its name
    assert stat.pid == int(seen["tid"])


@pytest.mark.parametrize("line, comm, state", [
    ("123 ((a) b)) S 1 123 123 0 -1 4194560 0 0", "(a) b)", "S"),
    ("7 (kworker/u4:2+dm-thin) D 2 0 0 0 -1 69238880 0", "kworker/u4:2+dm-thin", "D"),
    ("9 (tmux: server) Z 1 9 9 0 -1", "tmux: server", "Z"),
    ("10 () R 1 10", "", "R"),
])
def test_proc_stat_edge_cases(line: str, comm: str, state: str) -> None:
    stat = parse_proc_stat_line(line)
    assert (stat.comm, stat.state) == (comm, state)


@pytest.mark.parametrize("garbage", ["", "123 no parens S 1", "5 (x)"])
def test_proc_stat_rejects_garbage(garbage: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_stat_line(garbage)


def test_context_switches_of_this_process_move() -> None:
    first = parse_context_switches(Path("/proc/self/status").read_text())
    time.sleep(0.01)  # sleeping is a voluntary switch
    assert parse_context_switches(Path("/proc/self/status").read_text()) > first


def test_meminfo_of_this_machine() -> None:
    info = parse_meminfo(Path("/proc/meminfo").read_text())
    physical_kb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    assert info.total_kb == physical_kb
    assert 0 < info.available_kb <= info.total_kb
    assert 0.0 < info.available_fraction <= 1.0


def test_meminfo_without_memavailable_falls_back_to_memfree() -> None:
    info = parse_meminfo("MemTotal:  1000 kB\nMemFree:    30 kB\nBuffers:  5 kB\n")
    assert info.available_fraction == pytest.approx(0.03)
    with pytest.raises(ValueError):
        parse_meminfo("Buffers: 5 kB\n")


def test_cpu_times_of_this_machine() -> None:
    before = parse_cpu_times(Path("/proc/stat").read_text())
    time.sleep(0.1)
    after = parse_cpu_times(Path("/proc/stat").read_text())
    assert after.total > before.total
    assert 0.0 <= iowait_share(before, after) <= 1.0
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    assert before.iowait == int(fields[5]) or after.iowait >= before.iowait  # the 5th number


def test_iowait_share_clamps_a_counter_that_stepped_back() -> None:
    line = "cpu  100 0 100 {idle} {iowait} 0 0 0 0 0\n"
    before = parse_cpu_times(line.format(idle=500, iowait=300))
    after = parse_cpu_times(line.format(idle=700, iowait=290))
    assert iowait_share(before, after) == 0.0
    assert iowait_share(before, before) == 0.0


def test_kmsg_record_read_from_this_machine() -> None:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        pytest.skip(f"/dev/kmsg unreadable here: {exc.strerror}")
    try:
        raw = os.read(fd, 8192).decode()
    finally:
        os.close(fd)
    record = parse_kmsg_record(raw)
    assert record is not None
    assert record.sequence >= 0 and record.usec >= 0 and 0 <= record.level <= 7
    assert "\n" not in record.message and record.message


def test_kmsg_record_edge_cases() -> None:
    record = parse_kmsg_record("11,1234,567890,-,caller=T1;flyio: BUG: x; with; semicolons\n"
                               " SUBSYSTEM=block\n DEVICE=b7:0\n")
    assert (record.facility, record.level, record.sequence, record.usec) == (1, 3, 1234, 567890)
    assert record.message == "flyio: BUG: x; with; semicolons"  # dictionary lines dropped
    assert parse_kmsg_record(" SUBSYSTEM=block") is None
    assert parse_kmsg_record("x,y,z,-;msg") is None


def test_dmesg_json_of_this_machine() -> None:
    try:
        plain = parse_dmesg_json(run_command(["dmesg", "--json"], timeout=10).stdout)
        named = parse_dmesg_json(run_command(["dmesg", "--json", "-x"], timeout=10).stdout)
    except ManagerError as exc:
        pytest.skip(f"dmesg unusable here: {exc}")
    assert plain and named
    assert plain[0].message == named[0].message and plain[0].level == named[0].level
    assert all(r.sequence == -1 for r in plain)
    assert [r.usec for r in plain] == sorted(r.usec for r in plain)


# -- a fake /proc tree: real formats, chosen values ---------------------------------------

MEMINFO = ("MemTotal:       {total} kB\nMemFree:          812000 kB\nMemAvailable:   {available} kB\n"
           "Buffers:           12000 kB\nCached:           300000 kB\n")
CPU = "cpu  {user} 0 {system} {idle} {iowait} 0 1236 707 0 0\ncpu0 1 0 1 1 1 0 0 0 0 0\nctxt 1\n"
STATUS = "Name:\t{comm}\nState:\tD (disk sleep)\nvoluntary_ctxt_switches:\t{vol}\nnonvoluntary_ctxt_switches:\t3\n"


class FakeProc:
    """A /proc tree in tmp_path; `sleep` (the checks' only pause) applies queued changes."""

    def __init__(self, root: Path) -> None:
        self.root = root / "proc"
        (self.root / "sys/kernel/random").mkdir(parents=True)
        (self.root / "sys/kernel/random/boot_id").write_text("11111111-2222-3333-4444-555555555555\n")
        self.set_memory(total=24_000_000, available=20_000_000)
        self.cpu_after = (1000, 100, 9000, 0)
        self.set_cpu(1000, 100, 9000, 0)
        self.on_sleep: list[Callable[[], None]] = []
        self.dmesg_records: list[dict[str, object]] = []
        self.usec_now = 10_000_000

    def set_memory(self, total: int, available: int) -> None:
        (self.root / "meminfo").write_text(MEMINFO.format(total=total, available=available))

    def set_cpu(self, user: int, system: int, idle: int, iowait: int) -> None:
        (self.root / "stat").write_text(CPU.format(user=user, system=system, idle=idle, iowait=iowait))

    def add_process(self, pid: int, comm: str, state: str, switches: int = 10, wchan: str = "0") -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(f"{pid} ({comm}) {state} 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 20 0 1 0 100\n")
        (d / "status").write_text(STATUS.format(comm=comm, vol=switches))
        (d / "wchan").write_text(wchan)

    def sleep(self, seconds: float) -> None:
        for change in self.on_sleep:
            change()
        self.set_cpu(*self.cpu_after)

    def dmesg(self) -> str:
        return json.dumps({"dmesg": self.dmesg_records})

    def log(self, seconds: float, msg: str, pri: int = 3) -> None:
        self.dmesg_records.append({"pri": pri, "time": seconds, "msg": msg})

    def reader(self) -> ProcReader:
        return ProcReader(proc=self.root, kmsg=self.root / "no-kmsg", dmesg=self.dmesg, sleep=self.sleep,
                          monotonic_usec=lambda: self.usec_now)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def checker(fake: FakeProc, tmp_path: Path, pool: PoolStatus | None = None, **thresholds: object) -> SystemHealthChecker:
    return SystemHealthChecker(pool_status=(lambda: pool) if pool else None,
                               thresholds=HealthThresholds(**thresholds), state_dir=tmp_path / "state",
                               reader=fake.reader())


def healthy_pool(**overrides: object) -> PoolStatus:
    fields: dict[str, object] = dict(backend="blockfile", exists=True, used_data_blocks=100, total_data_blocks=1000,
                                     used_metadata_blocks=10, total_metadata_blocks=100, data_block_bytes=65536)
    fields.update(overrides)
    return PoolStatus(**fields)  # type: ignore[arg-type]


def test_fake_tree_is_healthy(fake: FakeProc, tmp_path: Path) -> None:
    fake.add_process(300, "bash", "S")
    fake.add_process(301, "jbd2/loop3-8", "S")
    report = checker(fake, tmp_path, healthy_pool()).check_all()
    assert report.passed, report.summary()
    assert report.summary() == ""
    assert [r.name for r in report.results] == ["dstate", "pool", "kernel_log", "memory_pressure", "io_wait"]


def test_memory_pressure_blocks_below_five_percent(fake: FakeProc, tmp_path: Path) -> None:
    fake.set_memory(total=24_000_000, available=744_000)  # 3.1%
    report = checker(fake, tmp_path).check_all()
    assert not report.passed
    assert report.summary() == "memory_pressure: available 3.1% < 5%"
    fake.set_memory(total=24_000_000, available=1_300_000)  # 5.4%
    assert checker(fake, tmp_path).check_memory().passed
    assert not checker(fake, tmp_path, min_memory_available=0.10).check_memory().passed


def test_iowait_blocks_above_half(fake: FakeProc, tmp_path: Path) -> None:
    fake.cpu_after = (1060, 110, 9050, 280)  # 280 of 400 new ticks in iowait: 70%
    result = checker(fake, tmp_path).check_iowait()
    assert not result.passed and result.reading == "iowait 70% > 50%"
    assert checker(fake, tmp_path, max_iowait=0.75).check_iowait().passed


def test_iowait_window_is_the_pause_between_samples(fake: FakeProc, tmp_path: Path) -> None:
    pauses: list[float] = []
    reader = fake.reader()
    reader.sleep = lambda seconds: pauses.append(seconds)
    SystemHealthChecker(None, HealthThresholds(iowait_window_seconds=0.25), reader=reader).check_iowait()
    assert pauses == [0.25]


def test_iowait_reuses_a_recent_sample_and_waits_only_for_the_rest() -> None:
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    c = SystemHealthChecker(None, HealthThresholds(iowait_window_seconds=0.3), reader=ProcReader(sleep=sleep))
    c.check_iowait()
    assert pauses == [0.3]  # nothing to reuse: a full window
    result = c.check_iowait()
    assert len(pauses) == 1  # back to back: the first check's first sample is a window old
    assert result.detail.startswith("over 0.3")
    time.sleep(0.65)  # every sample is now over two windows old: stale
    c.check_iowait()
    assert pauses[1:] == [0.3]
    fresh = SystemHealthChecker(None, HealthThresholds(iowait_window_seconds=0.3), reader=ProcReader(sleep=sleep))
    fresh.start_sampler()
    fresh.stop_sampler()  # one sample, now
    time.sleep(0.1)
    fresh.check_iowait()
    assert 0.05 < pauses[2] < 0.21  # the sampler's sample started the window


def test_dstate_blocks_on_a_stuck_dm_process(fake: FakeProc, tmp_path: Path) -> None:
    fake.add_process(4242, "kworker/u4:2+dm-thin", "D", wchan="dm_bufio_lock")
    fake.add_process(4243, "bash", "D")  # not ours: does not count
    result = checker(fake, tmp_path).check_dstate()
    assert not result.passed
    assert result.reading == "1 process(es) in D state: kworker/u4:2+dm-thin[4242]"
    assert "wchan dm_bufio_lock" in result.detail
    for comm in ("loop3", "mkfs.ext4", "umount", "jbd2/loop3-8", "dmsetup", "losetup", "kdmflush"):
        fake.add_process(5000, comm, "D")
        assert not checker(fake, tmp_path).check_dstate().passed, comm


def test_dstate_that_clears_or_runs_during_confirmation_passes(fake: FakeProc, tmp_path: Path) -> None:
    fake.add_process(4242, "mkfs.ext4", "D", switches=10)
    fake.on_sleep = [lambda: fake.add_process(4242, "mkfs.ext4", "D", switches=11)]  # it ran in between
    assert checker(fake, tmp_path).check_dstate().passed
    fake.add_process(4242, "mkfs.ext4", "D", switches=10)
    fake.on_sleep = [lambda: fake.add_process(4242, "mkfs.ext4", "R", switches=10)]
    assert checker(fake, tmp_path).check_dstate().passed
    fake.add_process(4242, "mkfs.ext4", "D", switches=10)
    fake.on_sleep = [lambda: fake.add_process(4242, "mkfs.ext4", "D", switches=11)]
    assert not checker(fake, tmp_path, dstate_confirm_seconds=0).check_dstate().passed  # one sample
    assert checker(fake, tmp_path, dstate_pattern=r"^dmsetup$").check_dstate().passed


@pytest.mark.parametrize("overrides, reading", [
    ({"exists": False}, "pool does not exist"),
    ({"needs_check": True}, "pool needs_check"),
    ({"read_only": True}, "pool is read-only"),
    ({"out_of_data_space": True}, "pool is out of data space"),
    ({"error_state": True}, "pool is in error state"),
    ({"used_data_blocks": 960}, "data 96% used >= 95%"),
    ({"used_metadata_blocks": 97}, "metadata 97% used >= 95%"),
])
def test_pool_failures(fake: FakeProc, tmp_path: Path, overrides: dict[str, object], reading: str) -> None:
    result = checker(fake, tmp_path, healthy_pool(**overrides)).check_pool()
    assert not result.passed and result.reading == reading


def test_pool_warns_above_eighty_percent_without_blocking(fake: FakeProc, tmp_path: Path) -> None:
    result = checker(fake, tmp_path, healthy_pool(used_data_blocks=850)).check_pool()
    assert result.passed and "data 85% used" in result.reading and "warning: above 80%" in result.reading
    assert "warning" not in checker(fake, tmp_path, healthy_pool()).check_pool().reading
    assert not checker(fake, tmp_path, healthy_pool(used_data_blocks=850), block_pool_data_used=0.85).check_pool().passed


def test_kernel_log_from_dmesg_reports_each_error_once(fake: FakeProc, tmp_path: Path) -> None:
    fake.log(1.0, "Out of memory: Killed process 99 (old)")  # before the first check: not ours
    fake.log(2.0, "EXT4-fs (dm-3): mounted filesystem r/w with ordered data mode", pri=6)
    first = checker(fake, tmp_path).check_kernel_log()
    assert first.passed and "dmesg" in first.detail
    fake.log(3.0, "device-mapper: thin: 253:2: switching pool to out-of-data-space (queue IO) mode", pri=4)
    fake.log(4.0, "EXT4-fs (dm-4): mounted filesystem r/w with ordered data mode", pri=6)
    fake.log(5.0, "INFO: task mkfs.ext4:812 blocked for more than 120 seconds.")
    second = checker(fake, tmp_path).check_kernel_log()  # a new checker: the cursor is on disk
    assert not second.passed
    assert second.reading == ("2 kernel error(s) since last check, latest: "
                              "INFO: task mkfs.ext4:812 blocked for more than 120 seconds.")
    assert "out-of-data-space" in second.detail and "mounted filesystem" not in second.detail
    assert checker(fake, tmp_path).check_kernel_log().passed  # seen: not again


@pytest.mark.parametrize("message", [
    "BUG: unable to handle page fault for address: ffff", "Kernel panic - not syncing: Fatal exception",
    "Oops: general protection fault", "oom-kill:constraint=CONSTRAINT_NONE,task=python3,pid=1",
    "blk_update_request: I/O error, dev loop3, sector 2048", "I/O error, dev dm-3, sector 0 op 0x1:(WRITE)",
    "Buffer I/O error on dev dm-5, logical block 0", "EXT4-fs error (device dm-2): ext4_find_entry",
    "device-mapper: table: 253:4: thin: Couldn't open thin internal device: error",
])
def test_default_kernel_patterns_match(fake: FakeProc, tmp_path: Path, message: str) -> None:
    c = checker(fake, tmp_path)
    c.check_kernel_log()
    fake.log(11.0, message)
    assert not c.check_kernel_log().passed


@pytest.mark.parametrize("message", [
    "EXT4-fs (dm-3): mounted filesystem 1c9f r/w with ordered data mode. Quota mode: none.",
    "loop3: detected capacity change from 0 to 131072",
    "device-mapper: thin: Data device (dm-1) discard unsupported: Disabling discard passdown.",
    "device-mapper: ioctl: 4.48.0-ioctl (2023-03-01) initialised: dm-devel@lists.linux.dev",
])
def test_benign_kernel_messages_pass(fake: FakeProc, tmp_path: Path, message: str) -> None:
    c = checker(fake, tmp_path)
    c.check_kernel_log()
    fake.log(11.0, message, pri=6)
    assert c.check_kernel_log().passed


def test_kernel_log_lookback_and_reboot(fake: FakeProc, tmp_path: Path) -> None:
    fake.log(1.0, "BUG: long ago")
    fake.log(9.5, "BUG: half a second ago")  # the fake clock says 10 s since boot
    result = checker(fake, tmp_path, kernel_lookback_seconds=2).check_kernel_log()
    assert not result.passed and result.reading.startswith("1 kernel error(s)") and "half a second" in result.reading
    # After a reboot the sequence numbers and times restart: the old cursor must not apply.
    (fake.root / "sys/kernel/random/boot_id").write_text("99999999-2222-3333-4444-555555555555\n")
    fake.dmesg_records = [{"pri": 3, "time": 0.5, "msg": "BUG: during boot"}]
    assert checker(fake, tmp_path).check_kernel_log().passed  # first check of this boot: from now
    fake.log(0.7, "BUG: after the first check")
    assert not checker(fake, tmp_path).check_kernel_log().passed


def test_kernel_log_unavailable_passes_and_says_so(fake: FakeProc, tmp_path: Path) -> None:
    def no_dmesg() -> str:
        raise ManagerError("dmesg: read kernel buffer failed: Operation not permitted")

    reader = fake.reader()
    reader.dmesg = no_dmesg
    result = SystemHealthChecker(None, reader=reader).check_kernel_log()
    assert result.passed and result.reading == "kernel log unavailable"
    assert "/dev/kmsg: absent" in result.detail and "Operation not permitted" in result.detail


def test_a_check_that_cannot_read_fails(fake: FakeProc, tmp_path: Path) -> None:
    (fake.root / "meminfo").unlink()

    def broken_pool() -> PoolStatus:
        raise ManagerError("dmsetup status pool timed out after 10s")

    c = SystemHealthChecker(broken_pool, state_dir=tmp_path, reader=fake.reader())
    failures = {r.name: r.reading for r in c.check_all().failures}
    assert set(failures) == {"memory_pressure", "pool"}
    assert failures["pool"] == "could not check: dmsetup status pool timed out after 10s"
    assert failures["memory_pressure"].startswith("could not check: ")


def test_as_guard_returns_none_or_the_summary(fake: FakeProc, tmp_path: Path) -> None:
    guard = checker(fake, tmp_path, healthy_pool()).as_guard()
    assert guard() is None
    fake.set_memory(total=1000, available=20)
    fake.cpu_after = (1000, 100, 9010, 90)
    assert checker(fake, tmp_path, healthy_pool(needs_check=True)).as_guard()() == (
        "pool: pool needs_check; memory_pressure: available 2.0% < 5%; io_wait: iowait 90% > 50%")


# -- the real checks on this host -----------------------------------------------------------


def test_real_checks_pass_on_this_host(tmp_path: Path) -> None:
    pool = healthy_pool()
    checker_ = SystemHealthChecker(lambda: pool, state_dir=tmp_path)
    report = checker_.check_all()
    by_name = {r.name: r for r in report.results}
    assert set(by_name) == {"dstate", "pool", "kernel_log", "memory_pressure", "io_wait"}
    assert by_name["memory_pressure"].passed, by_name["memory_pressure"].reading  # 24 GB, idle
    assert by_name["pool"].passed
    assert by_name["kernel_log"].passed  # the first check starts at the end of the log
    assert re.fullmatch(r"available \d+\.\d%", by_name["memory_pressure"].reading)
    assert re.fullmatch(r"iowait \d+(\.\d)?%( > 50%)?", by_name["io_wait"].reading)
    # dstate and io_wait depend on what else runs here; a failure must explain itself.
    for failure in report.failures:
        assert failure.reading and failure.name in report.summary()
        print(f"on this host now: {failure.name}: {failure.reading} ({failure.detail})")
    assert 450 <= report.duration_ms < 3000  # no sampler, no earlier sample: it waits out the 0.5 s window


def test_real_kmsg_line_is_caught_once(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("writing to /dev/kmsg needs root")
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY)
    except OSError as exc:
        pytest.skip(f"/dev/kmsg not writable here: {exc.strerror}")
    # Lines programs write land with the user facility; the default checker ignores them
    # (so this test cannot hold other tests' jobs); ours opts in.
    ours = SystemHealthChecker(None, HealthThresholds(kernel_include_user_messages=True, iowait_window_seconds=0),
                               state_dir=tmp_path / "a")
    kernel_only = SystemHealthChecker(None, HealthThresholds(iowait_window_seconds=0), state_dir=tmp_path / "b")
    assert ours.check_kernel_log().detail.startswith("source /dev/kmsg")
    kernel_only.check_kernel_log()
    marker = f"flyio-test: BUG: fake {uuid.uuid4().hex}"
    try:
        os.write(fd, f"<3>{marker}\n".encode())
    finally:
        os.close(fd)
    caught = ours.check_kernel_log()
    assert not caught.passed and marker in caught.detail
    assert marker not in ours.check_kernel_log().detail  # the cursor moved past it
    assert marker not in kernel_only.check_kernel_log().detail
    cursor = json.loads((tmp_path / "a/fsm/kmsg.cursor").read_text())
    assert cursor["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    fresh = SystemHealthChecker(None, HealthThresholds(kernel_include_user_messages=True), state_dir=tmp_path / "c")
    assert marker not in fresh.check_kernel_log().detail  # a first check starts from now


# -- thresholds from the operator's environment --------------------------------------------


def monitor_once(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`monitor --once` as an operator runs it, on a fresh state dir, with these variables."""
    state_dir = tmp_path / "state"
    repo = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "cli", "--state-dir", str(state_dir)]
    subprocess.run([*base, "fsm", "list"], cwd=repo, capture_output=True, timeout=60, check=True)  # creates the db
    return subprocess.run([*base, "monitor", "--once", "--backend", "blockfile"], cwd=repo, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_a_threshold_variable_reaches_the_real_checks(tmp_path: Path) -> None:
    shown = monitor_once(tmp_path, FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT="99.9")
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if "memory_pressure" in line)
    assert "FAIL" in line and "< 99.9%" in line, line
    default = monitor_once(tmp_path)
    line = next(line for line in default.stdout.splitlines() if "memory_pressure" in line)
    assert "PASS" in line, line


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("FLYIO_HEALTH_MAX_IOWAIT_PERCENT", "lots", "is not a percent from 0 to 100"),
    ("FLYIO_HEALTH_MIN_AVAILABLE_MEMORY_PERCENT", "150", "is not a percent from 0 to 100"),
    ("FLYIO_HEALTH_DSTATE_CONFIRM_SECONDS", "-1", "is not a number of seconds >= 0"),
])
def test_a_bad_threshold_variable_is_one_line_naming_it(tmp_path: Path, variable: str, value: str,
                                                       expected: str) -> None:
    shown = monitor_once(tmp_path, **{variable: value})
    assert shown.returncode == 1
    assert shown.stderr.strip().splitlines() == [f"error: {variable}={value!r} {expected}"], shown.stderr


def test_thresholds_from_env_converts_percents_and_keeps_the_rest() -> None:
    from safeguards.health import THRESHOLD_VARIABLES, thresholds_from_env

    assert thresholds_from_env({}) == HealthThresholds()
    changed = thresholds_from_env({"FLYIO_HEALTH_MAX_IOWAIT_PERCENT": "20", "FLYIO_HEALTH_BLOCK_POOL_DATA_PERCENT": "90",
                                   "FLYIO_HEALTH_IOWAIT_WINDOW_SECONDS": "1.5", "UNRELATED": "x"})
    assert (changed.max_iowait, changed.block_pool_data_used, changed.iowait_window_seconds) == (0.2, 0.9, 1.5)
    assert changed.min_memory_available == HealthThresholds().min_memory_available
    assert all(hasattr(HealthThresholds(), name) for name, _unit in THRESHOLD_VARIABLES.values())
