"""Every workflow the product runs, and the one place that builds the services and the
runner of a process (the CLI's commands and the daemon alike)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsm.definition import Workflow
from fsm.runner import Runner
from fsm.store import JobStore
from states.services import DEFAULT_DEVICE_SIZE, ImageServices
from states.vm_snapshot import SNAPSHOT_WORKFLOW, build_snapshot_workflow
from states.workflow import WORKFLOW_NAME, build_image_workflow


def build_services(
    state_dir: Path,
    *,
    backend: str = "auto",
    device_size_bytes: int = DEFAULT_DEVICE_SIZE,
    show_progress: bool = False,
) -> ImageServices:
    """The real collaborators: the chosen pool backend, blob store, S3, health checks, guard."""
    from devices.filesystem import layer_block_size
    from devices.policy import policy_from
    from devices.select import open_pool
    from images.blobstore import BlobStore
    from images.unpack import check_settings as check_unpack_settings
    from images.source import process_s3_client
    from safeguards.setup import build_safeguards
    from support.progress import no_progress, terminal_progress

    block_size = layer_block_size()  # a bad FLYIO_LAYER_BLOCK_SIZE fails here, before any pool or device
    check_unpack_settings()  # and so do bad FLYIO_UNPACK_* values
    pool = open_pool(state_dir, backend)
    health_guard, operation = build_safeguards(state_dir, pool)
    return ImageServices(
        state_dir=state_dir,
        pool=pool,
        blobs=BlobStore(state_dir),
        s3_client=process_s3_client,
        health_guard=health_guard,
        operation=operation,
        device_size_bytes=device_size_bytes,
        progress=terminal_progress if show_progress else no_progress,
        policy=policy_from(),  # FLYIO_POOL_* (the daemon sets its own from its flags)
        layer_block_size=block_size,
    )


def all_workflows(services: ImageServices | None = None) -> dict[str, Workflow]:
    """The product's workflows by name (unbound to services when only drawing them)."""
    return {WORKFLOW_NAME: build_image_workflow(services), SNAPSHOT_WORKFLOW: build_snapshot_workflow(services)}


@dataclass(frozen=True)
class JobEnvironment:
    """What a process runs jobs with: one set of services, one runner over every workflow."""

    services: ImageServices
    runner: Runner


def open_environment(state_dir: Path, store: JobStore, *, backend: str = "auto", show_progress: bool = False,
                     stop_event: threading.Event | None = None, ensure_pool: bool = True) -> JobEnvironment:
    """The services and the runner, on `store`. With `ensure_pool` the pool is made sure of
    first (after a reboot recreated from its files, and the catalog reconciled with it), as
    the guide's first process-image does."""
    from catalog.behind import refuse_if_behind
    from catalog.reconcile import ensure_pool as ensure
    from states.rebuild import describe_existing_catalog

    services = build_services(state_dir, backend=backend, show_progress=show_progress)
    # Admission evicts before a job waits for room, here as in the daemon (which replaces
    # this with its own, counted in its metrics).
    services.evict = lambda room_for: evict_for_admission(state_dir, store, services, room_for)
    if ensure_pool:
        describe_existing_catalog(store.engine, services.pool, services.records)  # once, after an upgrade
        refuse_if_behind(store.engine, services.records)  # an older catalog must not drive the devices
        ensure(services.pool, store.engine)
    return JobEnvironment(services=services, runner=Runner(store, all_workflows(services), stop_event=stop_event))


def evict_for_admission(state_dir: Path, store: JobStore, services: ImageServices, room_for: int) -> Any:
    """Evict least recently used images until data usage is below the low watermark, or
    lower if `room_for` more bytes need it to fit below the high one (catalog/eviction.py,
    as `gc --images --force` and the daemon do), inside the cleanup Operation Guard: never
    during another job's device step."""
    from catalog.eviction import evict_images
    from safeguards.setup import build_cleanup_guard
    from states.data import job_uses

    policy = services.policy.making_room(services.pool.get_pool_status(), room_for)
    return evict_images(store.engine, services.pool, policy, uses_of=job_uses, dry_run=False,
                        operation=build_cleanup_guard(state_dir))
