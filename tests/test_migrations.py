"""The schema comes only from alembic: upgrade, downgrade, and no drift from the models."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from catalog.models import CatalogBase
from fsm.database import open_engine
from fsm.models import FsmBase
from migrations import downgrade_database, upgrade_database

REPO = Path(__file__).resolve().parents[1]
TABLES = {"jobs", "job_events", "job_notes", "images", "image_layers", "layers", "unpacked_images", "snapshots",
          "orphaned_devices", "device_id_counter"}


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"alembic_version"}


def test_upgrade_from_empty_to_head_and_back(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    upgrade_database(db)
    assert tables(db) == TABLES
    downgrade_database(db)
    assert tables(db) == set()
    upgrade_database(db)
    assert tables(db) == TABLES


def test_models_match_the_migrations(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    upgrade_database(db)
    engine = open_engine(db)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, [FsmBase.metadata, CatalogBase.metadata])
    assert diff == [], diff


def test_two_processes_migrating_at_once_both_succeed(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    start_at = time.time() + 1.5
    code = ("import sys, time; from pathlib import Path; from migrations import upgrade_database;"
            f"time.sleep(max(0, {start_at} - time.time())); upgrade_database(Path({str(db)!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    assert tables(db) == TABLES
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
