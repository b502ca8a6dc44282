"""Start-up cost: what a command imports before it does anything. Real processes, real
SQLite files; no timing assertions (bench/startup figures are in docs/performance.md)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from migrations import head_revision, stored_revision, upgrade_database

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("alembic", "sqlalchemy", "boto3", "botocore", "rich", "prometheus_client", "transitions", "tenacity")


def imported_after(code: str) -> set[str]:
    """The heavy top-level packages a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split()) & set(HEAVY)


def test_head_revision_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    from migrations import alembic_config

    assert head_revision() == ScriptDirectory.from_config(alembic_config(Path("/nonexistent.db"))).get_current_head()


def test_a_database_at_head_is_not_migrated_and_alembic_not_imported(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    upgrade_database(db)
    assert stored_revision(db) == head_revision()
    assert imported_after(f"from migrations import upgrade_database\nfrom pathlib import Path\n"
                          f"upgrade_database(Path({str(db)!r}))") == set()


def test_a_database_behind_head_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "images.db"
    upgrade_database(db, "0001")
    assert stored_revision(db) == "0001"
    upgrade_database(db)
    assert stored_revision(db) == head_revision()
    tables = {row[0] for row in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "job_notes" in tables  # made by 0003


def test_no_database_has_no_revision(tmp_path: Path) -> None:
    assert stored_revision(tmp_path / "absent.db") is None
    (tmp_path / "empty.db").touch()
    assert stored_revision(tmp_path / "empty.db") is None


def test_the_cli_shared_module_and_progress_import_nothing_heavy() -> None:
    assert imported_after("import cli.app, support.progress, migrations") == set()


def test_help_loads_nothing_heavy() -> None:
    """`--help` of the product and of `fsm` import none of the heavy libraries."""
    for entry in ("cli.main", "fsm.cli"):
        assert imported_after(f"import {entry}") == set(), entry
