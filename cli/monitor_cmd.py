"""`monitor`: a live terminal dashboard of the pool, jobs, transitions, orphans and health.
Reads only: no manager lock, no migration, no writes."""

from __future__ import annotations

import logging
import sys
import time

import click

from cli.app import common_options, default_backend, options_of
from cli.policy_opts import policy_of, policy_options
from devices.select import BACKENDS, open_pool


@click.command("monitor", help="Live dashboard: pool usage, jobs by state, running jobs, recent transitions, "
                               "orphaned devices, health checks. Reads only.")
@click.option("--once", is_flag=True, help="Print one frame and exit (plain text when stdout is not a terminal).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2), help="Seconds between frames.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Pool backend (default $FLYIO_BACKEND or auto).")
@policy_options
@common_options
@click.pass_context
def monitor_cmd(ctx: click.Context, once: bool, interval: float, backend: str | None, pool_warn: str | None,
                pool_high: str | None, pool_low: str | None) -> None:
    from rich.console import Console
    from rich.live import Live

    from daemon.dashboard import read_frame, render_plain, render_rich
    from safeguards.health import SystemHealthChecker

    # The dashboard shows failing checks itself; log lines on stderr would tear the screen.
    logging.disable(logging.WARNING)
    state_dir = options_of(ctx).state_dir
    policy = policy_of(pool_warn, pool_high, pool_low)
    pool = open_pool(state_dir, backend or default_backend())
    checker = SystemHealthChecker(pool_status=pool.get_pool_status)  # no state dir: its kernel-log cursor stays in memory

    def frame():  # type: ignore[no-untyped-def]
        return read_frame(state_dir, pool.get_pool_status, checker, policy)

    console = Console()
    if once:
        if sys.stdout.isatty():
            console.print(render_rich(frame()))
        else:
            click.echo(render_plain(frame()))
        return
    try:
        with Live(render_rich(frame()), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_rich(frame()), refresh=True)
    except KeyboardInterrupt:
        pass


COMMANDS = (monitor_cmd,)
