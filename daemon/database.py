"""Database maintenance: an online backup (SQLite's backup API, safe while jobs write)
and integrity checks (the full integrity_check when a command opens the store and on
demand; a quick_check of a fresh backup copy; the pragma itself is support/reads.py's)."""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from support.errors import ManagerError
from support.paths import database_path
from support.reads import integrity_problems

BACKUP_SUFFIX = ".backup"


class DatabaseCorrupt(ManagerError):
    """The database failed an integrity check; the message names the backup to restore."""


@dataclass(frozen=True)
class IntegrityResult:
    ok: bool
    problems: tuple[str, ...]

    def summary(self, limit: int = 3) -> str:
        shown = "; ".join(self.problems[:limit])
        more = len(self.problems) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


def default_backup_path(state_dir: Path) -> Path:
    """`<state-dir>/images.db.backup`, the file the guide restores from."""
    db = database_path(state_dir)
    return db.with_name(db.name + BACKUP_SUFFIX)


def restore_hint(state_dir: Path) -> str:
    """The safe way back: rebuilt from the pool (which a backup may be behind), or the backup
    restored and then merged with the pool (docs/operations.md, Database Corruption)."""
    db = database_path(state_dir)
    return (f"rebuild it from the pool: flyio-image-manager rebuild-db --force (or restore the backup: "
            f"cp {default_backup_path(state_dir)} {db}, then rebuild-db --merge; see docs/operations.md, "
            f"Database Corruption)")


def check_integrity(db_path: Path, *, full: bool = False) -> IntegrityResult:
    """`PRAGMA quick_check` (or the full `integrity_check`); a file that is not a database
    at all is a failed check too, not an exception."""
    try:
        rows = integrity_problems(db_path, full=full)
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise
        return IntegrityResult(False, (str(exc),))
    ok = rows == ["ok"]
    # SQLite prefixes the first problem with "*** in database main ***" and a newline.
    problems = tuple(" ".join(r.replace("*** in database main ***", "").split()) for r in rows)
    return IntegrityResult(ok, () if ok else problems)


_checked: set[Path] = set()
_checked_lock = threading.Lock()


def integrity_check_once(state_dir: Path) -> None:
    """Run `PRAGMA integrity_check` on `<state-dir>/images.db` once per process (a missing
    database is fine: it is about to be created). Raises DatabaseCorrupt naming the backup.

    The full check, not quick_check: it also finds indexes that disagree with their
    tables, and on this small database it costs about 2 ms (4 MiB; 22 ms at 40 MiB)."""
    db = database_path(state_dir)
    key = db.resolve()
    with _checked_lock:
        if key in _checked or not db.exists() or db.stat().st_size == 0:
            return
        result = check_integrity(db, full=True)
        if not result.ok:
            raise DatabaseCorrupt(f"database {db} failed its integrity check ({result.summary(1)}); {restore_hint(state_dir)}")
        _checked.add(key)


def backup_database(state_dir: Path, target: Path | None = None) -> Path:
    """Copy the live database to `target` (default `<state-dir>/images.db.backup`) with the
    SQLite backup API: a consistent snapshot even while other processes write. Written to
    a temporary name, checked, fsynced, then renamed, so the target is never half-written."""
    db = database_path(state_dir)
    if not db.exists():
        raise ManagerError(f"database {db} does not exist; nothing to back up")
    target = Path(target) if target else default_backup_path(state_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        dest = sqlite3.connect(tmp)
        try:
            # pages=-1: the whole database in one step, i.e. one read snapshot; a WAL
            # reader never blocks the writers, and nothing restarts when they commit.
            source.backup(dest, pages=-1)
            # A single-file copy: the restore is a plain `cp`, with no -wal beside it.
            dest.execute("PRAGMA journal_mode=DELETE")
        finally:
            dest.close()
            source.close()
        result = check_integrity(tmp)
        if not result.ok:
            raise DatabaseCorrupt(f"backup of {db} failed its integrity check ({result.summary(1)}); {target} left as it was")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except sqlite3.DatabaseError as exc:
        raise ManagerError(f"backup of {db} to {target} failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
