"""Jobs and their history read with sqlite3 from a read-only connection, for what only
looks (`fsm list`, the monitor, the metrics): it answers without loading SQLAlchemy (its
import alone is about 0.4 s) and never writes, not even a WAL checkpoint. `fsm list`'s
rows are shaped exactly as fsm.cli.job_summary shapes a Job."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from fsm.definition import FINAL_STATES

JOBS = ("SELECT id, workflow, idempotency_key, state, attempt, error, owner_pid, created_at, updated_at "
        "FROM jobs {where} ORDER BY id")


def _iso(value: str | None) -> str | None:
    """SQLite's stored `YYYY-MM-DD HH:MM:SS[.ffffff]` as the CLI prints datetimes."""
    return datetime.fromisoformat(value).isoformat(timespec="milliseconds") + "Z" if value else None


def read_only_rows(db_path: Path, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """The rows of one query on a read-only connection (rows index by name and position)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, parameters).fetchall()
    finally:
        conn.close()


def list_job_summaries(db_path: Path, state: str | None = None) -> list[dict[str, Any]]:
    """Every job (or those in `state`), oldest first, as `fsm list --json` prints them."""
    rows = read_only_rows(db_path, JOBS.format(where="WHERE state = ?" if state else ""), (state,) if state else ())
    return [{"id": r["id"], "workflow": r["workflow"], "key": r["idempotency_key"], "state": r["state"],
             "attempt": r["attempt"], "error": r["error"], "owner_pid": r["owner_pid"],
             "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"])} for r in rows]


def find_job(db_path: Path, workflow: str, key: str) -> dict[str, Any] | None:
    """The job of `workflow` with idempotency key `key` (id, state, context, error), or None."""
    rows = read_only_rows(db_path, "SELECT id, state, context, error FROM jobs WHERE workflow = ? AND "
                                   "idempotency_key = ?", (workflow, key))
    return dict(rows[0]) if rows else None


def job_counts(db_path: Path) -> dict[str, int]:
    """How many jobs are in each state."""
    return {r["state"]: r["n"] for r in read_only_rows(db_path, "SELECT state, count(*) AS n FROM jobs GROUP BY state")}


def unfinished_jobs(db_path: Path) -> list[sqlite3.Row]:
    """Jobs not complete nor aborted: id, state, created_at, updated_at, owner_pid, error."""
    return read_only_rows(db_path, "SELECT id, state, created_at, updated_at, owner_pid, error FROM jobs "
                                   "WHERE state NOT IN (?, ?) ORDER BY id", FINAL_STATES)


TRANSITIONS = ("SELECT id, job_id, from_state, to_state, event, "
               "(julianday(finished_at) - julianday(started_at)) * 86400.0 AS seconds, finished_at FROM job_events ")


def recent_transitions(db_path: Path, limit: int) -> list[sqlite3.Row]:
    """The newest `limit` transitions, newest first, with how long each state lasted."""
    return read_only_rows(db_path, TRANSITIONS + "ORDER BY id DESC LIMIT ?", (limit,))


def transitions_after(db_path: Path, last_id: int) -> list[sqlite3.Row]:
    """Transitions recorded after the one with id `last_id`, oldest first."""
    return read_only_rows(db_path, TRANSITIONS + "WHERE id > ? ORDER BY id", (last_id,))


def last_transition_id(db_path: Path) -> int:
    return int(read_only_rows(db_path, "SELECT coalesce(max(id), 0) FROM job_events")[0][0])
