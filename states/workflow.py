"""The image job, as data:

    pending -> downloading -> verifying -> creating_device -> making_fs -> unpacking
            -> activating -> snapshotting -> complete          (any non-final --abort--> aborted)

creating_device -> [making_fs, base layer only] -> unpacking repeats once per layer, an
explicit conditional transition, so the history shows every layer. Every transition into
a state that touches devices is guarded by the health check: a failing check makes the
job wait (with the reason recorded), not abort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fsm.context import StepContext
from fsm.definition import ABORT_EVENT, RetryPolicy, StateSpec, TransitionSpec, Workflow
from states import (activating, creating_device, downloading, making_fs, pending, snapshotting,
                    unpacking, verifying)
from states.layers import all_layers_done, is_base_layer, is_upper_layer, layers_remaining
from states.names import IMAGE_WORKFLOW
from states.services import ImageServices
from states.steps import NO_RETRY, abort_hook, bound_step, health_guard
from support.errors import TransientError

WORKFLOW_NAME = IMAGE_WORKFLOW

NETWORK_RETRY = RetryPolicy(max_attempts=3, initial_wait=2.0, max_wait=30.0)
# creating_device retries transient errors only: a chain another job is unpacking (about
# 10 min), or the layer's background download that failed (fetched again, resumed by Range).
CHAIN_BUSY_RETRY = RetryPolicy(max_attempts=45, initial_wait=1.0, max_wait=15.0, transient=(TransientError,))


def build_image_workflow(services: ImageServices | None) -> Workflow:
    """The image workflow bound to `services` (None: for drawing the graph only)."""

    def step(module_run: Callable[[StepContext, ImageServices], str]) -> Callable[[StepContext], str]:
        return bound_step(services, module_run)

    healthy = health_guard(services)

    guarded = (healthy,)
    return Workflow(
        name=WORKFLOW_NAME,
        initial="pending",
        states=(
            StateSpec("pending", step=step(pending.run)),
            StateSpec("downloading", step=step(downloading.run), retry=NETWORK_RETRY),
            StateSpec("verifying", step=step(verifying.run)),
            StateSpec("creating_device", step=step(creating_device.run), retry=CHAIN_BUSY_RETRY),
            # A half-made filesystem or half-unpacked layer is never trusted: start the layer again.
            StateSpec("making_fs", step=step(making_fs.run), retry=NO_RETRY, resume_point="creating_device"),
            StateSpec("unpacking", step=step(unpacking.run), retry=NO_RETRY, resume_point="creating_device"),
            StateSpec("activating", step=step(activating.run)),
            StateSpec("snapshotting", step=step(snapshotting.run), retry=NO_RETRY),
        ),
        transitions=(
            TransitionSpec("start", "pending", "downloading"),
            TransitionSpec("downloaded", "downloading", "verifying"),
            TransitionSpec("verified", "verifying", "creating_device", guards=guarded),
            TransitionSpec("device_created", "creating_device", "making_fs", conditions=(is_base_layer,), guards=guarded),
            TransitionSpec("device_created", "creating_device", "unpacking", conditions=(is_upper_layer,), guards=guarded),
            TransitionSpec("layer_reused", "creating_device", "creating_device", conditions=(layers_remaining,), guards=guarded),
            TransitionSpec("layer_reused", "creating_device", "activating", conditions=(all_layers_done,)),
            TransitionSpec("fs_made", "making_fs", "unpacking", guards=guarded),
            TransitionSpec("layer_unpacked", "unpacking", "creating_device", conditions=(layers_remaining,), guards=guarded),
            TransitionSpec("layer_unpacked", "unpacking", "activating", conditions=(all_layers_done,)),
            TransitionSpec("activated", "activating", "snapshotting", guards=guarded),
            TransitionSpec("snapshotted", "snapshotting", "complete"),
        ),
        on_abort=abort_hook(services),
        describe=describe,
    )


LAYER_STATES = ("creating_device", "making_fs", "unpacking")
LAYER_OUTCOMES = {"layer_reused": "reused", "layer_unpacked": "unpacked", "device_created": "device created",
                  "fs_made": "filesystem made", ABORT_EVENT: "aborted"}


def describe(state: str, data: Mapping[str, Any], event: str | None,
             after: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The layer a transition of the layer loop concerned (`layer 3/5 sha256:8297… unpacked`),
    or, without an event, what the job works on now, with the devices it made. The layer is
    the one the step found (`data`); its digest, when it was still downloading then, is the
    one the step learnt (`after`)."""
    index = int(data.get("layer_index", 0))
    layers = data.get("layers") or []
    if after is not None and index < len(layers) and layers[index].get("pending"):
        layers = after.get("layers") or layers
    now = {"devices": data.get("devices"), "snapshot_device_id": data.get("snapshot_device_id")} if event is None else {}
    if state not in LAYER_STATES or index >= len(layers):
        return {k: v for k, v in now.items() if v} or None
    digest = layers[index].get("digest") or "pending"
    outcome = LAYER_OUTCOMES.get(event or "")
    text = f"layer {index + 1}/{len(layers)} {digest[:len('sha256:') + 4]}…" + (f" {outcome}" if outcome else "")
    return {"text": text, "layer": index + 1, "layers": len(layers), "digest": digest,
            **({"outcome": outcome} if outcome else {}), **{k: v for k, v in now.items() if v}}
