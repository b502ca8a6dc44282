"""Every workflow the product runs, and the services its steps need, built per process."""

from __future__ import annotations

from pathlib import Path

from fsm.definition import Workflow
from images.blobstore import BlobStore
from images.source import make_s3_client
from states.services import DEFAULT_DEVICE_SIZE, ImageServices
from states.workflow import WORKFLOW_NAME, build_image_workflow
from support.progress import Progress, no_progress, terminal_progress
from devices.select import open_pool
from safeguards.setup import build_safeguards


def build_services(
    state_dir: Path,
    *,
    backend: str = "auto",
    device_size_bytes: int = DEFAULT_DEVICE_SIZE,
    show_progress: bool = False,
) -> ImageServices:
    """The real collaborators: the chosen pool backend, blob store, S3, health checks, guard."""
    pool = open_pool(state_dir, backend)
    health_guard, operation = build_safeguards(state_dir, pool)
    return ImageServices(
        state_dir=state_dir,
        pool=pool,
        blobs=BlobStore(state_dir),
        s3_client=lambda endpoint_url: make_s3_client(endpoint_url=endpoint_url),
        health_guard=health_guard,
        operation=operation,
        device_size_bytes=device_size_bytes,
        progress=terminal_progress if show_progress else no_progress,
    )


def all_workflows(services: ImageServices | None = None) -> dict[str, Workflow]:
    """The product's workflows by name (unbound to services when only drawing them)."""
    return {WORKFLOW_NAME: build_image_workflow(services)}
