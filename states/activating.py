"""activating: the image's row, naming its layers in order and its top chain."""

from __future__ import annotations

from catalog.records import upsert_image
from fsm.context import StepContext
from states.layers import layers
from states.services import ImageServices


def run(ctx: StepContext, services: ImageServices) -> str:
    image = ctx.data["image"]
    chain = [(layer["digest"], layer["chain_id"]) for layer in layers(ctx)]
    with ctx.transaction() as session:
        row = upsert_image(session, name=image["name"], source=image["source"], chain=chain, job_id=ctx.job_id)
        ctx.data["image_id"] = row.id
    return "activated"
