"""downloading: every object of the image into the blob store, checked as it streams in;
verified blobs never fetched or read twice.

Each blob's digest, format and whole tar structure are checked on the bytes as they arrive
(images.verify.BlobCheck inside fetch_blob); a blob is stored, and its layer row written
with verified_at, only once every check passed. So a retry of this state (the engine's
NETWORK_RETRY, the one retry layer) skips the blobs already done and resumes the one that
was cut off by Range. An OCI layout or `docker save` archive is split into its layers
here, each checked as it is copied out.
"""

from __future__ import annotations

from typing import Any

from catalog.records import find_verified_layer, record_layer
from fsm.context import StepContext
from images.blobstore import BlobInfo
from images.formats import ARCHIVE_FORMATS, layers_of_archive
from images.source import ObjectRef, fetch_blob
from images.verify import BlobCheck, StreamFindings
from states.services import ImageServices
from support.log import get_logger

log = get_logger("states.downloading")


def run(ctx: StepContext, services: ImageServices) -> str:
    blobs: list[dict[str, Any]] = []
    client = None

    def check(size: int) -> BlobCheck:
        return BlobCheck(size, services.limits)

    for obj in ctx.data["objects"]:
        ref = ObjectRef(url=obj["url"], size=obj.get("size"), etag=obj.get("etag"))
        with ctx.transaction() as session:
            known = find_verified_layer(session, ref.url, ref.etag)
            known_layer = {"digest": known.digest, "format": known.format, "size": known.size_bytes} if known else None
        if known_layer and services.blobs.has(known_layer["digest"]):
            log.info("blob already present", url=ref.url, digest=known_layer["digest"])
            blobs.append({**known_layer, "source": ref.url, "etag": ref.etag, "entries": None, "tar_bytes": None})
            continue
        if client is None and ref.scheme == "s3":
            client = services.s3_client(ctx.data["image"].get("endpoint_url"))
        bar = services.progress(f"download {ref.url.rsplit('/', 1)[-1]}", ref.size)
        try:
            info = fetch_blob(ref, services.blobs, client, check=check,
                              on_progress=lambda done, total: bar.advance_to(done))
        finally:
            bar.close()
        log.info("blob downloaded", url=ref.url, digest=info.digest, bytes=info.size, transferred=info.transferred)
        found = _findings(info)
        if found.format in ARCHIVE_FORMATS:
            inner = layers_of_archive(info.path, found.format, services.blobs, services.limits, check=check)
            layers = [_layer(blob, _findings(blob), f"{ref.url}#{blob.digest}", None) for blob in inner]
        else:
            layers = [_layer(info, found, ref.url, ref.etag)]
        with ctx.transaction() as session:  # checked: a retry or a later job skips these
            for layer in layers:
                record_layer(session, digest=layer["digest"], size_bytes=layer["size"], fmt=layer["format"],
                             source=layer["source"], etag=layer["etag"])
        blobs.extend(layers)
        ctx.check_stop()
    ctx.data["blobs"] = blobs
    return "downloaded"


def _findings(info: BlobInfo) -> StreamFindings:
    assert isinstance(info.findings, StreamFindings), "fetched without its streaming checks"
    return info.findings


def _layer(info: BlobInfo, found: StreamFindings, source: str, etag: str | None) -> dict[str, Any]:
    return {"digest": info.digest, "format": found.format, "size": info.size, "source": source, "etag": etag,
            "entries": found.entries, "tar_bytes": found.uncompressed_bytes}
