"""`fsm list`, read with sqlite3 from a read-only connection: the listing answers without
loading SQLAlchemy (its import alone is about 0.4 s). The rows are shaped exactly as
fsm.cli.job_summary shapes a Job."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

JOBS = ("SELECT id, workflow, idempotency_key, state, attempt, error, owner_pid, created_at, updated_at "
        "FROM jobs {where} ORDER BY id")


def _iso(value: str | None) -> str | None:
    """SQLite's stored `YYYY-MM-DD HH:MM:SS[.ffffff]` as the CLI prints datetimes."""
    return datetime.fromisoformat(value).isoformat(timespec="milliseconds") + "Z" if value else None


def list_job_summaries(db_path: Path, state: str | None = None) -> list[dict[str, Any]]:
    """Every job (or those in `state`), oldest first, as `fsm list --json` prints them."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(JOBS.format(where="WHERE state = ?" if state else ""), (state,) if state else ()).fetchall()
    finally:
        conn.close()
    return [{"id": job_id, "workflow": workflow, "key": key, "state": job_state, "attempt": attempt, "error": error,
             "owner_pid": owner_pid, "created_at": _iso(created_at), "updated_at": _iso(updated_at)}
            for job_id, workflow, key, job_state, attempt, error, owner_pid, created_at, updated_at in rows]


def find_job(db_path: Path, workflow: str, key: str) -> dict[str, Any] | None:
    """The job of `workflow` with idempotency key `key` (id, state, context, error), or None."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT id, state, context, error FROM jobs WHERE workflow = ? AND idempotency_key = ?",
                           (workflow, key)).fetchone()
    finally:
        conn.close()
    return None if row is None else {"id": row[0], "state": row[1], "context": row[2], "error": row[3]}
