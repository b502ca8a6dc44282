"""Reading the image job's context: which layer the device loop is on, and its chain."""

from __future__ import annotations

from typing import Any

from fsm.context import StepContext
from states.data import ImageJobData
from states.services import ImageServices


def layers(ctx: StepContext) -> list[dict[str, Any]]:
    return ImageJobData(ctx.data).layers


def current_index(ctx: StepContext) -> int:
    return ImageJobData(ctx.data).layer_index


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
    return int(ImageJobData(ctx.data).devices[chain_id])


def top_device_id(ctx: StepContext) -> int:
    return device_of_chain(ctx, layers(ctx)[-1]["chain_id"])


def device_size(ctx: StepContext, services: ImageServices) -> int:
    """The size asked for this job's new base devices: the request's, else the default."""
    return int(ImageJobData(ctx.data).device_size_bytes or services.device_size_bytes)


def resolve_layer(ctx: StepContext, services: ImageServices) -> dict[str, Any]:
    """The current layer with its digest and chain id. A layer still downloading in the
    background is waited for (in slices: an abort or a shutdown ends the wait), recorded
    and, when the object was an archive of several layers, spliced in; a job resumed in
    another process fetches it here itself. Then its chain id, from the layer below."""
    from images.chain import next_chain_id
    from images.source import ObjectRef
    from states.downloading import fetch_object, record_layers

    index = current_index(ctx)
    layer = current_layer(ctx)
    fetched: list[dict[str, Any]] | None = None
    if layer.get("pending"):
        fetched = services.prefetch.take(ctx.job_id, layer["source"], ctx.check_interrupt)
        if fetched is None:
            ref = ObjectRef(url=layer["source"], size=layer.get("size"), etag=layer.get("etag"))
            fetched = fetch_object(ctx, services, ref, show_progress=True)
        layers(ctx)[index:index + 1] = [
            {"digest": f["digest"], "format": f["format"], "chain_id": None, "tar_bytes": f.get("tar_bytes")}
            for f in fetched]
        layer = current_layer(ctx)
    known = layer.get("chain_id") is not None
    if not known:
        parent = layers(ctx)[index - 1]["chain_id"] if index > 0 else None
        layer["chain_id"] = next_chain_id(parent, layer["digest"])
    # One commit at most, none for a layer known from the start (the hot path): recording
    # the fetched layers' rows saves the context in the same transaction.
    if fetched is not None:
        record_layers(ctx, fetched)
    elif not known:
        ctx.save()
    return layer
