"""SQLite through SQLAlchemy, set up the way a crash-safe job store needs it.

pysqlite's implicit BEGIN is unreliable, so autocommit is switched off at the driver and
every transaction starts with BEGIN IMMEDIATE: a deferred transaction that later upgrades
to a write gets SQLITE_BUSY at once in WAL mode, whatever the busy timeout.
"""

from __future__ import annotations

import sqlite3
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from support.errors import ManagerError

BUSY_TIMEOUT_MS = 5000
_open_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class DatabaseError(ManagerError):
    """The database file is corrupt, not a database, or locked past the busy timeout."""


def open_engine(db_path: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    """An engine on `db_path` with WAL, a busy timeout, foreign keys and durable commits."""
    engine = create_engine(
        f"sqlite:///{db_path}",
        connect_args={"timeout": busy_timeout_ms / 1000, "isolation_level": None, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed transition survives a power cut
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    _open_engines.add(engine)
    return engine


def close_all_engines() -> None:
    """Close every pooled connection, so the last one out checkpoints the WAL into images.db
    and removes it. A process that leaves without this leaves images.db-wal beside the file,
    and the guide's restore (`cp images.db.backup images.db`) would then have SQLite replay
    that newer WAL onto the restored file: a corrupt database."""
    for engine in list(_open_engines):
        engine.dispose()


def describe_database_error(db_path: Path, exc: BaseException) -> DatabaseError:
    """Turn a driver error into one line an operator can act on."""
    text = str(getattr(exc, "orig", None) or exc)
    if "locked" in text or "busy" in text:
        return DatabaseError(f"database {db_path} is locked by another process (waited {BUSY_TIMEOUT_MS // 1000}s): {text}")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return DatabaseError(
            f"database {db_path} is corrupt ({text}); rebuild it from the pool with `flyio-image-manager rebuild-db --force` (see docs/operations.md, Database Corruption)"
        )
    return DatabaseError(f"database {db_path}: {text}")
