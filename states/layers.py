"""Reading the image job's context: which layer the device loop is on, and its chain."""

from __future__ import annotations

from typing import Any

from fsm.context import StepContext
from states.services import ImageServices


def layers(ctx: StepContext) -> list[dict[str, Any]]:
    return ctx.data["layers"]


def current_index(ctx: StepContext) -> int:
    return int(ctx.data.get("layer_index", 0))


def current_layer(ctx: StepContext) -> dict[str, Any]:
    return layers(ctx)[current_index(ctx)]


def is_base_layer(ctx: StepContext) -> bool:
    return current_index(ctx) == 0


def is_upper_layer(ctx: StepContext) -> bool:
    return not is_base_layer(ctx)


def layers_remaining(ctx: StepContext) -> bool:
    return current_index(ctx) < len(layers(ctx))


def all_layers_done(ctx: StepContext) -> bool:
    return not layers_remaining(ctx)


def device_of_chain(ctx: StepContext, chain_id: str) -> int:
    return int(ctx.data["devices"][chain_id])


def top_device_id(ctx: StepContext) -> int:
    return device_of_chain(ctx, layers(ctx)[-1]["chain_id"])


def device_size(ctx: StepContext, services: ImageServices) -> int:
    """The size asked for this job's new base devices: the request's, else the default."""
    return int(ctx.data["image"].get("device_size_bytes") or services.device_size_bytes)
