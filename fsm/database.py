"""SQLite through SQLAlchemy, set up the way a crash-safe job store needs it.

pysqlite's implicit BEGIN is unreliable, so autocommit is switched off at the driver and
every transaction starts with BEGIN IMMEDIATE: a deferred transaction that later upgrades
to a write gets SQLITE_BUSY at once in WAL mode, whatever the busy timeout. A connection
used only to read (`READ_ONLY`, JobStore's reads) begins a plain deferred transaction: in WAL
mode it neither waits for nor blocks the writer.

The writers of one process take turns on a lock before BEGIN IMMEDIATE (WRITER_LOCK_OF):
a thread waiting for another thread's commit is woken the moment it ends, where SQLite's
busy handler would sleep 1, 2, 5, 10... ms between tries (the daemon's workers, four
clients' snapshots at once). Other processes still meet the busy timeout.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from support.errors import ManagerError

BUSY_TIMEOUT_MS = 5000
READ_ONLY = "flyio_read_only"  # an execution option: this connection's transactions only read
_open_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_writer_locks: dict[str, threading.Lock] = {}
_writer_locks_guard = threading.Lock()


def writer_lock_of(database: str) -> threading.Lock:
    """The one lock this process's writers of `database` take turns on."""
    with _writer_locks_guard:
        return _writer_locks.setdefault(database, threading.Lock())


class _TurnTakingConnection(sqlite3.Connection):
    """A connection whose write transactions hold this process's writer lock from BEGIN
    IMMEDIATE to COMMIT or ROLLBACK."""

    def __init__(self, database: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._writer_lock = writer_lock_of(str(database))
        self._wait_s = float(kwargs.get("timeout", BUSY_TIMEOUT_MS / 1000))
        self._holds_writer_lock = False

    def take_writer_turn(self) -> bool:
        """Wait for this process's other writers (False past the busy timeout)."""
        if not self._writer_lock.acquire(timeout=self._wait_s):
            return False
        self._holds_writer_lock = True
        return True

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release_writer_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release_writer_lock()

    def close(self) -> None:
        """A connection closed mid-transaction (an invalidated one) gives up its turn too."""
        try:
            super().close()
        finally:
            self._release_writer_lock()

    def _release_writer_lock(self) -> None:
        if self._holds_writer_lock:
            self._holds_writer_lock = False
            self._writer_lock.release()


class DatabaseError(ManagerError):
    """The database file is corrupt, not a database, or locked past the busy timeout."""


def open_engine(db_path: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    """An engine on `db_path` with WAL, a busy timeout, foreign keys and durable commits."""
    engine = create_engine(
        f"sqlite:///{db_path}",
        connect_args={"timeout": busy_timeout_ms / 1000, "isolation_level": None, "check_same_thread": False,
                      "factory": _TurnTakingConnection},
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
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            _begin_write(conn)

    _open_engines.add(engine)
    return engine


def _begin_write(conn: Any) -> None:
    """BEGIN IMMEDIATE on its writer's turn; past the busy timeout, the error SQLite itself
    gives ("database is locked"), as SQLAlchemy wraps it."""
    from sqlalchemy.exc import OperationalError

    dbapi_conn = conn.connection.dbapi_connection
    if not dbapi_conn.take_writer_turn():
        raise OperationalError("BEGIN IMMEDIATE", None,
                               sqlite3.OperationalError("database is locked (by another thread of this process)"))
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        dbapi_conn.rollback()  # nothing begun: this only ends the turn
        raise


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
