"""alembic: one linear history for every table (the engine's and the catalog's).

`upgrade_database(db_path)` is called at every startup; a file lock beside the database
makes two processes starting at once apply it one after the other. When the stored
revision (`alembic_version`, read with sqlite3) is already the head revision (found by
reading the `revision = ...` lines of versions/*.py) nothing is imported or run: alembic
and its environment cost ~160 ms, most commands' whole budget. A new database (no file, or a
file with no tables) is created at head the way alembic's cookbook builds one from scratch:
the models' `create_all` and the head revision stamped, in one transaction, without loading
alembic (~0.5 s of a first run); tests/test_migrations.py keeps the models and the
migrations identical.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent
REVISION_LINE = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:['"]([^'"]+)['"]|None)""", re.MULTILINE)


def alembic_config(db_path: Path) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{db_path}")
    return config


def head_revision(versions_dir: Path = MIGRATIONS_DIR / "versions") -> str:
    """The head of the linear history: the one revision no other names as its down_revision."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in versions_dir.glob("*.py"):
        found = {key: value for key, value in REVISION_LINE.findall(script.read_text())}
        if found.get("revision"):
            revisions.add(found["revision"])
        if found.get("down_revision"):
            parents.add(found["down_revision"])
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"migrations/versions has {len(heads)} heads ({sorted(heads)}); expected one")
    return heads.pop()


def stored_revision(db_path: Path) -> str | None:
    """The revision in the database's alembic_version table (None: no file, no table)."""
    if not db_path.exists():
        return None
    try:
        connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    finally:
        connection.close()
    return rows[0][0] if len(rows) == 1 else None


def has_tables(db_path: Path) -> bool:
    """Whether the file at `db_path` exists and holds any table."""
    if not db_path.exists():
        return False
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1").fetchone() is not None
    finally:
        connection.close()


def create_at_head(db_path: Path, head: str) -> None:
    """A new database's schema from the models, stamped `head`, in one transaction."""
    from sqlalchemy import text

    from catalog.models import CatalogBase
    from fsm.database import open_engine
    from fsm.models import FsmBase

    engine = open_engine(db_path)
    try:
        with engine.begin() as connection:
            FsmBase.metadata.create_all(connection)
            CatalogBase.metadata.create_all(connection)
            connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                                    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
            connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"), {"head": head})
    finally:
        engine.dispose()


def upgrade_database(db_path: Path, revision: str = "head") -> None:
    """Bring the schema of `db_path` to `revision`, creating the file if needed."""
    head = head_revision()
    if revision == "head" and stored_revision(db_path) == head:
        return  # already there: no lock, no alembic
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(f"{db_path}.migrate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if revision == "head" and not has_tables(db_path):
            create_at_head(db_path, head)
            return
        from alembic import command

        command.upgrade(alembic_config(db_path), revision)
    finally:
        os.close(lock_fd)


def downgrade_database(db_path: Path, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(db_path), revision)
