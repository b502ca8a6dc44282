"""The `fsm` command group: list, show, history, abort, retry, resume, graph.

Generic: the product hands it an FsmApp that knows its workflows, how to open the
store and how to take the manager lock. Mounted as `fsm` and `flyio-image-manager fsm`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fsm.definition import ABORTED, COMPLETE, FINAL_STATES, Workflow
from fsm.ownership import owner_alive
from support.errors import ManagerError

if TYPE_CHECKING:  # SQLAlchemy and transitions load only in the commands that use them
    from fsm.models import Job, JobEvent, JobNote
    from fsm.runner import Runner
    from fsm.store import JobStore


@dataclass(frozen=True)
class FsmApp:
    """What the generic CLI needs from the product."""

    workflows: Callable[[], dict[str, Workflow]]
    open_store: Callable[[Path], JobStore]
    open_database: Callable[[Path], Path]  # the checked, migrated database file (for sqlite3 reads)
    open_runner: Callable[[Path, bool], Runner]  # (state_dir, will_run_jobs)
    exclusive: Callable[[Path, str], AbstractContextManager[Any]]
    state_dir: Callable[[click.Context], Path]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") + "Z" if value else None


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "workflow": job.workflow, "key": job.idempotency_key, "state": job.state,
        "attempt": job.attempt, "error": job.error, "owner_pid": job.owner_pid,
        "created_at": _iso(job.created_at), "updated_at": _iso(job.updated_at),
    }


def _ms(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds() * 1000, 1)


def event_summary(event: JobEvent) -> dict[str, Any]:
    """A transition as `fsm history --json` shows it; `detail` is the workflow's description."""
    return {
        "kind": "transition", "seq": event.seq, "from": event.from_state, "to": event.to_state, "event": event.event,
        "started_at": _iso(event.started_at), "finished_at": _iso(event.finished_at),
        "duration_ms": _ms(event.started_at, event.finished_at),
        "attempt": event.attempt, "error": event.error, "detail": json.loads(event.detail) if event.detail else None,
    }


def note_summary(note: JobNote) -> dict[str, Any]:
    """A wait episode or an abort request as `fsm history --json` shows it."""
    from fsm.models import NoteKind

    reasons = json.loads(note.reasons)
    if note.kind == NoteKind.ABORT_REQUEST.value:
        return {"kind": note.kind, "state": note.state, "requested_at": _iso(note.started_at),
                "requested_by_pid": note.requested_by_pid, "reason": reasons[0] if reasons else None}
    return {"kind": note.kind, "state": note.state, "event": note.event, "started_at": _iso(note.started_at),
            "finished_at": _iso(note.finished_at), "duration_ms": _ms(note.started_at, note.finished_at),
            "waits": note.waits, "reasons": reasons, "outcome": note.outcome}


def job_history(store: JobStore, job_id: int) -> list[dict[str, Any]]:
    """Transitions and notes in the order they happened: a transition when it committed, a
    wait when it began, an abort request when it was made."""
    rows: list[tuple[datetime, dict[str, Any]]] = [(e.finished_at, event_summary(e)) for e in store.history(job_id)]
    rows += [(n.started_at, note_summary(n)) for n in store.notes(job_id)]
    return [row for _, row in sorted(rows, key=lambda pair: pair[0])]


def job_now(job: Job, store: JobStore, workflow: Workflow | None) -> dict[str, Any]:
    """What the job is doing now: owner and liveness, the wait it is in, a pending abort,
    and the workflow's own summary (for the image job: the current layer, its devices)."""
    from fsm.models import NoteKind
    from fsm.store import load_context, utcnow

    now = utcnow()
    alive = owner_alive(job.owner_pid, job.owner_boot_id, job.lease_expires_at, now)
    waiting = None
    if job.waiting_since is not None and alive:
        waiting = {"since": _iso(job.waiting_since), "seconds": round((now - job.waiting_since).total_seconds(), 1),
                   "reason": job.error}
    abort = None
    if job.abort_requested and job.state not in FINAL_STATES:
        requests = [n for n in store.notes(job.id) if n.kind == NoteKind.ABORT_REQUEST.value]
        last = requests[-1] if requests else None
        abort = {"reason": job.abort_requested, "requested_by_pid": last.requested_by_pid if last else None,
                 "requested_at": _iso(last.started_at) if last else None}
    described = workflow.detail(job.state, load_context(job), None) if workflow is not None else None
    return {"owner_alive": alive, "waiting": waiting, "abort_pending": abort, "now": described}


def _show_lines(detail: dict[str, Any]) -> list[str]:
    lines = [f"{key + ':':<18}{detail[key]}" for key in ("id", "workflow", "key", "state", "attempt", "error")
             if detail[key] is not None]
    if detail["owner_pid"] is not None:
        lines.append(f"{'owner:':<18}pid {detail['owner_pid']} ({'alive' if detail['owner_alive'] else 'gone'})")
    waiting = detail["waiting"]
    lines.append(f"{'waiting:':<18}" + (f"since {waiting['since']} ({waiting['seconds']:g}s): {waiting['reason']}" if waiting else "no"))
    abort = detail["abort_pending"]
    if abort:
        lines.append(f"{'abort pending:':<18}{abort['reason']} (asked by pid {abort['requested_by_pid']} at "
                     f"{abort['requested_at']}; lands at the job's next safe point)")
    for key, value in (detail["now"] or {}).items():
        shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        lines.append(f"{('now' if key == 'text' else key) + ':':<18}{shown}")
    lines += [f"{key + ':':<18}{detail[key]}" for key in ("created_at", "updated_at", "lease_expires_at")
              if detail[key] is not None]
    lines.append(f"{'context:':<18}{json.dumps(detail['context'], sort_keys=True)}")
    return lines


def _history_line(row: dict[str, Any]) -> list[str]:
    from fsm.models import NoteKind

    if row["kind"] == "transition":
        lines = [f"{row['seq']:>4}  {row['event']:<16} {row['from'] or '-':<16} {row['to']:<16} {row['started_at']:<24} "
                 f"{row['duration_ms']:>8.1f}ms  {row['attempt']:<7}  {(row['detail'] or {}).get('text', '')}".rstrip()]
        return lines + ([f"{'':>6}error: {row['error']}"] if row["error"] else [])
    if row["kind"] == NoteKind.ABORT_REQUEST.value:
        return [f"{'-':>4}  {row['kind']:<16} {row['state']:<16} {'-':<16} {row['requested_at']:<24} {'':>10}  "
                f"{'':<7}  by pid {row['requested_by_pid']}: {row['reason']}"]
    held = f"{row['event']}, " if row["event"] else ""
    return [f"{'-':>4}  {row['kind']:<16} {row['state']:<16} {'-':<16} {row['started_at']:<24} "
            f"{row['duration_ms']:>8.1f}ms  {row['waits']:<7}  {held}{row['outcome']}: {' | '.join(row['reasons'])}"]


def wait_until_final(store: JobStore, job_id: int, timeout: float, poll: float = 0.1) -> Job:
    """The job once it is final, or as it stands when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    job = store.get(job_id)
    while job.state not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(poll)
        job = store.get(job_id)
    return job


def make_fsm_group(app: FsmApp) -> click.Group:
    """Build the `fsm` click group around `app`."""

    @click.group(name="fsm", help="Inspect and steer durable jobs.")
    def group() -> None:
        pass

    def store(ctx: click.Context) -> JobStore:
        return app.open_store(app.state_dir(ctx))

    @group.command("list", help="List jobs, optionally only those in one state.")
    @click.option("--state", "state", default=None, help="Only jobs in this state.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def list_cmd(ctx: click.Context, state: str | None, as_json: bool) -> None:
        from support.reads import list_job_summaries

        jobs = list_job_summaries(app.open_database(app.state_dir(ctx)), state)
        if as_json:
            click.echo(json.dumps(jobs, indent=2))
            return
        click.echo(f"{'ID':>5}  {'WORKFLOW':<8} {'STATE':<16} {'ATTEMPT':>7}  {'UPDATED':<24} KEY")
        for j in jobs:
            click.echo(f"{j['id']:>5}  {j['workflow']:<8} {j['state']:<16} {j['attempt']:>7}  {j['updated_at']:<24} {j['key']}")
            if j["error"]:
                click.echo(f"{'':>7}error: {j['error']}")

    @group.command("show", help="Show one job: state, owner, what it waits on, pending abort, current work.")
    @click.argument("job_id", type=int)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def show_cmd(ctx: click.Context, job_id: int, as_json: bool) -> None:
        from fsm.store import load_context

        jobs = store(ctx)
        job = jobs.get(job_id)
        detail = job_summary(job) | {"context": load_context(job), "lease_expires_at": _iso(job.lease_expires_at),
                                     "abort_requested": job.abort_requested}
        detail |= job_now(job, jobs, app.workflows().get(job.workflow))
        if as_json:
            click.echo(json.dumps(detail, indent=2))
            return
        click.echo("\n".join(_show_lines(detail)))

    @group.command("history", help="Every transition, wait and abort request of a job, in order.")
    @click.argument("job_id", type=int)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def history_cmd(ctx: click.Context, job_id: int, as_json: bool) -> None:
        rows = job_history(store(ctx), job_id)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(f"{'SEQ':>4}  {'EVENT':<16} {'FROM':<16} {'TO':<16} {'STARTED':<24} {'DURATION':>10}  "
                   f"{'ATTEMPT':<7}  DETAIL")
        for row in rows:
            click.echo("\n".join(_history_line(row)))

    @group.command("abort", help="Abort a job; what it made is recorded as orphaned, nothing is cleaned. "
                                 "A job a live process runs stops at its next safe point.")
    @click.argument("job_id", type=int)
    @click.option("--reason", default="aborted by operator", show_default=True)
    @click.option("--wait", "wait", is_flag=True, help="Return once the job is aborted (exit 1 on timeout).")
    @click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds --wait waits.")
    @click.pass_context
    def abort_cmd(ctx: click.Context, job_id: int, reason: str, wait: bool, timeout: float) -> None:
        job = app.open_runner(app.state_dir(ctx), False).abort(job_id, reason)
        if job.state == ABORTED:
            click.echo(f"job {job.id} {job.state}: {job.error}")
            return
        click.echo(f"abort requested: job {job.id} (pid {job.owner_pid}) stops at its next safe point")
        if not wait:
            return
        job = wait_until_final(store(ctx), job_id, timeout)
        if job.state == ABORTED:
            click.echo(f"job {job.id} {job.state}: {job.error}")
            return
        if job.state in FINAL_STATES:
            raise ManagerError(f"job {job_id} became {job.state} before it could be aborted")
        raise ManagerError(f"job {job_id} not aborted within {timeout:g}s (still {job.state}, pid {job.owner_pid}); "
                           "the request stays pending")

    @group.command("retry", help="Re-run an aborted job from its resume point, keeping its history.")
    @click.argument("job_id", type=int)
    @click.pass_context
    def retry_cmd(ctx: click.Context, job_id: int) -> None:
        state_dir = app.state_dir(ctx)
        with app.exclusive(state_dir, "fsm retry"):
            job = app.open_runner(state_dir, True).retry(job_id)
        click.echo(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))
        if job.state != COMPLETE:
            ctx.exit(1)

    @group.command("resume", help="Resume every unfinished job whose owner is gone.")
    @click.pass_context
    def resume_cmd(ctx: click.Context) -> None:
        state_dir = app.state_dir(ctx)
        with app.exclusive(state_dir, "fsm resume"):
            jobs = app.open_runner(state_dir, True).resume_all()
        for job in jobs:
            click.echo(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))
        click.echo(f"resumed {len(jobs)} job(s)")
        if any(j.state != COMPLETE for j in jobs):
            ctx.exit(1)

    @group.command("graph", help="Draw a workflow's states and transitions.")
    @click.option("--workflow", "workflow_name", default=None, help="Workflow name (default: the only/first one).")
    @click.option("--format", "fmt", type=click.Choice(["mermaid", "png", "svg"]), default="mermaid", show_default=True)
    @click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write here instead of stdout (required for png).")
    def graph_cmd(workflow_name: str | None, fmt: str, output: Path | None) -> None:
        workflows = app.workflows()
        name = workflow_name or next(iter(workflows))
        if name not in workflows:
            raise ManagerError(f"unknown workflow {name!r}; known: {', '.join(workflows)}")
        if fmt == "png" and output is None:
            raise ManagerError("--format png needs --output FILE")
        from fsm.graph import render_graph

        data = render_graph(workflows[name], fmt)
        if output is not None:
            output.write_bytes(data)
            click.echo(f"wrote {output}")
        else:
            click.echo(data.decode())

    return group
