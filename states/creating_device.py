"""creating_device: the current layer's device. The base layer gets a fresh thin device;
each next layer a snapshot of its parent's. A chain already unpacked is reused as it is.

Intent first: the device's row (state `creating`) commits before the device is made. A
device this job left unfinished (a crash mid-layer) is not trusted and not touched: it is
recorded as orphaned for gc, and the layer starts again on a new device."""

from __future__ import annotations

from catalog.records import begin_layer_device, find_chain, orphan_device, set_layer_device_state
from fsm.context import StepContext
from states.layers import current_index, current_layer, device_of_chain, layers
from states.services import ImageServices
from support.errors import TransientError
from support.log import get_logger

log = get_logger("states.creating_device")


class ChainBusy(TransientError):
    """Another job is making this layer chain's device right now (two images sharing a
    base layer, run at once by the daemon): wait for it, then reuse its device."""


def run(ctx: StepContext, services: ImageServices) -> str:
    # The guard (and its health check) first: a check that makes the step wait must find
    # no row written yet, or the re-run would orphan a device that was never made.
    with services.operation("create-device"):
        return _create_or_reuse(ctx, services)


def _create_or_reuse(ctx: StepContext, services: ImageServices) -> str:
    layer = current_layer(ctx)
    index = current_index(ctx)
    parent_chain = layers(ctx)[index - 1]["chain_id"] if index > 0 else None
    with ctx.transaction() as session:
        row = find_chain(session, layer["chain_id"])
        if row is not None and row.state == "ready":
            ctx.data["devices"][layer["chain_id"]] = row.device_id
            ctx.data["layer_index"] = index + 1
            log.info("layer already unpacked; reusing its device", layer=index + 1, chain_id=layer["chain_id"],
                     device_name=row.device_name)
            return "layer_reused"
        if row is not None and row.job_id != ctx.job_id:
            raise ChainBusy(f"layer chain {layer['chain_id']} is being unpacked by job {row.job_id}")
        if row is not None:
            orphan_device(session, device_id=row.device_id, job_id=ctx.job_id,
                          reason=f"interrupted in state {row.state}; contents untrusted")
            log.warning("unfinished device from an interrupted run left for gc", device_name=row.device_name)
        row = begin_layer_device(session, chain_id=layer["chain_id"], layer_digest=layer["digest"],
                                 parent_chain_id=parent_chain, size_bytes=services.device_size_bytes,
                                 job_id=ctx.job_id)
        ctx.data["devices"][layer["chain_id"]] = row.device_id
        device_id, name = row.device_id, row.device_name
    if parent_chain is None:
        services.pool.create_thin(device_id, services.device_size_bytes)
    else:
        services.pool.create_snapshot(device_id, device_of_chain(ctx, parent_chain))
    with ctx.transaction() as session:
        set_layer_device_state(session, device_id, "created")
    log.info("device created", device_name=name, layer=index + 1, base=parent_chain is None)
    return "device_created"
