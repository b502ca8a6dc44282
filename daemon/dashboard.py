"""What `monitor` shows, read without writing anything: the database opened read-only
(no migration, no lock), the pool's status, and a health check round whose kernel-log
cursor lives in memory (the job guard's cursor file is not touched)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devices.base import PoolStatus
from devices.policy import ABOVE_THRESHOLD, UsagePolicy
from fsm.definition import FINAL_STATES
from safeguards.health import CheckResult, SystemHealthChecker
from support.errors import ManagerError
from support.paths import database_path
from support.reads import job_counts, recent_transitions, uncleaned_orphans, unfinished_jobs

RECENT_TRANSITIONS = 10


@dataclass(frozen=True)
class RunningJob:
    id: int
    state: str
    age_seconds: float
    idle_seconds: float
    owner_pid: int | None
    note: str | None


@dataclass(frozen=True)
class Transition:
    job_id: int
    from_state: str
    to_state: str
    event: str
    seconds: float
    finished_at: str


@dataclass(frozen=True)
class Orphan:
    device_name: str
    job_id: int | None
    reason: str
    detected_at: str


@dataclass(frozen=True)
class DashboardFrame:
    """One frame of the dashboard."""

    taken_at: datetime
    pool: PoolStatus
    jobs_by_state: dict[str, int]
    running: list[RunningJob]
    transitions: list[Transition]
    orphans: list[Orphan]
    health: list[CheckResult] = field(default_factory=list)
    policy: UsagePolicy = field(default_factory=UsagePolicy)


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def read_frame(state_dir: Path, pool_status: Callable[[], PoolStatus], checker: SystemHealthChecker,
               policy: UsagePolicy | None = None) -> DashboardFrame:
    """Gather one frame. The database is opened with mode=ro: monitor never writes."""
    db = database_path(state_dir)
    if not db.exists():
        raise ManagerError(f"database {db} does not exist; nothing to monitor (run process-image or setup-pool first)")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    try:
        by_state = job_counts(db)
        running = [RunningJob(r["id"], r["state"], (now - _parse_time(r["created_at"])).total_seconds(),
                              (now - _parse_time(r["updated_at"])).total_seconds(), r["owner_pid"], r["error"])
                   for r in unfinished_jobs(db, FINAL_STATES)]
        transitions = [Transition(r["job_id"], r["from_state"] or "", r["to_state"], r["event"],
                                  max(float(r["seconds"] or 0), 0.0), str(r["finished_at"])[:19])
                       for r in recent_transitions(db, RECENT_TRANSITIONS)]
        orphans = [Orphan(o["device_name"], o["job_id"], o["reason"], str(o["detected_at"])[:19])
                   for o in uncleaned_orphans(db)]
    except sqlite3.DatabaseError as exc:
        raise ManagerError(f"database {db}: {exc}") from None
    return DashboardFrame(taken_at=now, pool=pool_status(), jobs_by_state=by_state, running=running,
                          transitions=transitions, orphans=orphans, health=list(checker.check_all().results),
                          policy=policy or UsagePolicy())


# -- rendering ---------------------------------------------------------------------------

def usage_bar(fraction: float, width: int = 30, fancy: bool = True) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    full, empty = ("█", "░") if fancy else ("#", "-")
    return "[" + full * filled + empty * (width - filled) + "]"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _gib(blocks: int, block_bytes: int) -> str:
    return f"{blocks * block_bytes / 1024**3:.2f} GiB"


def pool_lines(pool: PoolStatus, fancy: bool, policy: UsagePolicy | None = None) -> list[str]:
    policy = policy or UsagePolicy()
    if not pool.exists:
        return ["pool: does not exist (run `flyio-image-manager setup-pool`)"]
    flags = [name for name, bad in (("needs_check", pool.needs_check), ("read_only", pool.read_only),
                                    ("error", pool.error_state), ("out_of_data_space", pool.out_of_data_space)) if bad]
    return [
        f"pool: backend={pool.backend} status={'healthy' if not flags else ','.join(flags)}",
        f"data      {usage_bar(pool.data_used_fraction, fancy=fancy)} {pool.data_used_fraction:6.1%} used "
        f"({_gib(pool.used_data_blocks, pool.data_block_bytes)} of {_gib(pool.total_data_blocks, pool.data_block_bytes)})",
        f"metadata  {usage_bar(pool.metadata_used_fraction, fancy=fancy)} {pool.metadata_used_fraction:6.1%} used "
        f"({pool.used_metadata_blocks} of {pool.total_metadata_blocks})",
        f"policy    {policy.describe()}" + (f"  WARNING: {ABOVE_THRESHOLD}" if policy.above_warning(pool) else "")
        + ("  above the high watermark: the daemon evicts images" if policy.above_high(pool) else ""),
    ]


def render_plain(frame: DashboardFrame) -> str:
    """The frame as plain text (for --once when stdout is not a terminal): one fact per line."""
    out = [f"flyio-image-manager monitor  {frame.taken_at:%Y-%m-%d %H:%M:%S} UTC", ""]
    out += pool_lines(frame.pool, fancy=False, policy=frame.policy)
    jobs = " ".join(f"{state}={count}" for state, count in sorted(frame.jobs_by_state.items())) or "none"
    out += ["", f"jobs: {jobs}", f"running jobs: {len(frame.running)}"]
    out += [f"  job {j.id} state={j.state} age={_age(j.age_seconds)} updated={_age(j.idle_seconds)} ago"
            f" pid={j.owner_pid or '-'}" + (f" note={j.note}" if j.note else "") for j in frame.running]
    out += ["", f"recent transitions: {len(frame.transitions)}"]
    out += [f"  job {t.job_id} {t.from_state or '-'} -> {t.to_state} ({t.event}) {t.seconds:.2f}s at {t.finished_at}"
            for t in frame.transitions]
    out += ["", f"orphaned devices: {len(frame.orphans)}"]
    out += [f"  {o.device_name} job={o.job_id} detected={o.detected_at} reason={o.reason}" for o in frame.orphans]
    out += ["", "health checks:"]
    out += [f"  {r.name:<16} {'PASS' if r.passed else 'FAIL'}  {r.reading}" for r in frame.health]
    return "\n".join(out)


def render_rich(frame: DashboardFrame) -> RenderableType:
    """The frame as rich panels and tables, for the live terminal dashboard."""
    pool = Text("\n".join(pool_lines(frame.pool, fancy=True, policy=frame.policy)))
    jobs = Table(show_header=True, header_style="bold", expand=False, box=None)
    for state in sorted(frame.jobs_by_state):
        jobs.add_column(state, justify="right")
    if frame.jobs_by_state:
        jobs.add_row(*(str(frame.jobs_by_state[s]) for s in sorted(frame.jobs_by_state)))

    running = Table("job", "state", "age", "updated", "pid", "note", box=None, header_style="bold")
    for j in frame.running:
        running.add_row(str(j.id), j.state, _age(j.age_seconds), f"{_age(j.idle_seconds)} ago", str(j.owner_pid or "-"),
                        j.note or "")
    transitions = Table("job", "from", "to", "event", "took", "at (UTC)", box=None, header_style="bold")
    for t in frame.transitions:
        transitions.add_row(str(t.job_id), t.from_state or "-", t.to_state, t.event, f"{t.seconds:.2f}s", t.finished_at)
    orphans = Table("device", "job", "detected", "reason", box=None, header_style="bold")
    for o in frame.orphans:
        orphans.add_row(o.device_name, str(o.job_id or "-"), o.detected_at, o.reason)
    health = Table("check", "result", "reading", box=None, header_style="bold")
    for r in frame.health:
        health.add_row(r.name, Text("PASS", style="green") if r.passed else Text("FAIL", style="bold red"), r.reading)
    return Group(
        Text(f"flyio-image-manager monitor  {frame.taken_at:%Y-%m-%d %H:%M:%S} UTC   (Ctrl-C to quit)", style="bold"),
        Panel(pool, title="Pool"),
        Panel(jobs if frame.jobs_by_state else Text("no jobs"), title="Jobs by state"),
        Panel(running if frame.running else Text("none"), title=f"Running jobs ({len(frame.running)})"),
        Panel(transitions if frame.transitions else Text("none"), title=f"Recent transitions (last {RECENT_TRANSITIONS})"),
        Panel(orphans if frame.orphans else Text("none"), title=f"Orphaned devices ({len(frame.orphans)})"),
        Panel(health, title="Health checks"),
    )
