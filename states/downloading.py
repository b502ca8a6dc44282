"""downloading: every object of the image into the blob store, verified blobs never twice."""

from __future__ import annotations

from catalog.records import find_verified_layer
from fsm.context import StepContext
from images.source import ObjectRef, fetch_blob
from states.services import ImageServices
from support.log import get_logger

log = get_logger("states.downloading")


def run(ctx: StepContext, services: ImageServices) -> str:
    blobs: list[dict[str, object]] = []
    client = None
    for obj in ctx.data["objects"]:
        ref = ObjectRef(url=obj["url"], size=obj.get("size"), etag=obj.get("etag"))
        with ctx.transaction() as session:
            known = find_verified_layer(session, ref.url, ref.etag)
            known_digest = known.digest if known else None
        if known_digest and services.blobs.has(known_digest):
            log.info("blob already present", url=ref.url, digest=known_digest)
            blobs.append({"url": ref.url, "digest": known_digest, "etag": ref.etag})
            continue
        if client is None and ref.scheme == "s3":
            client = services.s3_client(ctx.data["image"].get("endpoint_url"))
        bar = services.progress(f"download {ref.url.rsplit('/', 1)[-1]}", ref.size)
        try:
            info = fetch_blob(ref, services.blobs, client, known_digest=known_digest,
                              on_progress=lambda done, total: bar.advance_to(done))
        finally:
            bar.close()
        log.info("blob downloaded", url=ref.url, digest=info.digest, bytes=info.size, transferred=info.transferred)
        blobs.append({"url": ref.url, "digest": info.digest, "etag": ref.etag})
        ctx.check_stop()
    ctx.data["blobs"] = blobs
    return "downloaded"
