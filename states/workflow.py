"""The image job, as data:

    pending -> downloading -> verifying -> creating_device -> making_fs -> unpacking
            -> activating -> snapshotting -> complete          (any non-final --abort--> aborted)

(and the engine's operator edges: resume, retry, reopen; `fsm graph` draws them all.)

creating_device -> [making_fs, base layer only] -> unpacking repeats once per layer, an
explicit conditional transition, so the history shows every layer. Every transition into
a state that touches devices is guarded by the health check: a failing check makes the
job wait (with the reason recorded), not abort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fsm.context import StepContext
from fsm.definition import OperatorEvent, RetryPolicy, StateSpec, TransitionSpec, Workflow
from states import (activating, creating_device, downloading, making_fs, pending, snapshotting,
                    unpacking, verifying)
from states.data import ImageJobData
from states.layers import all_layers_done, is_base_layer, is_upper_layer, layers_remaining
from states.names import IMAGE_WORKFLOW, ImageEvent as E, ImageState as S
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
        initial=S.PENDING,
        states=(
            StateSpec(S.PENDING, step=step(pending.run)),
            StateSpec(S.DOWNLOADING, step=step(downloading.run), retry=NETWORK_RETRY),
            StateSpec(S.VERIFYING, step=step(verifying.run)),
            StateSpec(S.CREATING_DEVICE, step=step(creating_device.run), retry=CHAIN_BUSY_RETRY),
            # A half-made filesystem or half-unpacked layer is never trusted: start the layer again.
            StateSpec(S.MAKING_FS, step=step(making_fs.run), retry=NO_RETRY, resume_point=S.CREATING_DEVICE),
            StateSpec(S.UNPACKING, step=step(unpacking.run), retry=NO_RETRY, resume_point=S.CREATING_DEVICE),
            StateSpec(S.ACTIVATING, step=step(activating.run)),
            StateSpec(S.SNAPSHOTTING, step=step(snapshotting.run), retry=NO_RETRY),
        ),
        transitions=(
            TransitionSpec(E.START, S.PENDING, S.DOWNLOADING),
            TransitionSpec(E.DOWNLOADED, S.DOWNLOADING, S.VERIFYING),
            TransitionSpec(E.VERIFIED, S.VERIFYING, S.CREATING_DEVICE, guards=guarded),
            TransitionSpec(E.DEVICE_CREATED, S.CREATING_DEVICE, S.MAKING_FS, conditions=(is_base_layer,), guards=guarded),
            TransitionSpec(E.DEVICE_CREATED, S.CREATING_DEVICE, S.UNPACKING, conditions=(is_upper_layer,), guards=guarded),
            TransitionSpec(E.LAYER_REUSED, S.CREATING_DEVICE, S.CREATING_DEVICE, conditions=(layers_remaining,),
                           guards=guarded),
            TransitionSpec(E.LAYER_REUSED, S.CREATING_DEVICE, S.ACTIVATING, conditions=(all_layers_done,)),
            TransitionSpec(E.FS_MADE, S.MAKING_FS, S.UNPACKING, guards=guarded),
            TransitionSpec(E.LAYER_UNPACKED, S.UNPACKING, S.CREATING_DEVICE, conditions=(layers_remaining,), guards=guarded),
            TransitionSpec(E.LAYER_UNPACKED, S.UNPACKING, S.ACTIVATING, conditions=(all_layers_done,)),
            TransitionSpec(E.ACTIVATED, S.ACTIVATING, S.SNAPSHOTTING, guards=guarded),
            TransitionSpec(E.SNAPSHOTTED, S.SNAPSHOTTING, S.COMPLETE),
        ),
        on_abort=abort_hook(services),
        describe=describe,
    )


LAYER_STATES = (S.CREATING_DEVICE, S.MAKING_FS, S.UNPACKING)
# What `fsm history` says of a layer's transition (display text, not the names).
LAYER_OUTCOMES = {E.LAYER_REUSED: "reused", E.LAYER_UNPACKED: "unpacked", E.DEVICE_CREATED: "device created",
                  E.FS_MADE: "filesystem made", OperatorEvent.ABORT: "aborted"}


def describe(state: str, data: Mapping[str, Any], event: str | None,
             after: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The layer a transition of the layer loop concerned (`layer 3/5 sha256:8297… unpacked`),
    or, without an event, what the job works on now, with the devices it made. The layer is
    the one the step found (`data`); its digest, when it was still downloading then, is the
    one the step learnt (`after`)."""
    view = ImageJobData(data)
    index = int(view.layer_index)
    layers = view.known_layers
    if after is not None and index < len(layers) and layers[index].get("pending"):
        layers = ImageJobData(after).known_layers or layers
    now = {"devices": view.known_devices, "snapshot_device_id": view.snapshot_device_id} if event is None else {}
    if state not in LAYER_STATES or index >= len(layers):
        return {k: v for k, v in now.items() if v} or None
    digest = layers[index].get("digest") or "pending"
    outcome = LAYER_OUTCOMES.get(event or "")
    text = f"layer {index + 1}/{len(layers)} {digest[:len('sha256:') + 4]}…" + (f" {outcome}" if outcome else "")
    return {"text": text, "layer": index + 1, "layers": len(layers), "digest": digest,
            **({"outcome": outcome} if outcome else {}), **{k: v for k, v in now.items() if v}}
