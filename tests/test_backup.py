"""Online backup, the startup integrity check and check-db, on real SQLite files and real
processes (no root needed)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Writes jobs through the product's store, one transaction each, until argv[2] is a
# number of rows reached or, when it is a path, until that file appears.
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from cli.app import open_store
    store = open_store(Path(sys.argv[1]))
    limit, stop = (int(sys.argv[2]), None) if sys.argv[2].isdigit() else (10**9, sys.argv[2])
    i = 0
    while i < limit and not (stop and os.path.exists(stop)):
        store.create_or_get("image", f"writer-{i:05d}", "pending", {"n": i, "pad": "x" * 2000})
        i += 1
        time.sleep(0.002)
    print("wrote", i)
""")


def manager(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def keys_in(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return [k for (k,) in db.execute("SELECT idempotency_key FROM jobs ORDER BY id")]


def integrity(db_path: Path) -> str:
    with sqlite3.connect(db_path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def corrupt_middle(db_path: Path) -> None:
    """Overwrite a page's worth of bytes in the middle of the file, as a bad disk would."""
    size = db_path.stat().st_size
    with open(db_path, "r+b") as fh:
        fh.seek((size // 2) // 4096 * 4096)
        fh.write(b"\xa5" * 4096)


def wait_for_rows(db_path: Path, more_than: int, timeout: float = 60) -> None:
    """Until the jobs table holds more than `more_than` rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            if db.execute("SELECT count(*) FROM jobs").fetchone()[0] > more_than:
                return
        time.sleep(0.02)
    raise AssertionError(f"the writer added no row past {more_than} within {timeout}s")


def test_backup_of_a_live_database_while_another_process_writes(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert manager(state_dir, "fsm", "list").returncode == 0  # creates and migrates images.db
    stop_file = tmp_path / "stop-writing"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir), str(stop_file)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    backups: list[tuple[Path, list[str]]] = []
    try:
        for n in range(4):
            # Each copy after the writer has added rows since the last one (polled, not slept).
            wait_for_rows(state_dir / "images.db", more_than=len(backups[-1][1]) if backups else 0)
            target = tmp_path / f"copy-{n}.db"
            done = manager(state_dir, "backup", "--to", str(target))
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"backup written: {target} (")
            assert integrity(target) == "ok"
            backups.append((target, keys_in(target)))
        stop_file.touch()
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    written = int(out.split()[-1])
    expected = [f"writer-{i:05d}" for i in range(written)]
    # Each copy is one consistent moment: a prefix of the writer's rows, and they grow.
    counts = [len(keys) for _, keys in backups]
    for _, keys in backups:
        assert keys == expected[:len(keys)]
    assert counts == sorted(counts) and counts[-1] < written and counts[0] > 0, counts
    # The copy is a single self-contained file: restoring it is a plain cp.
    assert not any(p.name.endswith(("-wal", "-shm", ".tmp")) or ".tmp." in p.name
                   for p in tmp_path.iterdir() if p.name.startswith(("copy-", ".copy-")))

    # After the writer: the default target has every row.
    done = manager(state_dir, "backup")
    assert done.returncode == 0, done.stderr
    default = state_dir / "images.db.backup"
    assert keys_in(default) == expected and integrity(default) == "ok"


def test_corrupt_database_stops_every_command_with_one_line_naming_the_backup(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    writer = subprocess.run([sys.executable, "-c", WRITER, str(state_dir), "60"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert writer.returncode == 0, writer.stderr
    assert manager(state_dir, "backup").returncode == 0
    good = manager(state_dir, "check-db")
    assert good.returncode == 0 and "integrity_check ok" in good.stdout, good.stderr

    db = state_dir / "images.db"
    assert db.stat().st_size > 16 * 4096  # several pages: the middle one holds rows
    corrupt_middle(db)
    backup = state_dir / "images.db.backup"
    for command in (["fsm", "list"], ["images"], ["snapshots"]):
        done = manager(state_dir, *command)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"error: database {db} failed its integrity check (")
        assert lines[0].endswith(f"rebuild it from the pool: flyio-image-manager rebuild-db --force (or restore the "
                                 f"backup: cp {backup} {db}, then rebuild-db --merge; see docs/operations.md, "
                                 "Database Corruption)")
    bad = manager(state_dir, "check-db")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "failed its integrity check" in bad.stderr

    # The guide's restore works: after the cp, commands run and see the rows again.
    os.replace(backup, db)
    for leftover in (state_dir / "images.db-wal", state_dir / "images.db-shm"):
        leftover.unlink(missing_ok=True)
    listed = manager(state_dir, "fsm", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("writer-") == 60


def test_check_db_and_backup_of_a_missing_database_are_one_line_errors(tmp_path: Path) -> None:
    for command in (["check-db"], ["backup"]):
        done = manager(tmp_path / "empty", *command)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "does not exist" in done.stderr
    assert not (tmp_path / "empty" / "images.db").exists()


def test_startup_check_is_the_full_integrity_check(tmp_path: Path) -> None:
    """An index whose entries disagree with its table: quick_check passes it, integrity_check
    (what every command runs on startup) does not, and the command names the backup."""
    state_dir = tmp_path / "state"
    writer = subprocess.run([sys.executable, "-c", WRITER, str(state_dir), "40"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert writer.returncode == 0, writer.stderr
    db = state_dir / "images.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE INDEX ix_audit ON jobs (idempotency_key)")
        # Say the index is on another column: its entries no longer match the rows.
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX ix_audit ON jobs (state)' WHERE name = 'ix_audit'")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert integrity(db) != "ok"
    done = manager(state_dir, "fsm", "list")
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: database {db} failed its integrity check ("), done.stderr
    assert "ix_audit" in lines[0]
    assert lines[0].endswith(f"(or restore the backup: cp {state_dir / 'images.db.backup'} {db}, then "
                             "rebuild-db --merge; see docs/operations.md, Database Corruption)")
