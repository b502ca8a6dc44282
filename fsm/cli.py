"""The `fsm` command group: list, show, history, abort, retry, resume, graph.

Generic: the product hands it an FsmApp that knows its workflows, how to open the
store and how to take the manager lock. Mounted as `fsm` and `flyio-image-manager fsm`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from fsm.definition import Workflow
from fsm.graph import render_graph
from fsm.models import Job, JobEvent
from fsm.runner import Runner
from fsm.store import JobStore, load_context
from support.errors import ManagerError


@dataclass(frozen=True)
class FsmApp:
    """What the generic CLI needs from the product."""

    workflows: Callable[[], dict[str, Workflow]]
    open_store: Callable[[Path], JobStore]
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


def event_summary(event: JobEvent) -> dict[str, Any]:
    return {
        "seq": event.seq, "from": event.from_state, "to": event.to_state, "event": event.event,
        "started_at": _iso(event.started_at), "finished_at": _iso(event.finished_at),
        "duration_ms": round((event.finished_at - event.started_at).total_seconds() * 1000, 1),
        "attempt": event.attempt, "error": event.error,
    }


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
        jobs = [job_summary(j) for j in store(ctx).list_jobs(state)]
        if as_json:
            click.echo(json.dumps(jobs, indent=2))
            return
        click.echo(f"{'ID':>5}  {'WORKFLOW':<8} {'STATE':<16} {'ATTEMPT':>7}  {'UPDATED':<24} KEY")
        for j in jobs:
            click.echo(f"{j['id']:>5}  {j['workflow']:<8} {j['state']:<16} {j['attempt']:>7}  {j['updated_at']:<24} {j['key']}")
            if j["error"]:
                click.echo(f"{'':>7}error: {j['error']}")

    @group.command("show", help="Show one job: state, owner, context, last error.")
    @click.argument("job_id", type=int)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def show_cmd(ctx: click.Context, job_id: int, as_json: bool) -> None:
        job = store(ctx).get(job_id)
        detail = job_summary(job) | {"context": load_context(job), "lease_expires_at": _iso(job.lease_expires_at),
                                     "abort_requested": job.abort_requested}
        if as_json:
            click.echo(json.dumps(detail, indent=2))
            return
        for key, value in detail.items():
            if key == "context":
                click.echo(f"{key + ':':<18}{json.dumps(value, sort_keys=True)}")
            elif value is not None:
                click.echo(f"{key + ':':<18}{value}")

    @group.command("history", help="Every transition of a job, with timestamps and durations.")
    @click.argument("job_id", type=int)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def history_cmd(ctx: click.Context, job_id: int, as_json: bool) -> None:
        events = [event_summary(e) for e in store(ctx).history(job_id)]
        if as_json:
            click.echo(json.dumps(events, indent=2))
            return
        click.echo(f"{'SEQ':>4}  {'EVENT':<16} {'FROM':<16} {'TO':<16} {'STARTED':<24} {'DURATION':>10}  ATTEMPT")
        for e in events:
            click.echo(f"{e['seq']:>4}  {e['event']:<16} {e['from'] or '-':<16} {e['to']:<16} {e['started_at']:<24} "
                       f"{e['duration_ms']:>8.1f}ms  {e['attempt']}")
            if e["error"]:
                click.echo(f"{'':>6}error: {e['error']}")

    @group.command("abort", help="Abort a job; what it made is recorded as orphaned, nothing is cleaned.")
    @click.argument("job_id", type=int)
    @click.option("--reason", default="aborted by operator", show_default=True)
    @click.pass_context
    def abort_cmd(ctx: click.Context, job_id: int, reason: str) -> None:
        job = app.open_runner(app.state_dir(ctx), False).abort(job_id, reason)
        click.echo(f"job {job.id} {job.state}: {job.error}")

    @group.command("retry", help="Re-run an aborted job from its resume point, keeping its history.")
    @click.argument("job_id", type=int)
    @click.pass_context
    def retry_cmd(ctx: click.Context, job_id: int) -> None:
        state_dir = app.state_dir(ctx)
        with app.exclusive(state_dir, "fsm retry"):
            job = app.open_runner(state_dir, True).retry(job_id)
        click.echo(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))
        if job.state != "complete":
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
        if any(j.state != "complete" for j in jobs):
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
        data = render_graph(workflows[name], fmt)
        if output is not None:
            output.write_bytes(data)
            click.echo(f"wrote {output}")
        else:
            click.echo(data.decode())

    return group
