"""creating_device: the current layer's device. The base layer gets a fresh thin device;
each next layer a snapshot of its parent's. A chain already unpacked is reused as it is,
at its own size.

Intent first (the device ledger writes the row before the kernel call). A device this job
left unfinished (a crash mid-layer) is not trusted and not touched: it is recorded as
orphaned for gc, and the layer starts again on a new device."""

from __future__ import annotations

from catalog.models import DeviceState
from catalog.records import find_chain
from fsm.context import StepContext
from states.admission import admit
from states.data import ImageJobData
from states.layers import current_index, current_layer, device_size, layers, resolve_layer
from states.names import ImageEvent
from states.services import ImageServices
from support.errors import TransientError
from support.log import get_logger

log = get_logger("states.creating_device")


class ChainBusy(TransientError):
    """Another job is making this layer chain's device right now (two images sharing a
    base layer, run at once by the daemon): wait for it, then reuse its device."""


def run(ctx: StepContext, services: ImageServices) -> str:
    # The layer's blob first, outside the guard: a wait for a background download must not
    # hold other jobs' device steps. Then admission, also before the guard: evicting takes
    # the guard itself, and a wait must find no row written yet (a chain already ready
    # needs no room). Then the guard (and its health check): a check that makes the step
    # wait must find no row written yet, or the re-run would orphan a device that was
    # never made.
    layer = resolve_layer(ctx, services)
    with ctx.transaction() as session:
        row = find_chain(session, layer["chain_id"])
        ready = row is not None and row.state == DeviceState.READY
    if not ready:
        admit(services, tar_bytes=int(layer.get("tar_bytes") or 0), base=current_index(ctx) == 0, job_id=ctx.job_id)
    with services.operation("create-device"):
        return _create_or_reuse(ctx, services)


def _create_or_reuse(ctx: StepContext, services: ImageServices) -> str:
    layer = current_layer(ctx)
    index = current_index(ctx)
    parent_chain = layers(ctx)[index - 1]["chain_id"] if index > 0 else None
    ledger = services.ledger(ctx)
    data = ImageJobData(ctx.data)
    with ctx.transaction() as session:
        row = find_chain(session, layer["chain_id"])
        if row is not None and row.state == DeviceState.READY:
            data.devices[layer["chain_id"]] = row.device_id
            data.layer_index = index + 1
            log.info("layer already unpacked; reusing its device", layer=index + 1, chain_id=layer["chain_id"],
                     device_name=row.device_name, size=row.size_bytes)
            _log_if_resized(row.device_name, row.size_bytes, device_size(ctx, services))
            return ImageEvent.LAYER_REUSED
        if row is not None and row.job_id != ctx.job_id:
            raise ChainBusy(f"layer chain {layer['chain_id']} is being unpacked by job {row.job_id}")
        stale = row.device_id if row is not None else None
    if stale is not None:
        ledger.orphan(stale, reason=f"interrupted in state {row.state}; contents untrusted", job_id=ctx.job_id)
        log.warning("unfinished device from an interrupted run left for gc", device_name=row.device_name)
    device = ledger.create_layer_device(chain_id=layer["chain_id"], layer_digest=layer["digest"],
                                        parent_chain_id=parent_chain, size_bytes=device_size(ctx, services),
                                        job_id=ctx.job_id)
    data.devices[layer["chain_id"]] = device.device_id
    ctx.save()
    log.info("device created", device_name=device.name, layer=index + 1, base=parent_chain is None,
             size=device.size_bytes)
    if parent_chain is not None:
        _log_if_resized(device.name, device.size_bytes, device_size(ctx, services))
    return ImageEvent.DEVICE_CREATED


def _log_if_resized(name: str, chain_size: int, asked: int) -> None:
    """A chain made at another --device-size keeps its size: say so, do not fail."""
    if chain_size != asked:
        log.info("layer chain keeps its own size", device_name=name, size=chain_size, requested_size=asked)
