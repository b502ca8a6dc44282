"""Pure parsers of the /proc and /dev/kmsg formats the health checks read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str


def parse_proc_stat_line(text: str) -> ProcStat:
    """/proc/<pid>/stat: `pid (comm) state ...`; comm may hold spaces and ')', so split at the last ')'."""
    open_paren, close_paren = text.index("("), text.rindex(")")
    pid = int(text[:open_paren].strip())
    comm = text[open_paren + 1:close_paren]
    state = text[close_paren + 1:].split()[0]
    return ProcStat(pid=pid, comm=comm, state=state)


@dataclass(frozen=True)
class MemInfo:
    total_kb: int
    available_kb: int

    @property
    def available_fraction(self) -> float:
        return self.available_kb / self.total_kb if self.total_kb else 1.0


def parse_meminfo(text: str) -> MemInfo:
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name.strip()] = int(fields[0])
    return MemInfo(total_kb=values.get("MemTotal", 0), available_kb=values.get("MemAvailable", values.get("MemFree", 0)))


@dataclass(frozen=True)
class CpuTimes:
    total: int
    iowait: int


def parse_cpu_times(text: str) -> CpuTimes:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            numbers = [int(x) for x in line.split()[1:]]
            # guest and guest_nice are already counted in user and nice
            return CpuTimes(total=sum(numbers[:8]), iowait=numbers[4] if len(numbers) > 4 else 0)
    raise ValueError("no aggregate cpu line in /proc/stat")


def iowait_share(before: CpuTimes, after: CpuTimes) -> float:
    elapsed = after.total - before.total
    return (after.iowait - before.iowait) / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class KmsgRecord:
    priority: int
    sequence: int
    usec: int
    message: str


def parse_kmsg_line(text: str) -> KmsgRecord | None:
    """A /dev/kmsg record, `pri,seq,usec,flags[,...];message`; None for continuation lines."""
    header, sep, message = text.partition(";")
    if not sep:
        return None
    fields = header.split(",")
    try:
        return KmsgRecord(priority=int(fields[0]) & 7, sequence=int(fields[1]), usec=int(fields[2]),
                          message=message.rstrip("\n"))
    except (IndexError, ValueError):
        return None
