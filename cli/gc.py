"""`flyio-image-manager gc [--dry-run] [--force]`: the guide's Garbage Collection Procedure.

A dry run (the default) opens the database read-only (no migration, no checkpoint); --force
takes the manager lock, refuses while a job runs or a dm/loop process is stuck in D
state, then cleans. The logic is catalog/gc.py; this parses and prints."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.app import common_options, exclusive, open_store, options_of
from cli.policy_opts import policy_of, policy_options
from devices.select import BACKENDS, open_pool
from support.errors import ManagerError
from support.log import configure_logging, get_logger
from support.paths import database_path

if TYPE_CHECKING:
    from devices.base import ThinPool
    from devices.policy import UsagePolicy

log = get_logger("catalog.gc")


@click.command("gc", help="Find thin devices no database row names; with --force, delete them. --images: evict "
                          "least recently used images (dry run unless --force).")
@click.option("--dry-run", "dry_run", is_flag=True, help="Only list orphaned devices (the default).")
@click.option("--force", is_flag=True, help="Unmount, deactivate and delete orphaned devices.")
@click.option("--images", "images", is_flag=True,
              help="Evict unused, unpinned images, least recently used first, until data usage is below the low "
                   "watermark (a dry run unless --force).")
@click.option("--all", "all_images", is_flag=True, help="With --images: every evictable image, whatever the usage.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@policy_options
@common_options
@click.pass_context
def gc_cmd(ctx: click.Context, dry_run: bool, force: bool, images: bool, all_images: bool, backend: str,
           pool_warn: str | None, pool_high: str | None, pool_low: str | None) -> None:
    from catalog.gc import GcRefused, collect_garbage, log_summary, open_read_only, refuse_if_jobs_running
    from safeguards.health import SystemHealthChecker
    from safeguards.setup import build_cleanup_guard

    if dry_run and force:
        raise ManagerError("--dry-run and --force exclude each other; choose one")
    if all_images and not images:
        raise ManagerError("--all goes with --images")
    options = options_of(ctx)
    state_dir = options.state_dir
    policy = policy_of(pool_warn, pool_high, pool_low)
    # The log is this command's report: on stdout, so the guide's
    # `gc --dry-run | grep "orphaned="` works; errors stay one line on stderr.
    configure_logging(log_format=options.log_format, stream=sys.stdout,
                      level=logging.DEBUG if options.verbose else logging.WARNING if options.quiet else logging.INFO)
    db = database_path(state_dir)
    if not db.exists():
        raise ManagerError(f"database {db} does not exist; without it every device would look orphaned")
    if images:
        _evict(state_dir, backend, policy, force=force, all_images=all_images)
        return
    if not force:
        log.info("Running in DRY RUN mode - no changes will be made")
        report = collect_garbage(open_read_only(db), _attached_pool(state_dir, backend), dry_run=True)
        log_summary(report)
        return
    log.warning("Running in FORCE mode - orphaned devices will be deleted")
    log.warning("IMPORTANT: Ensure no FSMs are currently running before proceeding")
    log.warning("IMPORTANT: This command should only be run when the system is idle")
    with exclusive(state_dir, "gc"):
        store = open_store(state_dir)
        refuse_if_jobs_running(store.engine)
        dstate = SystemHealthChecker(pool_status=None).check_dstate()
        if not dstate.passed:
            raise GcRefused(f"{dstate.reading}; reboot before running gc --force")
        report = collect_garbage(store.engine, _attached_pool(state_dir, backend), dry_run=False,
                                 operation=build_cleanup_guard(state_dir))
    log_summary(report)
    if not report.ok:
        ctx.exit(1)


def _evict(state_dir: Path, backend: str, policy: UsagePolicy, *, force: bool, all_images: bool) -> None:
    """gc --images: the plan (dry run) or the eviction, printed one image per line."""
    from catalog.eviction import evict_images
    from catalog.gc import open_read_only
    from safeguards.setup import build_cleanup_guard
    from states.data import job_uses

    if not force:
        report = evict_images(open_read_only(database_path(state_dir)), _attached_pool(state_dir, backend), policy,
                              uses_of=job_uses, dry_run=True, all_images=all_images)
    else:
        with exclusive(state_dir, "gc"):
            store = open_store(state_dir)
            report = evict_images(store.engine, _attached_pool(state_dir, backend), policy, uses_of=job_uses,
                                  dry_run=False, all_images=all_images, operation=build_cleanup_guard(state_dir))
    verb = "would evict" if report.dry_run else "evicted"
    for candidate in report.evicted:
        click.echo(f"{verb} image={candidate.name} id={candidate.image_id} last_used={candidate.last_used_at} "
                   f"devices={','.join(d.name for d in candidate.devices) or '-'} "
                   f"estimated_bytes={candidate.estimated_bytes}")
    for name, why in report.skipped.items():
        click.echo(f"skipped image={name} reason={why!r}")
    for name, why in report.kept.items():
        click.echo(f"kept image={name} reason={why!r}")
    after = report.after or report.before
    click.echo(f"images: {verb.replace(' ', '_')}={len(report.evicted)} skipped={len(report.skipped)} "
               f"kept={len(report.kept)} estimated_bytes={report.estimated_bytes} "
               f"data_before={report.before.data_used_fraction:.1%} data_after={after.data_used_fraction:.1%} "
               f"{policy.describe()}" + (" DRY RUN: nothing changed; --force to evict" if report.dry_run else ""))


def _attached_pool(state_dir: Path, backend: str) -> ThinPool:
    """The pool, which must already exist: gc neither creates nor re-attaches one."""
    pool = open_pool(state_dir, backend)
    status = pool.get_pool_status()
    if not status.exists:
        raise ManagerError(f"the thin pool ({pool.backend_name}) is not attached; run setup-pool first")
    return pool


COMMANDS = (gc_cmd,)
