"""activating: the image's row, naming its layers in order and its top chain, and the
record the image keeps of itself beside the pool (written before the row commits)."""

from __future__ import annotations

import json

from catalog.records import describe_image, upsert_image
from fsm.context import StepContext
from fsm.models import Job
from states.data import ImageJobData
from states.layers import layers
from states.names import ImageEvent
from states.services import ImageServices


def run(ctx: StepContext, services: ImageServices) -> str:
    data = ImageJobData(ctx.data)
    image = data.image
    chain = [(layer["digest"], layer["chain_id"]) for layer in layers(ctx)]
    with ctx.transaction() as session:
        row = upsert_image(session, name=image["name"], source=image["source"], chain=chain, job_id=ctx.job_id)
        config = image.get("config")
        row.config = json.dumps(config, sort_keys=True) if config is not None else None  # a registry image's
        data.image_id = row.id
        job = session.get(Job, ctx.job_id)
        key = job.idempotency_key if job is not None else ""
        services.records.write_image(describe_image(session, row, idempotency_key=key, job_context=ctx.data))
    return ImageEvent.ACTIVATED
