"""What `images` and `snapshots` print, read with sqlite3 from a read-only connection: a
listing command starts and answers without loading SQLAlchemy (the ORM alone costs about
0.4 s of start-up, more than the whole command should take)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fsm.listing import read_only_rows

IMAGES = """
SELECT i.id, i.name, i.source, i.layer_count, i.activation_status, u.device_name AS top_device, i.job_id,
       i.updated_at, i.pinned, i.last_used_at, i.config
FROM images i LEFT JOIN unpacked_images u ON u.chain_id = i.top_chain_id
ORDER BY i.id"""

SNAPSHOTS = """
SELECT s.id, s.device_name, s.device_id, s.state, s.vm_id, s.size_bytes, i.name AS image, s.image_id,
       s.origin_device_id, s.created_at
FROM snapshots s JOIN images i ON i.id = s.image_id
ORDER BY s.id"""


def read_rows(db_path: Path, sql: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in read_only_rows(db_path, sql, parameters)]


def list_images(db_path: Path) -> list[dict[str, Any]]:
    """Every image; `config` is a registry image's runtime config (a dict), else None."""
    return [{**row, "pinned": bool(row["pinned"]), "config": json.loads(row["config"]) if row["config"] else None}
            for row in read_rows(db_path, IMAGES)]


def list_snapshots(db_path: Path) -> list[dict[str, Any]]:
    return read_rows(db_path, SNAPSHOTS)


def image_has_ready_snapshot(db_path: Path, source: str) -> bool:
    """Whether the image from `source` still has a ready snapshot row (a reset or a manual
    cleanup of the database removes them)."""
    return bool(read_rows(db_path, "SELECT 1 FROM snapshots s JOIN images i ON i.id = s.image_id "
                                   "WHERE i.source = ? AND s.state = 'ready' LIMIT 1", (source,)))


def record_use(db_path: Path, source: str) -> None:
    """The image from `source` was used now (a repeat process-image answered from the
    database): last in eviction's least-recently-used order. One short write transaction."""
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # The text SQLAlchemy writes for a DateTime (catalog/records.py utcnow), so both sort alike.
        now = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(" ", timespec="microseconds")
        conn.execute("UPDATE images SET last_used_at = ? WHERE source = ?", (now, source))
        conn.execute("COMMIT")
    finally:
        conn.close()


def uncleaned_orphans(db_path: Path) -> list[dict[str, Any]]:
    """orphaned_devices rows gc has not cleaned yet, oldest first."""
    return read_rows(db_path, "SELECT device_name, job_id, reason, detected_at FROM orphaned_devices "
                              "WHERE cleaned_at IS NULL ORDER BY id")
