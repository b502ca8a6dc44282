"""making_fs: an ext4 filesystem on the base layer's device.

A mkfs that fails or times out is a hazard: the device is left exactly as it is (active)
and the job aborts; the abort hook records it for gc."""

from __future__ import annotations

from devices.base import device_name
from devices.filesystem import make_filesystem
from fsm.context import StepContext
from states.layers import current_layer, device_of_chain
from states.names import ImageEvent
from states.services import ImageServices
from support.errors import HazardError, ManagerError
from support.log import get_logger

log = get_logger("states.making_fs")

MKFS_FAILED = "failed to create filesystem; leaving device active for manual/GC cleanup"


def run(ctx: StepContext, services: ImageServices) -> str:
    device_id = device_of_chain(ctx, current_layer(ctx)["chain_id"])
    with services.operation("make-filesystem"):
        path = services.ledger(ctx).activate(device_id)
        try:
            make_filesystem(path, block_size=services.layer_block_size)
        except ManagerError as exc:
            log.error(MKFS_FAILED, device_id=device_id, device=path, error=str(exc),
                      timed_out=isinstance(exc, HazardError))
            raise HazardError(f"{MKFS_FAILED}: {exc}", device_name=device_name(device_id)) from exc
    return ImageEvent.FS_MADE
