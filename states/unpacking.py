"""unpacking: the current layer applied onto its device, mounted nodev,nosuid, by the safe
extractor; then written back (syncfs: a write the device failed surfaces here), unmounted
and deactivated, and the chain marked ready for reuse.

An I/O error or a read-only filesystem while unpacking is the device's fault, not the
tar's: a hazard. The device stays mounted as it is and the abort records it for gc."""

from __future__ import annotations

import errno

from devices.base import device_name
from devices.filesystem import LAYER_UNPACK_MOUNT_OPTIONS, flush_filesystem
from devices.mount import mounted
from fsm.context import StepContext
from images.formats import open_layer_stream
from images.unpack import UnpackFailed, unpack_layer
from states.data import ImageJobData
from states.layers import current_index, current_layer, device_of_chain
from states.names import ImageEvent
from states.services import ImageServices
from support.errors import HazardError
from support.log import get_logger

log = get_logger("states.unpacking")

UNPACK_FAILED = "failed to unpack layer; leaving device mounted for manual/GC cleanup"
DEVICE_ERRNOS = (errno.EIO, errno.EROFS)


def run(ctx: StepContext, services: ImageServices) -> str:
    layer = current_layer(ctx)
    index = current_index(ctx)
    device_id = device_of_chain(ctx, layer["chain_id"])
    blob = services.blobs.path(layer["digest"])
    target = services.mount_root / device_name(device_id)
    target.mkdir(parents=True, exist_ok=True)
    ledger = services.ledger(ctx)
    with services.operation("unpack-image"):
        path = ledger.activate(device_id)
        ledger.begin_unpack(device_id)
        # The unpacker reports bytes of (decompressed) tar read; verification counted them.
        bar = services.progress(f"unpack layer {index + 1}", layer.get("tar_bytes") or blob.stat().st_size)
        try:
            with mounted(path, target, options=LAYER_UNPACK_MOUNT_OPTIONS):
                try:
                    with open_layer_stream(blob, layer["format"], services.limits) as stream:
                        stats = unpack_layer(stream, target, limits=services.limits, on_progress=bar.advance_to)
                    flush_filesystem(target)
                except (UnpackFailed, HazardError) as exc:
                    if not _is_device_fault(exc):
                        raise
                    log.error(UNPACK_FAILED, device_id=device_id, device_name=device_name(device_id),
                              mount_point=str(target), error=str(exc))
                    raise HazardError(f"{UNPACK_FAILED}: {exc}", device_name=device_name(device_id)) from exc
        finally:
            bar.close()
        ledger.deactivate(device_id)
    target.rmdir()
    ledger.mark_ready(device_id)
    ImageJobData(ctx.data).layer_index = index + 1
    log.info("layer unpacked", layer=index + 1, device_name=device_name(device_id), entries=stats.entries,
             bytes=stats.bytes_written, seconds=round(stats.seconds, 2))
    return ImageEvent.LAYER_UNPACKED


def _is_device_fault(exc: UnpackFailed | HazardError) -> bool:
    """A hazard, or a write the filesystem refused with EIO/EROFS: the device, not the tar."""
    if isinstance(exc, HazardError):
        return True
    return isinstance(exc.__cause__, OSError) and exc.__cause__.errno in DEVICE_ERRNOS
