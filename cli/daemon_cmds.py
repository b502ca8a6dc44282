"""`daemon`, `shutdown` and `submit`: the long-running manager and its two clients."""

from __future__ import annotations

import time

import click

from cli.app import (common_options, image_source_options, open_store, options_of, registry_options,
                     registry_options_of, result_line)
from daemon.protocol import DaemonNotRunning, request
from devices.select import BACKENDS
from fsm.definition import COMPLETE
from cli.policy_opts import policy_of, policy_options
from support.errors import ManagerError
from support.sizes import parse_size


@click.command("daemon", help="Run jobs submitted on <state-dir>/fsm/manager.sock, with Prometheus metrics; "
                              "stops gracefully on SIGTERM or `flyio-image-manager shutdown`.")
@click.option("--metrics-port", default=9464, show_default=True, type=int, help="Prometheus metrics port (0: off).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True, help="Address the metrics endpoint binds.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Jobs run at once (downloads overlap; device operations stay one at a time).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", envvar="FLYIO_BACKEND", show_default=True,
              help="Pool backend (env FLYIO_BACKEND).")
@click.option("--device-size", default="4G", show_default=True,
              help="Virtual size of each thin device, unless a request gives its own device_size.")
@click.option("--health-interval", default=30.0, show_default=True, type=float,
              help="Seconds between the periodic health checks (and pool usage checks: eviction above the "
                   "high watermark).")
@policy_options
@common_options
@click.pass_context
def daemon_cmd(ctx: click.Context, metrics_port: int, metrics_address: str, workers: int, backend: str,
               device_size: str, health_interval: float, pool_warn: str | None, pool_high: str | None,
               pool_low: str | None) -> None:
    from daemon.server import Daemon, DaemonConfig
    from devices.limits import check_device_size
    from devices.select import open_pool

    state_dir = options_of(ctx).state_dir
    size = check_device_size("--device-size", parse_size(device_size), open_pool(state_dir, backend, say=False))
    state_dir.mkdir(parents=True, exist_ok=True)
    config = DaemonConfig(state_dir=state_dir, backend=backend, workers=workers, device_size_bytes=size,
                          metrics_address=metrics_address, metrics_port=metrics_port or None,
                          health_interval=health_interval, policy=policy_of(pool_warn, pool_high, pool_low))
    ctx.exit(Daemon(config, open_store(state_dir)).serve())


@click.command("shutdown", help="Ask the running daemon to stop gracefully (jobs resume on its next start).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the daemon has released its socket.")
@click.option("--timeout", default=120.0, show_default=True, type=float)
@common_options
@click.pass_context
def shutdown_cmd(ctx: click.Context, wait: bool, timeout: float) -> None:
    state_dir = options_of(ctx).state_dir
    reply = request(state_dir, {"op": "shutdown"})
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                request(state_dir, {"op": "status"}, timeout=5)
            except DaemonNotRunning:
                break
            except ManagerError:
                pass  # answering "stopping" or closing: keep waiting
            time.sleep(0.5)
        else:
            raise ManagerError(f"daemon pid {reply.get('pid')} did not stop within {timeout:g}s")
    click.echo(f"daemon pid {reply.get('pid')} {'stopped' if wait else 'stopping'}")


@click.command("submit", help="Queue a request on the running daemon: process-image (an image source option) or, "
                              "with --snapshot IMAGE --vm VM_ID, a VM's snapshot; prints the request id.")
@image_source_options
@registry_options
@click.option("--device-size", default=None, help="Virtual size of each thin device (default: the daemon's).")
@click.option("--snapshot", "snapshot_of", default=None, metavar="IMAGE",
              help="Snapshot this complete image (name or id) for --vm, as `snapshot` does.")
@click.option("--vm", "vm_id", default=None, help="With --snapshot: the VM's id.")
@click.option("--size", default=None, help="With --snapshot: the snapshot's size (default: the image's).")
@click.option("--wait", is_flag=True, help="Poll until the job is final and print the command's result line.")
@click.option("--timeout", default=3600.0, show_default=True, type=float, help="With --wait: give up after this long.")
@common_options
@click.pass_context
def submit_cmd(ctx: click.Context, s3_key: str | None, image: str | None, s3_prefix: str | None, url: str | None,
               ref: str | None, bucket: str, endpoint_url: str | None, device_size: str | None, snapshot_of: str | None,
               vm_id: str | None, size: str | None, wait: bool, timeout: float) -> None:
    state_dir = options_of(ctx).state_dir
    message = _snapshot_message(snapshot_of, vm_id, size) if snapshot_of or vm_id or size else None
    if message is None:
        given = {k: v for k, v in (("s3_key", s3_key), ("image", image), ("s3_prefix", s3_prefix), ("url", url),
                                   ("ref", ref)) if v}
        if len(given) != 1:
            raise ManagerError("give exactly one of --s3-key, --image, --s3-prefix, --url or --ref "
                               "(or --snapshot IMAGE --vm VM_ID)")
        given.update(registry_options_of(ctx) or {})  # the daemon's "platform", "plain_http", ...
        if device_size:
            parse_size(device_size)  # a bad size fails here, not in the daemon
        message = {"op": "process-image", **given, "bucket": bucket, "endpoint_url": endpoint_url,
                   "device_size": device_size}
    elif s3_key or image or s3_prefix or url or ref or device_size:
        raise ManagerError("--snapshot takes no image source or --device-size options")
    if not wait:
        reply = request(state_dir, message)
        name = f"request={reply['id']}" if reply.get("id") is not None else f"job={reply['job_id']}"
        click.echo(f"{name} state={reply['state']}")
        return
    status = request(state_dir, {**message, "wait": True}, timeout=timeout)  # answered once the job ends
    if not status.get("final"):
        raise ManagerError(f"job {status.get('job_id')} not final ({status.get('state')}: {status.get('error')}); "
                           "`fsm show` says where it stands")
    click.echo(result_line(job_result(status, image=message["op"] == "process-image")))
    if status.get("job_state") != COMPLETE:
        ctx.exit(1)


def _snapshot_message(image: str | None, vm_id: str | None, size: str | None) -> dict:
    if not image or not vm_id:
        raise ManagerError("a snapshot needs both --snapshot IMAGE and --vm VM_ID")
    from states.names import check_vm_id

    check_vm_id(vm_id)  # the daemon checks it too; refused here without a round trip
    if size:
        parse_size(size)
    return {"op": "snapshot", "image": image, "vm": vm_id, "size": size}


def job_result(status: dict, *, image: bool) -> dict:
    """What the daemon answered of a final job, as the command that runs it in place reports
    it (`process-image`'s fields for an image job, `snapshot`'s for a VM's)."""
    from states.data import ImageJobData, SnapshotJobData

    fields = (status.get("job_id"), status.get("job_state") or status.get("state"), status.get("error"))
    return (ImageJobData if image else SnapshotJobData).of(status.get("context")).result(*fields)


COMMANDS = (daemon_cmd, shutdown_cmd, submit_cmd)
