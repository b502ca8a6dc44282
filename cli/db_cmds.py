"""`backup` (online copy of images.db) and `check-db` (full integrity check)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from cli.app import common_options, exclusive, open_store, options_of
from devices.select import BACKENDS
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
    missing = _missing_from_catalog(state_dir)
    if missing:
        from catalog.behind import MERGE_HINT

        names = ", ".join(record.name for record in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ManagerError(f"database {db} passed its integrity check but is behind the pool: {len(missing)} ready "
                           f"device(s) recorded beside the pool have no row ({names}); {MERGE_HINT}")
    click.echo(f"database {db}: integrity_check ok")


def _missing_from_catalog(state_dir: Path) -> list:
    """Ready device records no row names (read-only: check-db changes nothing)."""
    from sqlalchemy.orm import Session

    from catalog.behind import missing_from_catalog
    from catalog.device_records import RecordStore
    from catalog.gc import open_read_only

    with Session(open_read_only(database_path(state_dir))) as session:
        return missing_from_catalog(session, RecordStore(state_dir))


@click.command("rebuild-db", help="Rebuild images.db from the pool's devices and the records they keep beside it "
                                  "(a lost or corrupt database); --merge adds to a database that is behind the pool "
                                  "(an older backup restored) what it lacks.")
@click.option("--merge", is_flag=True, help="Keep the database and add what the pool holds and it lacks.")
@click.option("--force", is_flag=True, help="Replace a healthy database (the old file is kept as "
                                            "images.db.corrupt-<time>).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@common_options
@click.pass_context
def rebuild_db_cmd(ctx: click.Context, merge: bool, force: bool, backend: str) -> None:
    from catalog.device_records import RecordStore
    from catalog.reconcile import reconcile
    from devices.select import open_pool
    from states.rebuild import rebuild_catalog

    if merge and force:
        raise ManagerError("--merge and --force exclude each other: merge keeps the database, force replaces it")
    state_dir = options_of(ctx).state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(state_dir, "rebuild-db"):
        kept_aside = _set_database_aside(state_dir, merge=merge, force=force)
        store = open_store(state_dir)
        pool = open_pool(state_dir, backend)
        attached = pool.get_pool_status().exists
        pool.ensure_pool_exists()  # after a reboot the pool's files are re-attached, never recreated
        report = rebuild_catalog(store.engine, pool, RecordStore(state_dir), merge=merge)
        if not attached:
            reconcile(pool, store.engine)  # the catalog's own ready snapshots activated again, as after a reboot
    if kept_aside:
        click.echo(f"old database kept aside: {kept_aside}")
    click.echo(f"found: devices={report.devices_in_pool} device_records={report.records}")
    if merge and report.added == 0:
        click.echo(f"nothing to merge: the catalog names every ready device in the pool (kept={report.kept})")
    else:
        click.echo(f"{'merged' if merge else 'rebuilt'}: images={len(report.images)} layers={len(report.layers)} "
                   f"snapshots={len(report.snapshots)} jobs={report.jobs} kept={report.kept} "
                   f"next_device_id={report.next_device_id}")
        for name in report.images:
            click.echo(f"image rebuilt: {name}")
    for name, why in report.orphans.items():
        click.echo(f"not named: {name} ({why}); left for gc")
    for name, why in report.unplaced.items():
        click.echo(f"ready, not placed: {name} ({why}); kept, never deleted by gc")
    for name in report.gone:
        click.echo(f"record of a device the pool no longer holds: {name}; moved to records/gone/")
    for problem in report.unreadable:
        click.echo(f"unreadable record: {problem}")


def _set_database_aside(state_dir: Path, *, merge: bool, force: bool) -> Path | None:
    """Make way for the rebuild: a missing database is fine; a corrupt one (or, with --force,
    a healthy one) is renamed images.db.corrupt-<time> with its -wal and -shm; a healthy one
    is refused unless merging into it."""
    from daemon.database import check_integrity
    from support.reads import catalog_is_empty

    db = database_path(state_dir)
    if not db.exists() or db.stat().st_size == 0:
        return None
    healthy = check_integrity(db, full=True).ok
    if healthy and (merge or catalog_is_empty(db)):
        return None  # merged into; or a new, empty catalog (made by a command run after the loss)
    if healthy and not force:
        raise ManagerError(f"database {db} is healthy; `rebuild-db --merge` adds what the pool holds and it lacks, "
                           f"`rebuild-db --force` replaces it (the old file is kept aside)")
    aside = db.with_name(f"{db.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("-wal", "-shm", ""):
        part = db.with_name(db.name + suffix)
        if part.exists():
            os.replace(part, aside.with_name(aside.name + suffix))
    return aside


COMMANDS = (backup_cmd, check_db_cmd, rebuild_db_cmd)
