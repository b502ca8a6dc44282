"""The product's top-level commands: process-image, snapshot, setup-pool, images,
snapshots, delete-snapshot. Each parses, calls one thing, prints; no logic of its own.
What a command needs beyond click is imported inside it: `--help` starts fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.app import (common_options, exclusive, image_source_options, open_database, open_store, options_of,
                     registry_options, registry_options_of, result_line, show_progress)
from cli.policy_opts import policy_of, policy_options
from devices.select import BACKENDS
from fsm.definition import COMPLETE, FINAL_STATES
from support.errors import ManagerError
from support.log import get_logger
from support.sizes import parse_size

log = get_logger("cli")

# A command handed to the running daemon waits this long for its answer (a snapshot may wait
# for room in the pool, as the daemon's jobs do).
HANDOFF_TIMEOUT_SECONDS = 3600.0


class JobLeftWaiting(ManagerError):
    """The command's job waits for something only another command can give it."""


@click.command("process-image", help="Download, verify, unpack and snapshot one image, as a durable job.")
@image_source_options
@registry_options
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@click.option("--device-size", default="4G", show_default=True, help="Virtual size of each thin device.")
@common_options
@click.pass_context
def process_image(ctx: click.Context, s3_key: str | None, image: str | None, s3_prefix: str | None,
                  url: str | None, ref: str | None, bucket: str, endpoint_url: str | None, backend: str,
                  device_size: str) -> None:
    from devices.filesystem import layer_block_size
    from devices.limits import check_device_size
    from devices.select import open_pool
    from states.data import ImageJobData
    from states.submit import resolve_request

    options = options_of(ctx)
    size = parse_size(device_size)
    layer_block_size()  # checked with the other inputs, before the pool is looked at (the services read it)
    # The backend's limits (the pool is opened for real under the lock), before S3 is asked.
    check_device_size("--device-size", size, open_pool(options.state_dir, backend, say=False))
    request = resolve_request(bucket=bucket, s3_key=s3_key, image=image, s3_prefix=s3_prefix, url=url,
                              endpoint_url=endpoint_url, device_size_bytes=size, ref=ref,
                              registry=registry_options_of(ctx), state_dir=options.state_dir)
    with exclusive(options.state_dir, "process-image"):
        db = open_database(options.state_dir)
        job = _answer_as_it_stands(options.state_dir, backend, db, request)
        if job is not None:
            from support.reads import record_use

            record_use(db, request.source)
            log.info("image already complete; nothing to do", job_id=job["id"], image=request.name)
        else:
            job = _run_image_job(options.state_dir, backend, request)
    refuse_if_left_waiting(job["id"], job["state"], job["error"])
    click.echo(result_line(ImageJobData.of(job["context"]).result(job["id"], job["state"], job["error"], request.name)))
    if job["state"] != COMPLETE:
        ctx.exit(1)


def refuse_if_left_waiting(job_id: int, state: str, error: str | None) -> None:
    """A job this command left waiting (no room in the pool even after eviction): one
    `error:` line naming the job and its reason, which says what to run; exit 1. The lock is
    released by then, so the remedies it names can run."""
    if state not in FINAL_STATES and (error or "").startswith("waiting: "):
        reason = str(error)[len("waiting: "):]
        then = "" if "fsm resume" in reason else "; fsm resume runs it on"  # a health check's reason says none
        raise JobLeftWaiting(f"job {job_id} left waiting: {reason}{then}")


def _answer_as_it_stands(state_dir: Path, backend: str, db: Path, request: Any) -> dict[str, Any] | None:
    """The image's complete job, when nothing needs doing to answer with it: the pool is
    there and the job's snapshot is still at the path its context names. None: the full
    path runs (after a reboot it re-attaches the pool and re-activates the snapshots, and
    hands the snapshot out at the path it has now)."""
    from devices.select import open_pool
    from states.data import ImageJobData
    from states.submit import completed_job

    pool = open_pool(state_dir, backend)
    if not pool.get_pool_status().exists:
        return None
    job = completed_job(db, request)
    if job is None:
        return None
    data = ImageJobData.of(job["context"])
    if data.snapshot_device_id is not None and pool.active_path(data.snapshot_device_id) != data.snapshot_device:
        return None
    return job


def _run_image_job(state_dir: Path, backend: str, request: Any) -> dict[str, Any]:
    from states.registry import open_environment
    from states.submit import process_request

    environment = open_environment(state_dir, open_store(state_dir), backend=backend, show_progress=show_progress())
    log.info("safeguards initialized")
    job = process_request(environment.runner, request, environment.services)
    return {"id": job.id, "state": job.state, "context": job.context, "error": job.error}


@click.command("snapshot", help="Give a VM its own copy-on-write snapshot of a complete image, as a durable job.")
@click.argument("image")
@click.option("--vm", "vm_id", required=True, help="The VM's id: one snapshot per (image, VM); asking again returns it.")
@click.option("--size", default=None, help="The snapshot's size (default: the image's device size; larger grows its ext4).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@common_options
@click.pass_context
def snapshot_cmd(ctx: click.Context, image: str, vm_id: str, size: str | None, backend: str) -> None:
    from daemon.protocol import request_if_serving
    from states.names import check_vm_id

    options = options_of(ctx)
    check_vm_id(vm_id)  # with the size, before the lock or the database is touched
    if size:
        parse_size(size)
    handed = request_if_serving(options.state_dir, {"op": "snapshot", "image": image, "vm": vm_id, "size": size,
                                                    "wait": True}, timeout=HANDOFF_TIMEOUT_SECONDS)
    if handed is not None:  # the daemon holds the lock and runs the job: the same job, the same line
        log.info("handed to the running daemon", op="snapshot", job_id=handed.get("job_id"))
        click.echo(snapshot_result_line(handed.get("job_id"), handed.get("state"), handed.get("context"),
                                        handed.get("error")))
        if handed.get("state") != COMPLETE:
            ctx.exit(1)
        return
    from catalog.behind import refuse_if_behind
    from catalog.device_records import RecordStore
    from devices.limits import check_device_size
    from devices.select import open_pool
    from states.registry import open_environment
    from states.vm_snapshot import process_snapshot_request, resolve_snapshot

    size_bytes = None
    if size:  # checked against the backend's limits; the pool is opened for real under the lock
        size_bytes = check_device_size("--size", parse_size(size), open_pool(options.state_dir, backend, say=False))
    with exclusive(options.state_dir, "snapshot"):
        store = open_store(options.state_dir)
        # Before the image is looked up: after a lost database "not found" would mislead.
        refuse_if_behind(store.engine, RecordStore(options.state_dir))
        request = resolve_snapshot(store.engine, image, vm_id, size_bytes)
        environment = open_environment(options.state_dir, store, backend=backend, show_progress=show_progress())
        job = process_snapshot_request(environment.runner, request, environment.services)
    refuse_if_left_waiting(job.id, job.state, job.error)
    click.echo(snapshot_result_line(job.id, job.state, job.context, job.error))
    if job.state != COMPLETE:
        ctx.exit(1)


def snapshot_result_line(job_id: int | None, state: str | None, context: str | None, error: str | None) -> str:
    """`job_id= state= image= vm= snapshot= snapshot_device= size=`, as `snapshot` prints it."""
    from states.data import SnapshotJobData

    return result_line(SnapshotJobData.of(context).result(job_id, state, error))


@click.command("setup-pool", help="Create the thin pool if missing, or re-attach it after a reboot; "
                                  "--grow enlarges a live pool. Prints the pool's usage.")
@click.option("--db", "db", default=None, type=click.Path(dir_okay=False),
              help="Database path; the pool files go in its directory (default <state-dir>/images.db).")
@click.option("--data-size", default="2G", show_default=True)
@click.option("--metadata-size", default="1M", show_default=True)
@click.option("--data-block-size", "data_block_size", default=None, metavar="SIZE", envvar="FLYIO_POOL_DATA_BLOCK_SIZE",
              help="dm-thin data block size of a new pool, 64K to 1G in steps of 64K (default 1M, the guide's "
                   "table; env FLYIO_POOL_DATA_BLOCK_SIZE). An existing pool keeps its own.")
@click.option("--grow", "grow", default=None, metavar="SIZE", help="Grow the live pool's data to SIZE (never shrinks).")
@click.option("--grow-metadata", "grow_metadata", default=None, metavar="SIZE",
              help="Grow the live pool's metadata to SIZE (devicemapper).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@policy_options
@common_options
@click.pass_context
def setup_pool(ctx: click.Context, db: str | None, data_size: str, metadata_size: str, data_block_size: str | None,
               grow: str | None, grow_metadata: str | None, backend: str, pool_warn: str | None, pool_high: str | None,
               pool_low: str | None) -> None:
    from catalog.reconcile import ensure_pool
    from devices.base import PoolConfig
    from devices.limits import check_pool_size
    from devices.policy import usage_line, warn_if_above
    from devices.select import data_block_bytes_from, open_pool

    options = options_of(ctx)
    policy = policy_of(pool_warn, pool_high, pool_low)
    data_block_bytes = data_block_bytes_from(data_block_size)
    sizes = {flag: parse_size(text) if text else None for flag, text in (
        ("--data-size", data_size), ("--metadata-size", metadata_size), ("--grow", grow),
        ("--grow-metadata", grow_metadata))}
    state_dir = Path(db).parent if db else options.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    config = PoolConfig(directory=str(state_dir), data_size_bytes=int(sizes["--data-size"] or 0),
                        metadata_size_bytes=int(sizes["--metadata-size"] or 0), data_block_bytes=data_block_bytes)
    pool = open_pool(state_dir, backend, config)
    for flag, size in sizes.items():  # each a file in the state directory: checked before anything is made
        if size is not None:
            check_pool_size(flag, size, state_dir, pool.backend_name)
    grow_bytes, grow_metadata_bytes = sizes["--grow"], sizes["--grow-metadata"]
    with exclusive(state_dir, "setup-pool"):
        store = open_store(state_dir)
        status = ensure_pool(pool, store.engine)
        if grow_bytes is not None or grow_metadata_bytes is not None:
            pool.grow_pool(data_size_bytes=grow_bytes, metadata_size_bytes=grow_metadata_bytes)
        status = pool.validate_pool_health()
    warn_if_above(status, policy)
    click.echo(f"pool ready: backend={status.backend} data={status.used_data_blocks}/{status.total_data_blocks} "
               f"metadata={status.used_metadata_blocks}/{status.total_metadata_blocks} "
               f"data_block={status.data_block_bytes}")
    click.echo(f"pool usage: {usage_line(status, policy)}")


@click.command("images", help="List images and their activation status; --pin/--unpin keep an image from eviction.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--pin", "pin", default=None, metavar="NAME", help="Never evict this image (name or id).")
@click.option("--unpin", "unpin", default=None, metavar="NAME", help="Let this image be evicted again.")
@common_options
@click.pass_context
def images_cmd(ctx: click.Context, as_json: bool, pin: str | None, unpin: str | None) -> None:
    from support.reads import list_images

    if pin or unpin:
        from catalog.queries import pin_image

        if pin and unpin:
            raise click.UsageError("--pin and --unpin exclude each other")
        name = pin_image(open_store(options_of(ctx).state_dir).engine, str(pin or unpin), pinned=bool(pin))
        click.echo(f"image {name} {'pinned' if pin else 'unpinned'}")
        return
    rows = list_images(open_database(options_of(ctx).state_dir))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'ID':>4}  {'NAME':<20} {'LAYERS':>6}  {'STATUS':<9} {'TOP DEVICE':<12} {'PINNED':<6} SOURCE")
    for r in rows:
        click.echo(f"{r['id']:>4}  {r['name']:<20} {r['layer_count']:>6}  {r['activation_status']:<9} "
                   f"{r['top_device'] or '-':<12} {'yes' if r['pinned'] else '-':<6} {r['source']}")


@click.command("snapshots", help="List VM snapshots.")
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def snapshots_cmd(ctx: click.Context, as_json: bool) -> None:
    from devices.base import device_name
    from support.reads import list_snapshots

    rows = list_snapshots(open_database(options_of(ctx).state_dir))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'ID':>4}  {'DEVICE':<12} {'STATE':<9} {'IMAGE':<20} {'VM':<20} {'SIZE':>8}  ORIGIN")
    for r in rows:
        click.echo(f"{r['id']:>4}  {r['device_name']:<12} {r['state']:<9} {r['image']:<20} {r['vm_id'] or '-':<20} "
                   f"{_size(r['size_bytes']):>8}  {device_name(r['origin_device_id'])}")


def _size(size_bytes: int | None) -> str:
    if not size_bytes:
        return "-"
    for unit, scale in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size_bytes >= scale and size_bytes % scale == 0:
            return f"{size_bytes // scale}{unit}"
    return str(size_bytes)


@click.command("delete-snapshot", help="Deactivate and delete a snapshot's device, then its row: by id, or every "
                                      "snapshot of one VM with --vm.")
@click.argument("snapshot_id", type=int, required=False)
@click.option("--vm", "vm_id", default=None, help="Delete the snapshots of this VM instead of one by id.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@common_options
@click.pass_context
def delete_snapshot_cmd(ctx: click.Context, snapshot_id: int | None, vm_id: str | None, backend: str) -> None:
    from daemon.protocol import request_if_serving

    if (snapshot_id is None) == (vm_id is None):
        raise ManagerError("give a snapshot id or --vm VM_ID, not both")
    options = options_of(ctx)
    handed = request_if_serving(options.state_dir, {"op": "delete-snapshot", "snapshot_id": snapshot_id,
                                                    "vm": vm_id}, timeout=HANDOFF_TIMEOUT_SECONDS)
    if handed is not None:  # the daemon holds the lock: it deletes, through the same catalog call
        log.info("handed to the running daemon", op="delete-snapshot")
        names = list(handed["deleted"])
    else:
        from catalog.queries import delete_snapshot
        from devices.select import open_pool

        with exclusive(options.state_dir, "delete-snapshot"):
            store = open_store(options.state_dir)
            names = delete_snapshot(store.engine, open_pool(options.state_dir, backend), snapshot_id, vm_id=vm_id)
    what = f"snapshot {snapshot_id}" if snapshot_id is not None else f"VM {vm_id}'s snapshot"
    click.echo(f"deleted {what} ({', '.join(names)})")


COMMANDS = (process_image, snapshot_cmd, setup_pool, images_cmd, snapshots_cmd, delete_snapshot_cmd)
