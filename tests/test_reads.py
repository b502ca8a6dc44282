"""The hand-written SQL (support/reads.py) against the models and the migrated schema: every
table and column a query names exists in the models, with the type the migrations gave it;
the indexes a query is meant to use exist in the models and in a migrated database, and its
plan there uses them; rows the ORM wrote read back through the queries as the ORM reads
them. And no other product module writes SQL by hand."""

from __future__ import annotations

import ast
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, Table, UniqueConstraint, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

from catalog.models import CatalogBase, Image, OrphanedDevice, Snapshot, UnpackedImage
from fsm.cli import event_summary, job_summary
from fsm.database import open_engine
from fsm.definition import COMPLETE, FINAL_STATES
from fsm.models import FsmBase, Job
from fsm.store import JobStore
from support import reads
from support.reads import QUERIES, Query
from tests.test_migrations import migrate_with_alembic

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("catalog", "cli", "daemon", "devices", "fsm", "images", "migrations", "safeguards", "states", "support")
MODEL_TABLES: dict[str, Table] = {**FsmBase.metadata.tables, **CatalogBase.metadata.tables}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database made by the migrations themselves (the schema's source), empty."""
    db = tmp_path_factory.mktemp("reads") / "images.db"
    migrate_with_alembic(db)
    return db


def named_columns(db: Path, query: Query) -> set[tuple[str, str]]:
    """(table, column) of every column the statement reads or writes, as SQLite's authorizer
    reports them while preparing it; a table it only counts has the column ""."""
    named: set[tuple[str, str]] = set()

    def authorize(action: int, first: str | None, second: str | None, *_: object) -> int:
        if action in (sqlite3.SQLITE_READ, sqlite3.SQLITE_UPDATE) and first and second is not None:
            named.add((first, second))
        return sqlite3.SQLITE_OK

    with sqlite3.connect(db) as conn:
        conn.set_authorizer(authorize)
        conn.execute("EXPLAIN " + query.sql, (None,) * query.sql.count("?"))
    return named


def plan_indexes(db: Path, query: Query) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The indexes the statement's plan on `db` uses: name -> (table, columns)."""
    with sqlite3.connect(db) as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query.sql, (None,) * query.sql.count("?"))]
        used = {}
        for detail in plan:
            words = detail.split()
            if "INDEX" in words:
                name = words[words.index("INDEX") + 1]
                table = conn.execute("SELECT tbl_name FROM sqlite_master WHERE type = 'index' AND name = ?",
                                     (name,)).fetchone()[0]
                columns = tuple(r[2] for r in conn.execute(f"PRAGMA index_info('{name}')"))
                used[name] = (table, columns)
        return used


def model_indexes(table: Table) -> set[tuple[str, ...]]:
    """The columns of every index and unique constraint the models declare on `table`."""
    found = {tuple(c.name for c in index.columns) for index in table.indexes}
    found |= {tuple(c.name for c in constraint.columns) for constraint in table.constraints
              if isinstance(constraint, UniqueConstraint)}
    return found | {(c.name,) for c in table.columns if c.unique}


def test_the_module_lists_every_statement_it_runs() -> None:
    text = (REPO / "support" / "reads.py").read_text()
    assert len(QUERIES) == text.count("= Query(")  # every statement defined is in QUERIES, so checked
    assert set(QUERIES.values()) == {getattr(reads, name) for name in QUERIES}


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_every_table_and_column_a_query_names_is_in_the_models_with_the_migrated_type(migrated: Path,
                                                                                      name: str) -> None:
    named = named_columns(migrated, QUERIES[name])
    assert named, "the authorizer saw no table"
    with sqlite3.connect(migrated) as conn:
        for table, column in sorted(named):
            assert table in MODEL_TABLES, f"{name}: table {table} is not in the models"
            if not column:
                continue
            model = MODEL_TABLES[table].columns.get(column)
            assert model is not None, f"{name}: {table}.{column} is not in the models"
            migrated_type = {r[1]: r[2] for r in conn.execute(f"PRAGMA table_info('{table}')")}[column]
            assert migrated_type == str(model.type.compile(dialect=sqlite_dialect.dialect())), (name, table, column)


@pytest.mark.parametrize("name", sorted(n for n, q in QUERIES.items() if q.indexes))
def test_the_indexes_a_query_relies_on_exist_in_the_models_and_the_migrated_database(migrated: Path,
                                                                                   name: str) -> None:
    query = QUERIES[name]
    used = plan_indexes(migrated, query).values()
    for table, columns in query.indexes:
        assert any(columns == model[:len(columns)] for model in model_indexes(MODEL_TABLES[table])), \
            f"{name}: the models declare no index on {table}{columns}"
        assert any(t == table and columns == c[:len(columns)] for t, c in used), \
            f"{name}: its plan on a migrated database uses no index on {table}{columns} ({sorted(used)})"


def test_a_query_that_names_a_missing_column_is_caught(migrated: Path) -> None:
    """The check above is not vacuous: a column the models lack fails to prepare."""
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        named_columns(migrated, Query("SELECT nonesuch FROM jobs"))
    assert plan_indexes(migrated, Query("SELECT id FROM jobs WHERE error = ?")) == {}


# -- rows the ORM wrote, read back by hand --------------------------------------------------

@pytest.fixture
def filled(tmp_path: Path) -> Iterator[tuple[Path, Engine]]:
    """A migrated database with two jobs and their history, an image, its layer device, two
    snapshots and an orphan, all written through the models (every column given)."""
    db = tmp_path / "images.db"
    migrate_with_alembic(db)
    engine = open_engine(db)
    store = JobStore(engine)
    done, _ = store.create_or_get("image", "s3://b/fa/@1", "pending", {"image": {"name": "fa"}})
    store.create_or_get("image", "s3://b/fb/@2", "pending", {})
    started = datetime(2026, 12, 4, 20, 0, 0, 250000)
    with store.transaction() as session:
        job = session.get(Job, done.id)
        store.append_transition(session, job, to_state="downloading", event="start", started_at=started, attempt=1)
        store.append_transition(session, job, to_state=COMPLETE, event="done", started_at=started, attempt=1,
                                error="was slow")
        job.owner_pid = 4242
    at = datetime(2026, 12, 4, 21, 30, 15, 123456)
    with Session(engine) as session, session.begin():
        session.add(Image(id=7, name="fa", source="s3://b/fa/", top_chain_id="sha256:c", layer_count=1,
                          activation_status="active", job_id=done.id, created_at=at, updated_at=at,
                          last_used_at=at + timedelta(seconds=1), pinned=True, config=json.dumps({"Env": ["A=1"]})))
        session.add(Image(id=8, name="fb", source="s3://b/fb/", layer_count=0, activation_status="inactive",
                          created_at=at, updated_at=at))
        session.add(UnpackedImage(chain_id="sha256:c", layer_digest="sha256:l", device_id=1, device_name="thin-1",
                                  size_bytes=1 << 30, state="ready", job_id=done.id, created_at=at, updated_at=at))
        session.add(Snapshot(image_id=7, origin_device_id=1, device_id=2, device_name="thin-2", state="ready",
                             size_bytes=1 << 30, job_id=done.id, created_at=at, updated_at=at))
        session.add(Snapshot(image_id=8, origin_device_id=1, device_id=3, device_name="thin-3", state="creating",
                             vm_id="vm-1", size_bytes=2 << 30, created_at=at))
        session.add(OrphanedDevice(device_id=4, device_name="thin-4", reason="aborted", job_id=done.id, detected_at=at))
        session.add(OrphanedDevice(device_id=5, device_name="thin-5", reason="gone", detected_at=at, cleaned_at=at))
    yield db, engine
    engine.dispose()


def test_jobs_and_history_read_back_as_the_orm_reads_them(filled: tuple[Path, Engine]) -> None:
    db, engine = filled
    store = JobStore(engine)
    assert reads.list_job_summaries(db) == [job_summary(job) for job in store.list_jobs()]
    assert reads.list_job_summaries(db, COMPLETE) == [job_summary(job) for job in store.list_jobs(COMPLETE)]
    done = store.find("image", "s3://b/fa/@1")
    assert done is not None
    assert reads.find_job(db, "image", "s3://b/fa/@1") == {"id": done.id, "state": COMPLETE, "context": done.context,
                                                           "error": "was slow"}
    assert reads.find_job(db, "image", "s3://b/none/@3") is None
    assert reads.job_counts(db) == {COMPLETE: 1, "pending": 1}
    assert [r["state"] for r in reads.unfinished_jobs(db, FINAL_STATES)] == ["pending"]
    history = store.history(done.id)
    assert reads.last_transition_id(db) == history[-1].id
    recent = reads.recent_transitions(db, 10)
    assert [(r["job_id"], r["from_state"], r["to_state"], r["event"]) for r in reversed(recent)] == \
           [(e.job_id, e.from_state, e.to_state, e.event) for e in history]
    # julianday() reads the stored DateTime text: the same duration the ORM's values give.
    # (SQLite's clock counts whole milliseconds.)
    for row, event in zip(reversed(recent), history):
        assert abs(row["seconds"] * 1000 - event_summary(event)["duration_ms"]) < 2
        assert _time(row["finished_at"]) == event.finished_at
    assert [r["id"] for r in reads.transitions_after(db, history[0].id)] == [history[1].id]


def test_the_catalog_reads_back_as_the_orm_reads_it(filled: tuple[Path, Engine]) -> None:
    db, engine = filled
    with Session(engine) as session:
        images = session.scalars(select(Image).order_by(Image.id)).all()
        snapshots = session.scalars(select(Snapshot).order_by(Snapshot.id)).all()
        orphans = session.scalars(select(OrphanedDevice).where(OrphanedDevice.cleaned_at.is_(None))).all()
    rows = reads.list_images(db)
    assert [(r["id"], r["name"], r["source"], r["layer_count"], r["activation_status"], r["job_id"], r["pinned"],
             r["config"]) for r in rows] == \
           [(i.id, i.name, i.source, i.layer_count, i.activation_status, i.job_id, i.pinned,
             json.loads(i.config) if i.config else None) for i in images]
    assert [r["top_device"] for r in rows] == ["thin-1", None]
    assert [(_time(r["updated_at"]), _time(r["last_used_at"])) for r in rows] == \
           [(i.updated_at, i.last_used_at) for i in images]
    listed = reads.list_snapshots(db)
    assert [(r["id"], r["device_name"], r["device_id"], r["state"], r["vm_id"], r["size_bytes"], r["image_id"],
             r["origin_device_id"], _time(r["created_at"])) for r in listed] == \
           [(s.id, s.device_name, s.device_id, s.state, s.vm_id, s.size_bytes, s.image_id, s.origin_device_id,
             s.created_at) for s in snapshots]
    assert [r["image"] for r in listed] == ["fa", "fb"]
    assert reads.image_has_ready_snapshot(db, "s3://b/fa/") and not reads.image_has_ready_snapshot(db, "s3://b/fb/")
    uncleaned = reads.uncleaned_orphans(db)
    assert [(o["device_name"], o["job_id"], o["reason"], _time(o["detected_at"])) for o in uncleaned] == \
           [(o.device_name, o.job_id, o.reason, o.detected_at) for o in orphans]
    assert not reads.catalog_is_empty(db)
    reads.record_use(db, "s3://b/fb/")
    with Session(engine) as session:  # the text written by hand is a DateTime the ORM reads
        used = session.get(Image, 8)
        assert used is not None and isinstance(used.last_used_at, datetime)
        assert used.last_used_at > session.get(Image, 7).last_used_at  # type: ignore[union-attr]


def test_an_empty_or_unmigrated_catalog_names_nothing(migrated: Path, tmp_path: Path) -> None:
    assert reads.catalog_is_empty(migrated)
    bare = tmp_path / "bare.db"
    sqlite3.connect(bare).close()
    assert reads.catalog_is_empty(bare)
    assert reads.integrity_problems(migrated, full=True) == ["ok"]


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


# -- one place ------------------------------------------------------------------------------

# sqlite3 outside support/reads.py: the migrations' own bookkeeping (alembic_version), the
# connection's pragmas, the backup API, and catching sqlite3's errors.
SQLITE3_ALLOWED = {"support/reads.py", "migrations/__init__.py", "fsm/database.py", "daemon/database.py",
                   "daemon/dashboard.py"}
SQL_WORDS = ("SELECT ", "UPDATE ", "INSERT INTO", "DELETE FROM")


def product_files() -> Iterator[Path]:
    for package in PRODUCT:
        yield from (REPO / package).rglob("*.py")


def test_no_other_module_writes_sql_by_hand() -> None:
    """Raw SQL lives in support/reads.py (and the migrations, the schema's source)."""
    for path in product_files():
        relative = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        if "sqlite3" in imports:
            assert relative in SQLITE3_ALLOWED, f"{relative} imports sqlite3: its queries belong in support/reads.py"
        if relative == "support/reads.py" or relative.startswith("migrations/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not any(word in node.value for word in SQL_WORDS), f"{relative}:{node.lineno}: {node.value!r}"
