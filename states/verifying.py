"""verifying: digests, formats by content, whole tar structures; archives split into layers."""

from __future__ import annotations

from typing import Any

from catalog.records import record_layer
from fsm.context import StepContext
from images.chain import chain_ids
from images.formats import ARCHIVE_FORMATS, layers_of_archive
from images.verify import verify_blob
from states.services import ImageServices


def run(ctx: StepContext, services: ImageServices) -> str:
    verified: list[dict[str, Any]] = []
    for blob in ctx.data["blobs"]:
        path = services.blobs.path(blob["digest"])
        result = verify_blob(path, blob["digest"], services.limits)
        if result.format in ARCHIVE_FORMATS:
            # An OCI layout or `docker save` archive holds the image's layers itself.
            for digest in layers_of_archive(path, result.format, services.blobs, services.limits):
                inner = verify_blob(services.blobs.path(digest), digest, services.limits)
                verified.append({"digest": digest, "format": inner.format, "tar_bytes": inner.uncompressed_bytes,
                                 "size": services.blobs.path(digest).stat().st_size,
                                 "source": f"{blob['url']}#{digest}", "etag": None})
        else:
            verified.append({"digest": result.digest, "format": result.format, "tar_bytes": result.uncompressed_bytes,
                             "size": path.stat().st_size,
                             "source": blob["url"], "etag": blob.get("etag")})
        ctx.check_stop()
    chains = chain_ids([layer["digest"] for layer in verified])
    with ctx.transaction() as session:
        for layer in verified:
            record_layer(session, digest=layer["digest"], size_bytes=layer["size"], fmt=layer["format"],
                         source=layer["source"], etag=layer["etag"])
    ctx.data["layers"] = [{"digest": layer["digest"], "format": layer["format"], "chain_id": chain,
                           "tar_bytes": layer["tar_bytes"]}
                          for layer, chain in zip(verified, chains)]
    ctx.data["layer_index"] = 0
    ctx.data["devices"] = {}
    return "verified"
