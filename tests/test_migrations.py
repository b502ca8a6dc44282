"""The schema comes from alembic's migrations (a new database from the models they match):
upgrade, downgrade, no drift between the two, and a new database identical to a migrated one."""

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
from fsm.store import JobStore
from migrations import alembic_config, downgrade_database, head_revision, stored_revision, upgrade_database

REPO = Path(__file__).resolve().parents[1]
TABLES = {"jobs", "job_events", "job_notes", "images", "image_layers", "layers", "unpacked_images", "snapshots",
          "orphaned_devices", "device_id_counter"}


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"alembic_version"}


def test_upgrade_from_empty_to_head_and_back(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    migrate_with_alembic(db)
    assert tables(db) == TABLES
    downgrade_database(db)
    assert tables(db) == set()
    upgrade_database(db)
    assert tables(db) == TABLES


def migrate_with_alembic(db: Path, revision: str = "head") -> None:
    """The migrations themselves, also on a new file (upgrade_database creates one from the models)."""
    from alembic import command

    command.upgrade(alembic_config(db), revision)


def schema_of(db: Path) -> dict[str, object]:
    """Each table's columns, foreign keys and indexes (by what they cover, not their generated names)."""
    with sqlite3.connect(db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        schema: dict[str, object] = {}
        for name in names:
            columns = sorted(conn.execute(f"PRAGMA table_info('{name}')").fetchall(), key=lambda c: c[1])
            keys = sorted(tuple(r[2:]) for r in conn.execute(f"PRAGMA foreign_key_list('{name}')"))
            indexes = sorted((r[2], r[3], tuple(i[2] for i in conn.execute(f"PRAGMA index_info('{r[1]}')")))
                             for r in conn.execute(f"PRAGMA index_list('{name}')"))
            schema[name] = ([c[1:] for c in columns], keys, indexes)
        return schema


def test_a_new_database_is_the_migrated_schema_stamped_head(tmp_path: Path) -> None:
    migrated, created = tmp_path / "migrated.db", tmp_path / "created.db"
    migrate_with_alembic(migrated)
    upgrade_database(created)  # a new file: created from the models, no alembic
    assert stored_revision(created) == head_revision() == stored_revision(migrated)
    assert schema_of(created) == schema_of(migrated)
    assert "alembic" not in subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from migrations import upgrade_database;"
         f"upgrade_database(Path({str(tmp_path / 'third.db')!r})); print(sorted(m for m in sys.modules if 'alembic' in m))"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout.replace("[]", "")
    downgrade_database(created, "0004")  # alembic's history goes on from the stamp
    upgrade_database(created)
    assert schema_of(created) == schema_of(migrated)


def test_models_match_the_migrations(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    migrate_with_alembic(db)
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


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def test_0003_upgrades_a_database_of_the_release_with_jobs_in_it_and_downgrades(tmp_path: Path) -> None:
    """A database as the current release (revision 0002) leaves it, with a job and its
    history: 0003 keeps every row, adds wait/abort notes and transition details, and goes back."""
    db = tmp_path / "images.db"
    upgrade_database(db, "0002")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO jobs (id, workflow, idempotency_key, state, attempt, context, error, created_at, "
                     "updated_at, stopped_before_step) VALUES (1, 'image', 'k', 'verifying', 0, '{}', "
                     "'waiting: memory_pressure', '2026-12-01 10:00:00', '2026-12-01 10:00:05', 0)")
        conn.executemany("INSERT INTO job_events (job_id, seq, from_state, to_state, event, started_at, finished_at, "
                         "attempt) VALUES (1, ?, ?, ?, ?, '2026-12-01 10:00:00', '2026-12-01 10:00:01', 1)",
                         [(1, "pending", "downloading", "start"), (2, "downloading", "verifying", "downloaded")])
    before = {t: _rows(db, t) for t in ("jobs", "job_events")}

    upgrade_database(db)
    assert "job_notes" in tables(db)
    assert {"detail"} <= columns(db, "job_events") and {"waiting_since"} <= columns(db, "jobs")
    assert [row[:len(before["job_events"][0])] for row in _rows(db, "job_events")] == before["job_events"]
    assert [row[:len(before["jobs"][0])] for row in _rows(db, "jobs")] == before["jobs"]
    store = JobStore(open_engine(db))
    assert [e.event for e in store.history(1)] == ["start", "downloaded"] and store.notes(1) == []
    store.request_abort(1, "operator test", requested_by_pid=7)
    assert [(n.kind, n.requested_by_pid) for n in store.notes(1)] == [("abort-request", 7)]
    store.engine.dispose()

    downgrade_database(db, "0002")
    assert "job_notes" not in tables(db)
    assert "detail" not in columns(db, "job_events") and "waiting_since" not in columns(db, "jobs")
    assert _rows(db, "job_events") == before["job_events"]
    assert [row[0] for row in _rows(db, "jobs")] == [1]


def _rows(db: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def test_0004_gives_old_snapshots_their_origins_size_and_goes_back(tmp_path: Path) -> None:
    """A 0003 database with an image, its chain device and its snapshot: 0004 keeps the rows,
    fills the snapshot's size from its origin's, leaves vm_id empty; the downgrade keeps them."""
    db = tmp_path / "images.db"
    upgrade_database(db, "0003")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO images (id, name, source, top_chain_id, layer_count, activation_status, job_id, "
                     "created_at, updated_at) VALUES (1, 'fa', 's3://b/fa/', 'sha256:c', 1, 'active', 1, "
                     "'2026-12-01 10:00:00', '2026-12-01 10:00:00')")
        conn.execute("INSERT INTO unpacked_images (chain_id, layer_digest, device_id, device_name, size_bytes, state, "
                     "job_id, created_at, updated_at) VALUES ('sha256:c', 'sha256:c', 1, 'thin-1', 8589934592, "
                     "'ready', 1, '2026-12-01 10:00:00', '2026-12-01 10:00:00')")
        conn.execute("INSERT INTO snapshots (image_id, origin_device_id, device_id, device_name, state, job_id, "
                     "created_at) VALUES (1, 1, 2, 'thin-2', 'ready', 1, '2026-12-01 10:00:01')")
    upgrade_database(db)
    assert {"vm_id", "size_bytes", "updated_at"} <= columns(db, "snapshots")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT device_name, vm_id, size_bytes, updated_at FROM snapshots").fetchall() == [
            ("thin-2", None, 8589934592, "2026-12-01 10:00:01")]
    downgrade_database(db, "0003")
    assert "vm_id" not in columns(db, "snapshots")
    assert [row[4] for row in _rows(db, "snapshots")] == ["thin-2"]


def test_0002_downgrade_keeps_every_jobs_history(tmp_path: Path) -> None:
    """Dropping jobs.stopped_before_step in place: a table copy would cascade job_events away."""
    db = tmp_path / "images.db"
    upgrade_database(db, "0002")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO jobs (id, workflow, idempotency_key, state, attempt, context, created_at, updated_at, "
                     "stopped_before_step) VALUES (1, 'image', 'k', 'complete', 0, '{}', '2026-12-01 10:00:00', "
                     "'2026-12-01 10:00:05', 0)")
        conn.execute("INSERT INTO job_events (job_id, seq, from_state, to_state, event, started_at, finished_at, attempt) "
                     "VALUES (1, 1, 'pending', 'downloading', 'start', '2026-12-01 10:00:00', '2026-12-01 10:00:01', 1)")
    downgrade_database(db, "0001")
    assert "stopped_before_step" not in columns(db, "jobs")
    assert len(_rows(db, "job_events")) == 1 and len(_rows(db, "jobs")) == 1


def test_0005_adds_last_use_and_pins_and_its_downgrade_keeps_image_layers(tmp_path: Path) -> None:
    """0005 gives old images their last update as last use and no pin; the downgrade drops
    both columns in place: a table copy of `images` would cascade image_layers away."""
    db = tmp_path / "images.db"
    upgrade_database(db, "0004")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO layers (digest, size_bytes, format, source, created_at) VALUES "
                     "('sha256:l', 10, 'tar', 's3://b/fa/1.tar', '2026-12-01 10:00:00')")
        conn.execute("INSERT INTO images (id, name, source, top_chain_id, layer_count, activation_status, job_id, "
                     "created_at, updated_at) VALUES (1, 'fa', 's3://b/fa/', 'sha256:c', 1, 'active', 1, "
                     "'2026-12-01 10:00:00', '2026-12-01 11:00:00')")
        conn.execute("INSERT INTO image_layers (image_id, position, digest, chain_id) VALUES (1, 0, 'sha256:l', 'sha256:c')")
    upgrade_database(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT last_used_at, pinned FROM images").fetchall() == [("2026-12-01 11:00:00", 0)]
    downgrade_database(db, "0004")
    assert not {"last_used_at", "pinned"} & columns(db, "images")
    assert len(_rows(db, "images")) == 1 and len(_rows(db, "image_layers")) == 1
