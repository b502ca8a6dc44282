"""Entry points: `flyio-image-manager` (every command) and `fsm` (the job group alone)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import click

from cli import commands, daemon_cmds, db_cmds, gc, monitor_cmd
from cli.app import configure, exclusive, last_options, open_database, open_runner, open_store, state_dir_of
from fsm.cli import FsmApp, make_fsm_group
from support.errors import ManagerError
from support.paths import database_path

GLOBAL_OPTIONS = [
    click.option("--state-dir", envvar="FLYIO_STATE_DIR", default=None, type=click.Path(file_okay=False),
                 help="State directory (default /var/lib/flyio; env FLYIO_STATE_DIR). The database is <state-dir>/images.db."),
    click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                 help="Log lines as logrus-style text or JSON."),
    click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars."),
    click.option("--verbose", "-v", is_flag=True, help="Debug logging."),
]


def with_global_options(fn: Callable[..., object]) -> Callable[..., object]:
    for option in reversed(GLOBAL_OPTIONS):
        fn = option(fn)
    return fn


def _workflows() -> dict:
    from states.registry import all_workflows

    return all_workflows()


FSM_APP = FsmApp(workflows=_workflows, open_store=open_store, open_database=open_database, open_runner=open_runner,
                 exclusive=exclusive, state_dir=state_dir_of)
fsm_group = make_fsm_group(FSM_APP)


@click.group(help="Turns container images into ready-to-boot filesystems on thin devices.")
@with_global_options
@click.pass_context
def app(ctx: click.Context, state_dir: str | None, log_format: str, quiet: bool, verbose: bool) -> None:
    configure(ctx, state_dir, log_format, quiet, verbose)


app.add_command(fsm_group)


@click.group(name="fsm", help="Inspect and steer durable jobs (same as `flyio-image-manager fsm`).")
@with_global_options
@click.pass_context
def fsm_app(ctx: click.Context, state_dir: str | None, log_format: str, quiet: bool, verbose: bool) -> None:
    configure(ctx, state_dir, log_format, quiet, verbose)


for _name, _command in fsm_group.commands.items():
    fsm_app.add_command(_command, _name)


def run_cli(group: click.Group, argv: list[str] | None = None) -> int:
    """Run a click group; every expected failure is one line on stderr and exit code 1."""
    try:
        result = group.main(args=argv, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 1
    except ManagerError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:
        if not _is_database_error(exc):
            raise
        from fsm.database import describe_database_error

        click.echo(f"error: {describe_database_error(_db_path_for_error(), exc)}", err=True)
        return 1


def _is_database_error(exc: BaseException) -> bool:
    """A SQLAlchemy DBAPIError, without importing SQLAlchemy (~300 ms) for commands that
    never touched it: a command that raised one has imported it already."""
    exc_module = sys.modules.get("sqlalchemy.exc")
    return exc_module is not None and isinstance(exc, exc_module.DBAPIError)


def _db_path_for_error() -> object:
    return database_path(last_options().state_dir)


def exit_now(code: int) -> NoReturn:
    """Leave without tearing the interpreter down: freeing botocore's and SQLAlchemy's objects
    at exit is ~50 ms of a short command, work nobody waits for. Output and log handlers are
    flushed first; while another non-daemon thread is alive, the normal exit joins it."""
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    database = sys.modules.get("fsm.database")
    if database is not None:
        database.close_all_engines()  # no images.db-wal left behind (fsm/database.py says why)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can reach the reader
    os._exit(code)


def ignore_lease_breaks() -> None:
    """SIGIO is what the kernel sends a file lease's holder when another process opens the
    file; its default action ends the process. The blockfile backend holds a lease for a
    moment to ask whether a device file is open elsewhere (devices/blockfile.py)."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def main() -> None:
    from safeguards.first_sample import take_first_sample

    ignore_lease_breaks()
    take_first_sample()  # a job's first I/O-wait window runs during start-up (safeguards/first_sample.py)
    exit_now(run_cli(app))


def fsm_main() -> None:
    ignore_lease_breaks()
    exit_now(run_cli(fsm_app))


# The product's commands: each module lists its own; none imports this one back.
for _command in (*commands.COMMANDS, *db_cmds.COMMANDS, *daemon_cmds.COMMANDS, *monitor_cmd.COMMANDS, *gc.COMMANDS):
    app.add_command(_command)
