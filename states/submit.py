"""From what the operator typed to a job: the objects of the image and its idempotency key;
and the answer for an image already complete, read without building anything."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from images.bucket import DEFAULT_BUCKET
from images.source import ObjectRef, family_prefix, file_ref, head_object, list_family, process_s3_client, s3_url
from states.names import IMAGE_WORKFLOW, ImageState
from support.errors import PermanentError

if TYPE_CHECKING:
    from fsm.models import Job
    from fsm.runner import Runner
    from states.services import ImageServices

__all__ = ["DEFAULT_BUCKET", "ImageRequest", "completed_job", "process_request", "resolve_request"]


@dataclass(frozen=True)
class ImageRequest:
    """One image to process: its name, where it comes from, and its objects (layers) in order."""

    name: str
    source: str
    objects: tuple[ObjectRef, ...]
    endpoint_url: str | None
    device_size_bytes: int | None = None  # new base devices' size; None: the process's default
    # A registry image (--ref): the manifest digest the reference named, the image's runtime
    # config (Env, Cmd, ...) and how to reach the registry (images.registry.RegistryOptions).
    manifest_digest: str | None = None
    config: dict[str, Any] | None = None
    registry: dict[str, Any] | None = None

    @property
    def idempotency_key(self) -> str:
        """The image's identity: its source and the exact versions (ETags) of its objects
        (and, from a registry, the manifest's digest: a new config is a new image)."""
        versions = "\n".join(f"{o.url} {o.etag or ''} {o.size or ''}" for o in self.objects)
        if self.manifest_digest:
            versions += f"\nmanifest {self.manifest_digest}"
        return f"{self.source}@{hashlib.sha256(versions.encode()).hexdigest()[:16]}"

    def job_context(self) -> dict[str, Any]:
        image: dict[str, Any] = {"name": self.name, "source": self.source, "endpoint_url": self.endpoint_url,
                                 "device_size_bytes": self.device_size_bytes}
        if self.manifest_digest:
            image.update(manifest_digest=self.manifest_digest, config=self.config, registry=self.registry)
        return {"image": image, "objects": [{"url": o.url, "size": o.size, "etag": o.etag} for o in self.objects]}


def resolve_request(
    *,
    bucket: str = DEFAULT_BUCKET,
    s3_key: str | None = None,
    image: str | None = None,
    s3_prefix: str | None = None,
    url: str | None = None,
    endpoint_url: str | None = None,
    device_size_bytes: int | None = None,
    ref: str | None = None,
    registry: dict[str, Any] | None = None,
    state_dir: Path | None = None,
) -> ImageRequest:
    """Exactly one of s3_key (one layer), image (a family), s3_prefix, url (s3:// or file://)
    or ref (an image in a registry, reached with the `registry` options; its manifests are
    kept in `state_dir`'s blob store); `device_size_bytes` the size of the image's new base
    devices (None: the default)."""
    given = [x for x in (s3_key, image, s3_prefix, url, ref) if x]
    if len(given) != 1:
        raise PermanentError("give exactly one of --s3-key, --image, --s3-prefix, --url or --ref")
    if ref:
        if state_dir is None:
            raise ValueError("a registry reference needs the state directory (its manifests go in the blob store)")
        return resolve_registry_request(ref, registry, state_dir, device_size_bytes)
    if registry:
        raise PermanentError("--platform, --plain-http, --ca-cert and --registry-config go with --ref only")
    if url:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            ref = file_ref(Path(parsed.path))
            return ImageRequest(name=Path(parsed.path).name, source=ref.url, objects=(ref,), endpoint_url=None,
                                device_size_bytes=device_size_bytes)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise PermanentError(f"unsupported URL {url!r}: use s3://bucket/key, s3://bucket/prefix/ or file:///path")
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if key.endswith("/") or not key:
            s3_prefix = key
        else:
            s3_key = key
    client = process_s3_client(endpoint_url)
    if s3_key:
        ref = head_object(bucket, s3_key, client)
        return ImageRequest(name=s3_key, source=s3_url(bucket, s3_key), objects=(ref,), endpoint_url=endpoint_url,
                            device_size_bytes=device_size_bytes)
    prefix = family_prefix(image) if image else str(s3_prefix)
    refs = list_family(bucket, prefix, client)
    name = image or prefix.rstrip("/").rsplit("/", 1)[-1]
    return ImageRequest(name=name, source=s3_url(bucket, prefix), objects=tuple(refs), endpoint_url=endpoint_url,
                        device_size_bytes=device_size_bytes)


def resolve_registry_request(ref: str, registry: dict[str, Any] | None, state_dir: Path,
                             device_size_bytes: int | None) -> ImageRequest:
    """The request for a registry image: its layers, config and manifest digest. The image's
    name is REPO:TAG; its source `oci://REGISTRY/REPO:TAG` (plus `#PLATFORM` when not this
    host's), so one image row follows the tag as it moves."""
    from images.blobstore import BlobStore
    from images.registry import RegistryOptions, host_platform_name, resolve_image

    options = RegistryOptions.from_dict(registry)
    resolved = resolve_image(ref, options, BlobStore(state_dir))
    target = resolved.ref
    name = f"{target.repository.removeprefix('library/')}" + (f":{target.tag}" if target.tag else f"@{target.digest}")
    source = f"oci://{target}" + (f"#{options.platform}" if options.platform != host_platform_name() else "")
    return ImageRequest(name=name, source=source, objects=resolved.layers, endpoint_url=None,
                        device_size_bytes=device_size_bytes, manifest_digest=resolved.manifest_digest,
                        config=resolved.config, registry=options.to_dict())


@dataclass(frozen=True)
class Standing:
    """Where the image stands: its job (id, state, context, error; None: none yet), whether
    that job is complete, and then whether the image's snapshot is still ready."""

    job: dict[str, Any] | None
    complete: bool
    snapshot_ready: bool


def image_standing(db_path: Path, request: ImageRequest) -> Standing:
    """Is the image's job complete and its snapshot still ready? Read with sqlite3, the one
    way both the repeat `process-image` and a job's run ask it (support/reads.py): without
    SQLAlchemy, the pool or the safeguards."""
    from support.reads import find_job, image_has_ready_snapshot

    job = find_job(db_path, IMAGE_WORKFLOW, request.idempotency_key) if db_path.exists() else None
    complete = job is not None and job["state"] == ImageState.COMPLETE
    return Standing(job, complete, complete and image_has_ready_snapshot(db_path, request.source))


def completed_job(db_path: Path, request: ImageRequest) -> dict[str, Any] | None:
    """The image's job when it is complete and its snapshot still ready (nothing to do).
    None: the job must run (or be reopened) the usual way."""
    standing = image_standing(db_path, request)
    return standing.job if standing.snapshot_ready else None


def process_request(runner: Runner, request: ImageRequest, services: ImageServices) -> Job:
    """Run the image's job; a complete one returns at once, its snapshot handed out at the
    path it has now (states/snapshotting.hand_out_again: after a reboot, another loop),
    unless its snapshot is gone (the pool was reset or the database cleaned as the guide's
    recovery says): then it is reopened and done again."""
    standing = image_standing(Path(str(runner.store.engine.url.database)), request)
    if standing.complete and not standing.snapshot_ready:
        assert standing.job is not None
        runner.reopen(standing.job["id"], "the image's snapshot is gone (evicted, pool reset or database cleaned)")
    job = runner.start(IMAGE_WORKFLOW, request.idempotency_key, request.job_context())
    if job.state == ImageState.COMPLETE:
        from catalog.ledger import catalog_transaction, device_of_row
        from catalog.models import DeviceState
        from catalog.records import snapshot_of_job, touch_image_by_source
        from states.snapshotting import hand_out_again

        with catalog_transaction(runner.store.engine) as session:
            touch_image_by_source(session, request.source)  # used now: last in eviction's order
            made = snapshot_of_job(session, job.id)
            snapshot = device_of_row(made) if made is not None and made.state == DeviceState.READY else None
        if snapshot is not None:
            job = hand_out_again(runner, job, snapshot, services)
    return job
