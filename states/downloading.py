"""downloading: the image's first missing object into the blob store, checked as it streams
in; the objects after it are queued to download in the background while the layers before
them are made and unpacked (states/layers.py `resolve_layer` takes each when its layer's
turn comes). Verified blobs are never fetched or read twice.

Each blob's digest, format and whole tar structure are checked on the bytes as they arrive
(images.verify.BlobCheck inside fetch_blob); a blob is stored, and its layer row written
with verified_at, only once every check passed. So a retry of this state (the engine's
NETWORK_RETRY, the one retry layer) skips the blobs already done and resumes the one that
was cut off by Range. An OCI layout or `docker save` archive is split into its layers
here, each checked as it is copied out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from catalog.models import Layer
from catalog.records import find_verified_layer, record_layer
from fsm.context import StepContext
from images.blobstore import BlobInfo
from images.formats import ARCHIVE_FORMATS, layers_of_archive
from images.prefetch import PrefetchCancelled
from images.source import ObjectRef, fetch_blob
from images.verify import BlobCheck, StreamFindings
from states.data import ImageJobData
from states.names import ImageEvent
from states.services import ImageServices
from support.log import get_logger
from support.progress import no_progress

log = get_logger("states.downloading")


def run(ctx: StepContext, services: ImageServices) -> str:
    blobs: list[dict[str, Any]] = []
    fetched_one = False
    data = ImageJobData(ctx.data)
    for obj in data.objects:
        ref = ObjectRef(url=obj["url"], size=obj.get("size"), etag=obj.get("etag"))
        known = known_layer(ctx, services, ref)
        if known is not None:
            log.info("blob already present", url=ref.url, digest=known["digest"])
            blobs.append(known)
        elif not fetched_one:
            # The first missing object now: the first layer to unpack cannot start without it.
            layers = fetch_object(ctx, services, ref, show_progress=True)
            record_layers(ctx, layers)
            blobs.extend(layers)
            fetched_one = True
        else:
            services.prefetch.start(ctx.job_id, ref.url, background_fetch(ctx, services, ref))
            blobs.append({"pending": True, "source": ref.url, "size": ref.size, "etag": ref.etag})
        ctx.check_stop()
    data.blobs = blobs
    return ImageEvent.DOWNLOADED


def known_layer(ctx: StepContext, services: ImageServices, ref: ObjectRef) -> dict[str, Any] | None:
    """The layer of an object version downloaded and verified before, when its blob is still
    in the store (nothing to fetch)."""
    with ctx.transaction() as session:
        # A registry names the digest itself: any verified layer with it is this one,
        # wherever it came from (an S3 object, another repository).
        known = session.get(Layer, ref.etag) if ref.scheme == "oci" else find_verified_layer(session, ref.url, ref.etag)
        known = known if known is not None and known.verified_at is not None else None
        layer = {"digest": known.digest, "format": known.format, "size": known.size_bytes} if known else None
    if layer is None or not services.blobs.has(layer["digest"]):
        return None
    return {**layer, "source": ref.url, "etag": ref.etag, "entries": None, "tar_bytes": None}


def fetch_object(ctx: StepContext, services: ImageServices, ref: ObjectRef, *, show_progress: bool,
                 should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Download one object with its streaming checks; its layers (an archive holds several).
    Touches no database: the caller records them (`record_layers`), in the job's thread."""
    client = _client_for(ctx, services, ref)

    def check(size: int) -> BlobCheck:
        return BlobCheck(size, services.limits)

    def progress(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise PrefetchCancelled(f"download of {ref.url} cancelled")
        bar.advance_to(done)

    bar = (services.progress if show_progress else no_progress)(f"download {ref.url.rsplit('/', 1)[-1]}", ref.size)
    try:
        info = fetch_blob(ref, services.blobs, client, check=check, on_progress=progress)
    finally:
        bar.close()
    log.info("blob downloaded", url=ref.url, digest=info.digest, bytes=info.size, transferred=info.transferred,
             background=not show_progress)
    found = _findings(info)
    if found.format in ARCHIVE_FORMATS and ref.scheme == "oci":
        # A registry layer is a layer: a tar that happens to hold an OCI layout's or a
        # docker save's top-level names is still unpacked as it is, under its own digest.
        found = dataclasses.replace(found, format="tar")
    elif found.format in ARCHIVE_FORMATS:
        inner = layers_of_archive(info.path, found.format, services.blobs, services.limits, check=check)
        return [_layer(blob, _findings(blob), f"{ref.url}#{blob.digest}", None) for blob in inner]
    return [_layer(info, found, ref.url, ref.etag)]


def _client_for(ctx: StepContext, services: ImageServices, ref: ObjectRef) -> Any:
    """S3's client, a registry's (its options from the job's context), or none (file://)."""
    if ref.scheme == "s3":
        return services.s3_client(ImageJobData(ctx.data).endpoint_url)
    if ref.scheme == "oci":
        from images.registry import parse_blob_url

        return services.registry_client(parse_blob_url(ref.url)[0].registry, ImageJobData(ctx.data).registry)
    return None


def background_fetch(ctx: StepContext, services: ImageServices, ref: ObjectRef) -> Callable[[Callable[[], bool]], Any]:
    """What the prefetch worker runs for `ref`: fetch_object without a progress bar (the
    unpack in front owns the terminal), stopping when the job is cancelled or stopping."""
    return lambda cancelled: fetch_object(ctx, services, ref, show_progress=False,
                                          should_stop=lambda: cancelled() or ctx.should_stop())


def record_layers(ctx: StepContext, layers: list[dict[str, Any]]) -> None:
    """Checked: a retry or a later job skips these."""
    with ctx.transaction() as session:
        for layer in layers:
            record_layer(session, digest=layer["digest"], size_bytes=layer["size"], fmt=layer["format"],
                         source=layer["source"], etag=layer["etag"])


def _findings(info: BlobInfo) -> StreamFindings:
    assert isinstance(info.findings, StreamFindings), "fetched without its streaming checks"
    return info.findings


def _layer(info: BlobInfo, found: StreamFindings, source: str, etag: str | None) -> dict[str, Any]:
    return {"digest": info.digest, "format": found.format, "size": info.size, "source": source, "etag": etag,
            "entries": found.entries, "tar_bytes": found.uncompressed_bytes}
