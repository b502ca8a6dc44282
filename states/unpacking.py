"""unpacking: the current layer applied onto its device, mounted nodev,nosuid, by the safe
extractor; then unmounted and deactivated, and the chain marked ready for reuse."""

from __future__ import annotations

from catalog.records import set_layer_device_state
from devices.base import device_name
from devices.mount import mounted
from fsm.context import StepContext
from images.formats import open_layer_stream
from images.unpack import unpack_layer
from states.layers import current_index, current_layer, device_of_chain
from states.services import ImageServices
from support.log import get_logger

log = get_logger("states.unpacking")


def run(ctx: StepContext, services: ImageServices) -> str:
    layer = current_layer(ctx)
    index = current_index(ctx)
    device_id = device_of_chain(ctx, layer["chain_id"])
    blob = services.blobs.path(layer["digest"])
    target = services.mount_root / device_name(device_id)
    target.mkdir(parents=True, exist_ok=True)
    with services.operation("unpack-image"):
        path = services.pool.activate(device_id, services.device_size_bytes)
        with ctx.transaction() as session:
            set_layer_device_state(session, device_id, "unpacking")
        # The unpacker reports bytes of (decompressed) tar read; verification counted them.
        bar = services.progress(f"unpack layer {index + 1}", layer.get("tar_bytes") or blob.stat().st_size)
        try:
            with mounted(path, target):
                with open_layer_stream(blob, layer["format"], services.limits) as stream:
                    stats = unpack_layer(stream, target, limits=services.limits, on_progress=bar.advance_to)
        finally:
            bar.close()
        services.pool.deactivate(device_id)
    target.rmdir()
    with ctx.transaction() as session:
        set_layer_device_state(session, device_id, "ready")
    ctx.data["layer_index"] = index + 1
    log.info("layer unpacked", layer=index + 1, device_name=device_name(device_id), entries=stats.entries,
             bytes=stats.bytes_written, seconds=round(stats.seconds, 2))
    return "layer_unpacked"
