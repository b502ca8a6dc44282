"""verifying: record what the streaming checks of downloading found, and lay out the
image's layers and chain ids. Reads no blob: each one was checked as it streamed in.

A job interrupted here before the streaming checks existed carries blobs without a
"format": those (only those) are verified from the store in one pass.
"""

from __future__ import annotations

import itertools
from typing import Any

from catalog.records import record_layer
from fsm.context import StepContext
from images.chain import chain_ids
from images.formats import ARCHIVE_FORMATS, layers_of_archive
from images.verify import BlobCheck, verify_blob
from states.data import ImageJobData
from states.names import ImageEvent
from states.services import ImageServices
from support.log import get_logger

log = get_logger("states.verifying")


def run(ctx: StepContext, services: ImageServices) -> str:
    data = ImageJobData(ctx.data)
    layers: list[dict[str, Any]] = []
    for blob in data.blobs:
        if blob.get("pending"):
            layers.append(blob)  # downloading in the background; resolved when its turn comes
            continue
        layers.extend([blob] if "format" in blob else _verify_unchecked(ctx, blob, services))
    for layer in layers:
        if not layer.get("pending"):
            log.info("blob verified", digest=layer["digest"], format=layer["format"], entries=layer.get("entries"),
                     uncompressed_bytes=layer.get("tar_bytes"), source=layer["source"])
    # Chain ids of the layers known now; a pending layer and those above it get theirs in
    # creating_device (a chain id depends on every layer below).
    known = [layer["digest"] for layer in itertools.takewhile(lambda layer: not layer.get("pending"), layers)]
    chains = chain_ids(known) + [None] * (len(layers) - len(known))
    data.layers = [_pending_layer(layer) if layer.get("pending") else
                   {"digest": layer["digest"], "format": layer["format"], "chain_id": chain,
                    "tar_bytes": layer.get("tar_bytes")}
                   for layer, chain in zip(layers, chains)]
    data.layer_index = 0
    data.devices = {}
    return ImageEvent.VERIFIED


def _pending_layer(blob: dict[str, Any]) -> dict[str, Any]:
    return {"pending": True, "source": blob["source"], "size": blob.get("size"), "etag": blob.get("etag"),
            "digest": None, "chain_id": None}


def _verify_unchecked(ctx: StepContext, blob: dict[str, Any], services: ImageServices) -> list[dict[str, Any]]:
    """A blob downloaded before the streaming checks existed: verified from the store."""
    path = services.blobs.path(blob["digest"])
    result = verify_blob(path, blob["digest"], services.limits)
    if result.format in ARCHIVE_FORMATS:
        inner = layers_of_archive(path, result.format, services.blobs, services.limits,
                                  check=lambda size: BlobCheck(size, services.limits))
        layers = [{"digest": b.digest, "format": b.findings.format, "size": b.size,  # type: ignore[union-attr]
                   "source": f"{blob['url']}#{b.digest}", "etag": None, "entries": b.findings.entries,  # type: ignore[union-attr]
                   "tar_bytes": b.findings.uncompressed_bytes} for b in inner]  # type: ignore[union-attr]
    else:
        layers = [{"digest": result.digest, "format": result.format, "size": path.stat().st_size,
                   "source": blob["url"], "etag": blob.get("etag"), "entries": result.entries,
                   "tar_bytes": result.uncompressed_bytes}]
    with ctx.transaction() as session:
        for layer in layers:
            record_layer(session, digest=layer["digest"], size_bytes=layer["size"], fmt=layer["format"],
                         source=layer["source"], etag=layer["etag"])
    return layers
