"""Pure parsers of the /proc, /dev/kmsg and `dmesg --json` formats the health checks read.

No I/O here: each function takes the text of one file (or record) and returns plain data,
so each can be tested against real captured text and hand-made edge cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the D-state check needs."""

    pid: int
    comm: str
    state: str
    ppid: int


def parse_proc_stat_line(text: str) -> ProcStat:
    """/proc/<pid>/stat: `pid (comm) state ppid ...`.

    comm is up to 15 bytes chosen by the process and may hold spaces and parentheses,
    e.g. `(a) b)`, so it runs from the first '(' to the *last* ')'."""
    open_paren, close_paren = text.find("("), text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:60]!r}")
    rest = text[close_paren + 1:].split()
    if len(rest) < 2:
        raise ValueError(f"truncated /proc/<pid>/stat line: {text[:60]!r}")
    return ProcStat(pid=int(text[:open_paren]), comm=text[open_paren + 1:close_paren], state=rest[0],
                    ppid=int(rest[1]))


def parse_context_switches(status_text: str) -> int:
    """voluntary + nonvoluntary context switches from /proc/<pid>/status.

    A process that stays in D state between two samples is never scheduled, so this
    count does not move: the D-state check's test of "stuck" rather than "briefly waiting"."""
    total = 0
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            total += int(value.split()[0])
    return total


@dataclass(frozen=True)
class MemInfo:
    """MemTotal and MemAvailable from /proc/meminfo, in kB."""

    total_kb: int
    available_kb: int

    @property
    def available_fraction(self) -> float:
        return self.available_kb / self.total_kb if self.total_kb else 1.0


def parse_meminfo(text: str) -> MemInfo:
    """/proc/meminfo (`MemTotal:  24684092 kB` lines). MemAvailable exists since Linux
    3.14; before that MemFree is the (pessimistic) stand-in."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name.strip()] = int(fields[0])
    if "MemTotal" not in values:
        raise ValueError("no MemTotal in /proc/meminfo")
    return MemInfo(total_kb=values["MemTotal"], available_kb=values.get("MemAvailable", values.get("MemFree", 0)))


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in clock ticks since boot."""

    total: int
    iowait: int


def parse_cpu_times(text: str) -> CpuTimes:
    """The first (`cpu `) line of /proc/stat: user nice system idle iowait irq softirq
    steal guest guest_nice. guest and guest_nice are already inside user and nice."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            numbers = [int(x) for x in line.split()[1:]]
            if len(numbers) < 5:
                raise ValueError(f"short cpu line in /proc/stat: {line!r}")
            return CpuTimes(total=sum(numbers[:8]), iowait=numbers[4])
    raise ValueError("no aggregate cpu line in /proc/stat")


def iowait_share(before: CpuTimes, after: CpuTimes) -> float:
    """The share of all CPU time spent in iowait between two samples, 0..1.

    The kernel's iowait counter may step backwards on tickless CPUs; clamp at 0."""
    elapsed = after.total - before.total
    if elapsed <= 0:
        return 0.0
    return min(1.0, max(0, after.iowait - before.iowait) / elapsed)


@dataclass(frozen=True)
class KernelRecord:
    """One kernel log record. `sequence` is -1 when the source (dmesg) has none."""

    level: int       # 0 emerg .. 7 debug
    facility: int    # 0 kernel, 1 user (e.g. written to /dev/kmsg by a program), ...
    sequence: int
    usec: int        # since boot (the kernel's local clock)
    message: str     # the first line only; /dev/kmsg's " KEY=value" dictionary dropped


def parse_kmsg_record(text: str) -> KernelRecord | None:
    """One read() of /dev/kmsg: `pri,seq,usec,flags[,...];message\\n[ KEY=value\\n...]`.

    pri is facility*8 + level. None for anything that is not a record header."""
    header, sep, body = text.partition(";")
    if not sep:
        return None
    fields = header.split(",")
    try:
        pri, sequence, usec = int(fields[0]), int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None
    return KernelRecord(level=pri & 7, facility=pri >> 3, sequence=sequence, usec=usec,
                        message=body.split("\n", 1)[0])


def parse_dmesg_json(text: str) -> list[KernelRecord]:
    """`dmesg --json` (util-linux >= 2.34): {"dmesg": [{"pri": 6, "time": 1.5, "msg": "..."}]}.

    Without -x, "pri" is the level alone; with -x, "fac" and "pri" are names, handled too."""
    levels = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warn": 4, "notice": 5, "info": 6, "debug": 7}
    records = []
    for entry in json.loads(text).get("dmesg", []):
        pri = entry.get("pri", 6)
        level = levels.get(pri, 6) if isinstance(pri, str) else int(pri) & 7
        records.append(KernelRecord(level=level, facility=0, sequence=-1,
                                    usec=int(round(float(entry.get("time", 0)) * 1_000_000)),
                                    message=str(entry.get("msg", "")).split("\n", 1)[0]))
    return records
