"""Every hand-written SQL statement of the product, in one place, run with sqlite3.

What only looks (`images`, `snapshots`, `fsm list`, the monitor, the metrics, a repeat
`process-image`) reads here, on a read-only connection (`mode=ro`: it never writes, not even
a WAL checkpoint), without loading SQLAlchemy: its import alone costs about 0.4 s, more
than such a command should take. Everything else goes through the ORM (catalog/models.py,
fsm/models.py). The one write is `record_use`, a repeat process-image's mark of use: the
same start-up reason, one short transaction.

Each statement is a `Query` in `QUERIES`: tests/test_reads.py checks every table and column
it names against the models (and their types), and that the indexes it is meant to use
exist in the models and in a migrated database, and are used there. alembic's own
`alembic_version` is read by migrations/ itself."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

Index = tuple[str, tuple[str, ...]]  # (table, the columns it covers, in order)


class Query:
    """One statement, and the indexes it is meant to use (its plan on a migrated database
    uses each of them, or a wider one starting with the same columns). A plain class: a
    dataclass would cost a listing command's start-up a millisecond."""

    __slots__ = ("sql", "indexes")

    def __init__(self, sql: str, indexes: tuple[Index, ...] = ()) -> None:
        self.sql = sql
        self.indexes = indexes


# -- the engine's tables ------------------------------------------------------------------

_JOB_COLUMNS = ("SELECT id, workflow, idempotency_key, state, attempt, error, owner_pid, created_at, updated_at "
                "FROM jobs ")
JOBS = Query(_JOB_COLUMNS + "ORDER BY id")
JOBS_IN_STATE = Query(_JOB_COLUMNS + "WHERE state = ? ORDER BY id", indexes=(("jobs", ("state",)),))
JOB_BY_KEY = Query("SELECT id, state, context, error FROM jobs WHERE workflow = ? AND idempotency_key = ?",
                   indexes=(("jobs", ("workflow", "idempotency_key")),))
JOB_COUNTS = Query("SELECT state, count(*) AS n FROM jobs GROUP BY state", indexes=(("jobs", ("state",)),))
UNFINISHED_JOBS = Query("SELECT id, state, created_at, updated_at, owner_pid, error FROM jobs "
                        "WHERE state NOT IN (?, ?) ORDER BY id")
_TRANSITIONS = ("SELECT id, job_id, from_state, to_state, event, "
                "(julianday(finished_at) - julianday(started_at)) * 86400.0 AS seconds, finished_at FROM job_events ")
RECENT_TRANSITIONS = Query(_TRANSITIONS + "ORDER BY id DESC LIMIT ?")
TRANSITIONS_AFTER = Query(_TRANSITIONS + "WHERE id > ? ORDER BY id")
LAST_TRANSITION_ID = Query("SELECT coalesce(max(id), 0) FROM job_events")

# -- the catalog's --------------------------------------------------------------------------

IMAGES = Query("""
SELECT i.id, i.name, i.source, i.layer_count, i.activation_status, u.device_name AS top_device, i.job_id,
       i.updated_at, i.pinned, i.last_used_at, i.config
FROM images i LEFT JOIN unpacked_images u ON u.chain_id = i.top_chain_id
ORDER BY i.id""", indexes=(("unpacked_images", ("chain_id",)),))
SNAPSHOTS = Query("""
SELECT s.id, s.device_name, s.device_id, s.state, s.vm_id, s.size_bytes, i.name AS image, s.image_id,
       s.origin_device_id, s.created_at
FROM snapshots s JOIN images i ON i.id = s.image_id
ORDER BY s.id""")
READY_SNAPSHOT_OF_SOURCE = Query("SELECT 1 FROM snapshots s JOIN images i ON i.id = s.image_id "
                                 "WHERE i.source = ? AND s.state = 'ready' LIMIT 1",
                                 indexes=(("images", ("source",)), ("snapshots", ("image_id",))))
UNCLEANED_ORPHANS = Query("SELECT device_name, job_id, reason, detected_at FROM orphaned_devices "
                          "WHERE cleaned_at IS NULL ORDER BY id")
ANY_CATALOG_ROW = Query("SELECT EXISTS (SELECT 1 FROM images) OR EXISTS (SELECT 1 FROM unpacked_images) "
                        "OR EXISTS (SELECT 1 FROM snapshots)")
RECORD_USE = Query("UPDATE images SET last_used_at = ? WHERE source = ?", indexes=(("images", ("source",)),))

QUERIES: dict[str, Query] = {name: value for name, value in globals().items() if isinstance(value, Query)}


# -- running them ---------------------------------------------------------------------------

def read_only_rows(db_path: Path, query: Query | str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """The rows of one statement on a read-only connection (rows index by name and position)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(query.sql if isinstance(query, Query) else query, parameters).fetchall()
    finally:
        conn.close()


def _dicts(db_path: Path, query: Query, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in read_only_rows(db_path, query, parameters)]


def _iso(value: str | None) -> str | None:
    """SQLite's stored `YYYY-MM-DD HH:MM:SS[.ffffff]` as the CLI prints datetimes."""
    return datetime.fromisoformat(value).isoformat(timespec="milliseconds") + "Z" if value else None


# -- jobs and their history --------------------------------------------------------------

def list_job_summaries(db_path: Path, state: str | None = None) -> list[dict[str, Any]]:
    """Every job (or those in `state`), oldest first, as `fsm list --json` prints them
    (shaped exactly as fsm.cli.job_summary shapes a Job)."""
    rows = read_only_rows(db_path, JOBS_IN_STATE, (state,)) if state else read_only_rows(db_path, JOBS)
    return [{"id": r["id"], "workflow": r["workflow"], "key": r["idempotency_key"], "state": r["state"],
             "attempt": r["attempt"], "error": r["error"], "owner_pid": r["owner_pid"],
             "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"])} for r in rows]


def find_job(db_path: Path, workflow: str, key: str) -> dict[str, Any] | None:
    """The job of `workflow` with idempotency key `key` (id, state, context, error), or None."""
    rows = _dicts(db_path, JOB_BY_KEY, (workflow, key))
    return rows[0] if rows else None


def job_counts(db_path: Path) -> dict[str, int]:
    """How many jobs are in each state."""
    return {r["state"]: r["n"] for r in read_only_rows(db_path, JOB_COUNTS)}


def unfinished_jobs(db_path: Path, final_states: tuple[str, str]) -> list[sqlite3.Row]:
    """Jobs in none of the `final_states`: id, state, created_at, updated_at, owner_pid, error."""
    return read_only_rows(db_path, UNFINISHED_JOBS, final_states)


def recent_transitions(db_path: Path, limit: int) -> list[sqlite3.Row]:
    """The newest `limit` transitions, newest first, with how long each state lasted."""
    return read_only_rows(db_path, RECENT_TRANSITIONS, (limit,))


def transitions_after(db_path: Path, last_id: int) -> list[sqlite3.Row]:
    """Transitions recorded after the one with id `last_id`, oldest first."""
    return read_only_rows(db_path, TRANSITIONS_AFTER, (last_id,))


def last_transition_id(db_path: Path) -> int:
    return int(read_only_rows(db_path, LAST_TRANSITION_ID)[0][0])


# -- the catalog --------------------------------------------------------------------------

def list_images(db_path: Path) -> list[dict[str, Any]]:
    """Every image, as `images` prints it; `config` is a registry image's runtime config (a
    dict), else None."""
    import json

    return [{**row, "pinned": bool(row["pinned"]), "config": json.loads(row["config"]) if row["config"] else None}
            for row in _dicts(db_path, IMAGES)]


def list_snapshots(db_path: Path) -> list[dict[str, Any]]:
    """Every snapshot with its image's name, as `snapshots` prints it."""
    return _dicts(db_path, SNAPSHOTS)


def image_has_ready_snapshot(db_path: Path, source: str) -> bool:
    """Whether the image from `source` still has a ready snapshot row (a reset or a manual
    cleanup of the database removes them)."""
    return bool(read_only_rows(db_path, READY_SNAPSHOT_OF_SOURCE, (source,)))


def uncleaned_orphans(db_path: Path) -> list[dict[str, Any]]:
    """orphaned_devices rows gc has not cleaned yet, oldest first."""
    return _dicts(db_path, UNCLEANED_ORPHANS)


def catalog_is_empty(db_path: Path) -> bool:
    """Whether the catalog names no image and no device (nothing in it to keep); a file no
    command migrated yet (no such table) names nothing either."""
    try:
        return not read_only_rows(db_path, ANY_CATALOG_ROW)[0][0]
    except sqlite3.OperationalError:
        return True


def integrity_problems(db_path: Path, *, full: bool) -> list[str]:
    """The lines of `PRAGMA quick_check` (or the full `integrity_check`): `["ok"]` when sound.
    Raises sqlite3.DatabaseError when the file is no database at all."""
    return [str(row[0]) for row in read_only_rows(db_path, "PRAGMA integrity_check" if full else "PRAGMA quick_check")]


def record_use(db_path: Path, source: str) -> None:
    """The image from `source` was used now (a repeat process-image answered from the
    database): last in eviction's least-recently-used order. One short write transaction,
    the one write of this module."""
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # The text SQLAlchemy writes for a DateTime (catalog/records.py utcnow), so both sort alike.
        now = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(" ", timespec="microseconds")
        conn.execute(RECORD_USE.sql, (now, source))
        conn.execute("COMMIT")
    finally:
        conn.close()
