"""The product's top-level commands: process-image, setup-pool, images, snapshots,
delete-snapshot. Each parses, calls one thing, prints; no logic of its own."""

from __future__ import annotations

import json

import click

from cli.app import common_options, exclusive, image_source_options, open_store, options_of, show_progress
from cli.main import register
from catalog.queries import delete_snapshot, list_images, list_snapshots
from catalog.reconcile import ensure_pool
from devices.select import BACKENDS, open_pool
from fsm.runner import Runner
from states.registry import all_workflows, build_services
from states.submit import process_request, resolve_request
from support.log import get_logger
from support.sizes import parse_size

log = get_logger("cli")


@click.command("process-image", help="Download, verify, unpack and snapshot one image, as a durable job.")
@image_source_options
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@click.option("--device-size", default="4G", show_default=True, help="Virtual size of each thin device.")
@common_options
@click.pass_context
def process_image(ctx: click.Context, s3_key: str | None, image: str | None, s3_prefix: str | None,
                  url: str | None, bucket: str, endpoint_url: str | None, backend: str, device_size: str) -> None:
    options = options_of(ctx)
    request = resolve_request(bucket=bucket, s3_key=s3_key, image=image, s3_prefix=s3_prefix, url=url,
                              endpoint_url=endpoint_url)
    with exclusive(options.state_dir, "process-image"):
        services = build_services(options.state_dir, backend=backend, device_size_bytes=parse_size(device_size),
                                  show_progress=show_progress())
        log.info("safeguards initialized")
        store = open_store(options.state_dir)
        ensure_pool(services.pool, store.engine)
        runner = Runner(store, all_workflows(services))
        job = process_request(runner, request)
    data = json.loads(job.context or "{}")
    result = {"job_id": job.id, "state": job.state, "image": request.name,
              "device": _top_device(data), "snapshot": data.get("snapshot_device_id") and f"thin-{data['snapshot_device_id']}",
              "snapshot_device": data.get("snapshot_device"), "error": job.error}
    click.echo(" ".join(f"{k}={v}" for k, v in result.items() if v is not None))
    if job.state != "complete":
        ctx.exit(1)


def _top_device(data: dict) -> str | None:
    layers = data.get("layers") or []
    devices = data.get("devices") or {}
    if not layers or layers[-1]["chain_id"] not in devices:
        return None
    return f"thin-{devices[layers[-1]['chain_id']]}"


@click.command("setup-pool", help="Create the thin pool if missing, or re-attach it after a reboot.")
@click.option("--db", "db", default=None, type=click.Path(dir_okay=False),
              help="Database path; the pool files go in its directory (default <state-dir>/images.db).")
@click.option("--data-size", default="2G", show_default=True)
@click.option("--metadata-size", default="1M", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@common_options
@click.pass_context
def setup_pool(ctx: click.Context, db: str | None, data_size: str, metadata_size: str, backend: str) -> None:
    from pathlib import Path

    from devices.base import PoolConfig

    options = options_of(ctx)
    state_dir = Path(db).parent if db else options.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    config = PoolConfig(directory=str(state_dir), data_size_bytes=parse_size(data_size),
                        metadata_size_bytes=parse_size(metadata_size))
    with exclusive(state_dir, "setup-pool"):
        store = open_store(state_dir)
        pool = open_pool(state_dir, backend, config)
        status = ensure_pool(pool, store.engine)
        status = pool.validate_pool_health()
    click.echo(f"pool ready: backend={status.backend} data={status.used_data_blocks}/{status.total_data_blocks} "
               f"metadata={status.used_metadata_blocks}/{status.total_metadata_blocks}")


@click.command("images", help="List images and their activation status.")
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def images_cmd(ctx: click.Context, as_json: bool) -> None:
    rows = list_images(open_store(options_of(ctx).state_dir).engine)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'ID':>4}  {'NAME':<20} {'LAYERS':>6}  {'STATUS':<9} {'TOP DEVICE':<12} SOURCE")
    for r in rows:
        click.echo(f"{r['id']:>4}  {r['name']:<20} {r['layer_count']:>6}  {r['activation_status']:<9} "
                   f"{r['top_device'] or '-':<12} {r['source']}")


@click.command("snapshots", help="List VM snapshots.")
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def snapshots_cmd(ctx: click.Context, as_json: bool) -> None:
    rows = list_snapshots(open_store(options_of(ctx).state_dir).engine)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'ID':>4}  {'DEVICE':<12} {'STATE':<9} {'IMAGE':<20} ORIGIN")
    for r in rows:
        click.echo(f"{r['id']:>4}  {r['device_name']:<12} {r['state']:<9} {r['image']:<20} thin-{r['origin_device_id']}")


@click.command("delete-snapshot", help="Deactivate and delete one snapshot's device, then its row.")
@click.argument("snapshot_id", type=int)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@common_options
@click.pass_context
def delete_snapshot_cmd(ctx: click.Context, snapshot_id: int, backend: str) -> None:
    options = options_of(ctx)
    with exclusive(options.state_dir, "delete-snapshot"):
        store = open_store(options.state_dir)
        name = delete_snapshot(store.engine, open_pool(options.state_dir, backend), snapshot_id)
    click.echo(f"deleted snapshot {snapshot_id} ({name})")


for _command in (process_image, setup_pool, images_cmd, snapshots_cmd, delete_snapshot_cmd):
    register(_command)

from cli import db_cmds  # noqa: E402,F401  (backup, check-db)
from cli import daemon_cmds  # noqa: E402,F401  (daemon, shutdown, submit)
from cli import monitor_cmd  # noqa: E402,F401  (monitor)
from cli import gc  # noqa: E402,F401  (gc)
