"""`backup` (online copy of images.db) and `check-db` (full integrity check)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cli.app import common_options, options_of
from cli.main import register
from support.errors import ManagerError
from support.paths import database_path


@click.command("backup", help="Copy the live database (SQLite backup API; safe while jobs run). "
                              "Default target <state-dir>/images.db.backup.")
@click.option("--to", "target", default=None, type=click.Path(dir_okay=False), help="Where to write the copy.")
@common_options
@click.pass_context
def backup_cmd(ctx: click.Context, target: str | None) -> None:
    from daemon.database import backup_database

    state_dir = options_of(ctx).state_dir
    started = time.monotonic()
    written = backup_database(state_dir, Path(target) if target else None)
    click.echo(f"backup written: {written} ({written.stat().st_size} bytes, {time.monotonic() - started:.2f}s)")


@click.command("check-db", help="Run SQLite's full PRAGMA integrity_check on <state-dir>/images.db.")
@common_options
@click.pass_context
def check_db_cmd(ctx: click.Context) -> None:
    from daemon.database import check_integrity, restore_hint

    state_dir = options_of(ctx).state_dir
    db = database_path(state_dir)
    if not db.exists():
        raise ManagerError(f"database {db} does not exist")
    result = check_integrity(db, full=True)
    if not result.ok:
        raise ManagerError(f"database {db} failed its integrity check ({result.summary()}); {restore_hint(state_dir)}")
    click.echo(f"database {db}: integrity_check ok")


for _command in (backup_cmd, check_db_cmd):
    register(_command)
