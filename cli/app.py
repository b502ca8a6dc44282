"""What every command shares: the state directory, logging, the database, the lock."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from support.log import configure_logging
from support.paths import database_path, lock_path, resolve_state_dir

if TYPE_CHECKING:  # the engine (SQLAlchemy, transitions, tenacity) loads only for commands that use it
    from fsm.runner import Runner
    from fsm.store import JobStore
    from safeguards.manager_lock import ManagerLock


@dataclass
class AppOptions:
    state_dir: Path
    log_format: str = "text"
    quiet: bool = False
    verbose: bool = False


_last_options: AppOptions | None = None


def last_options() -> AppOptions:
    """The options of the command being run, for error messages raised after click returns."""
    return _last_options or AppOptions(state_dir=resolve_state_dir(None))


def configure(ctx: click.Context, state_dir: str | None, log_format: str, quiet: bool, verbose: bool) -> AppOptions:
    """Store the global options on the click context and set up logging once."""
    options = AppOptions(state_dir=resolve_state_dir(state_dir), log_format=log_format, quiet=quiet, verbose=verbose)
    ctx.find_root().obj = options
    global _last_options
    _last_options = options
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    configure_logging(log_format=log_format, level=level)
    return options


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let a subcommand take the global options after its name too (`process-image ... --quiet`)."""

    def override(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value in (None, False):
            return value
        options = options_of(ctx)
        if param.name == "state_dir":
            options.state_dir = Path(value)
        else:
            setattr(options, str(param.name), value)
        configure(ctx.find_root(), str(options.state_dir), options.log_format, options.quiet, options.verbose)
        return value

    for option in reversed([
        click.option("--state-dir", default=None, type=click.Path(file_okay=False), expose_value=False,
                     callback=override, help="State directory (default /var/lib/flyio)."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default=None, expose_value=False,
                     callback=override, help="Log lines as text or JSON."),
        click.option("--quiet", "-q", is_flag=True, default=False, expose_value=False, callback=override,
                     help="Only warnings and errors; no progress bars."),
        click.option("--verbose", "-v", is_flag=True, default=False, expose_value=False, callback=override,
                     help="Debug logging."),
    ]):
        fn = option(fn)
    return fn


def image_source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Where an image comes from, as process-image and submit both take it."""
    from images.bucket import DEFAULT_BUCKET

    for option in reversed([
        click.option("--s3-key", default=None, help="One object: an image of one layer (e.g. images/node/5.tar)."),
        click.option("--image", default=None, help="A family: images/<family>/<n>.tar applied in numeric order."),
        click.option("--s3-prefix", default=None, help="A family by key prefix (e.g. images/node/)."),
        click.option("--url", default=None, help="s3://bucket/key, s3://bucket/prefix/ or file:///path."),
        click.option("--ref", default=None, help="An image in an OCI registry: REGISTRY/REPO[:TAG|@sha256:DIGEST]."),
        click.option("--bucket", default=DEFAULT_BUCKET, show_default=True),
        click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", default=None,
                     help="S3-compatible endpoint (env AWS_ENDPOINT_URL)."),
    ]):
        fn = option(fn)
    return fn


def registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """How a --ref image's registry is reached; passed on as one `registry` dict (None when
    no option was given)."""

    def collect(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value not in (None, False):
            ctx.meta.setdefault("registry_options", {})[str(param.name)] = value
        return value

    for option in reversed([
        click.option("--platform", default=None, expose_value=False, callback=collect,
                     help="With --ref: the image of this OS/ARCH[/VARIANT] in an index (default: this host's, "
                          "linux/amd64)."),
        click.option("--plain-http", "plain_http", is_flag=True, default=False, expose_value=False, callback=collect,
                     help="With --ref: plain HTTP, for a registry on 127.0.0.1 only (TLS is verified elsewhere)."),
        click.option("--ca-cert", "ca_cert", default=None, expose_value=False, callback=collect,
                     type=click.Path(dir_okay=False, exists=True, resolve_path=True),
                     help="With --ref: the CA bundle that signs the registry's certificate."),
        click.option("--registry-config", "registry_config", default=None, expose_value=False, callback=collect,
                     type=click.Path(dir_okay=False, resolve_path=True),
                     help="With --ref: credentials (a docker config.json with `auths`) instead of "
                          "~/.docker/config.json."),
    ]):
        fn = option(fn)
    return fn


def registry_options_of(ctx: click.Context) -> dict[str, Any] | None:
    """The registry options given to this command (None: none)."""
    return ctx.meta.get("registry_options") or None


def options_of(ctx: click.Context) -> AppOptions:
    root = ctx.find_root()
    if not isinstance(root.obj, AppOptions):
        root.obj = AppOptions(state_dir=resolve_state_dir(None))
    return root.obj


def state_dir_of(ctx: click.Context) -> Path:
    return options_of(ctx).state_dir


def open_database(state_dir: Path) -> Path:
    """`<state-dir>/images.db`, checked and migrated to the newest schema (sqlite3 only when
    it is already there: the listing commands read it without loading SQLAlchemy)."""
    from daemon.database import integrity_check_once
    from migrations import upgrade_database

    db_path = database_path(state_dir)
    integrity_check_once(state_dir)  # once per process: a corrupt file stops here, naming the backup
    upgrade_database(db_path)
    return db_path


def open_store(state_dir: Path) -> JobStore:
    """The job store on `<state-dir>/images.db`, migrated to the newest schema first."""
    from fsm.database import open_engine
    from fsm.store import JobStore

    return JobStore(open_engine(open_database(state_dir)))


@contextmanager
def exclusive(state_dir: Path, command: str) -> Iterator[ManagerLock]:
    """Hold the manager lock for `command` (the guide's "Manager Lock")."""
    from safeguards.manager_lock import ManagerLock

    lock = ManagerLock(lock_path(state_dir), command)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def open_runner(state_dir: Path, will_run_jobs: bool = True) -> Runner:
    """A runner of the product's workflows with real services (pool, S3, safeguards).

    A runner that will run jobs first makes sure the pool exists (after a reboot it is
    recreated from its files and the catalog reconciled with it), as the guide's first
    process-image does."""
    from states.registry import open_environment

    return open_environment(state_dir, open_store(state_dir), backend=default_backend(),
                            show_progress=show_progress(), ensure_pool=will_run_jobs).runner


def result_line(result: Mapping[str, Any]) -> str:
    """A job's result (states/data.py `result`) as the one `key=value` line the commands
    print: the fields that have a value, in order."""
    return " ".join(f"{key}={value}" for key, value in result.items() if value is not None)


def default_backend() -> str:
    """`--backend` when a command has none: $FLYIO_BACKEND, else auto."""
    return os.environ.get("FLYIO_BACKEND", "auto")


def show_progress() -> bool:
    return not last_options().quiet
