"""The product's vocabulary: its workflow names, as the `workflow` column of jobs holds
them, the states and events of each workflow, and the rule for a VM's id. Its own module so
a command that only reads jobs (metrics, the monitor, `fsm list`, a client that checks a VM
id before asking the daemon) needs nothing of the workflows themselves.

The states and events are str-valued enums: a member *is* its string ("complete"), so what
the database holds and every printout stay the same. The final states and the operator
events (abort, resume, retry, reopen) belong to every workflow and are the engine's
(fsm/definition.py). tests/test_vocabulary.py fails if a name is written as a bare string
anywhere else in the product.
"""

from enum import StrEnum

from fsm.definition import FinalState
from support.errors import PermanentError

IMAGE_WORKFLOW = "image"
SNAPSHOT_WORKFLOW = "snapshot"
MAX_VM_ID = 128


class ImageState(StrEnum):
    """The image job's states (states/workflow.py), in the order a job goes through them."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    CREATING_DEVICE = "creating_device"
    MAKING_FS = "making_fs"
    UNPACKING = "unpacking"
    ACTIVATING = "activating"
    SNAPSHOTTING = "snapshotting"
    COMPLETE = FinalState.COMPLETE.value
    ABORTED = FinalState.ABORTED.value


class ImageEvent(StrEnum):
    """The events the image job's steps return (each a trigger of states/workflow.py)."""

    START = "start"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    DEVICE_CREATED = "device_created"
    LAYER_REUSED = "layer_reused"
    FS_MADE = "fs_made"
    LAYER_UNPACKED = "layer_unpacked"
    ACTIVATED = "activated"
    SNAPSHOTTED = "snapshotted"


class SnapshotState(StrEnum):
    """The snapshot job's states (states/vm_snapshot.py): the image job's last steps, by name."""

    PENDING = ImageState.PENDING.value
    ACTIVATING = ImageState.ACTIVATING.value
    SNAPSHOTTING = ImageState.SNAPSHOTTING.value
    COMPLETE = FinalState.COMPLETE.value
    ABORTED = FinalState.ABORTED.value


class SnapshotEvent(StrEnum):
    """The snapshot job's events; `snapshotted` is returned by the image job's own step."""

    START = ImageEvent.START.value
    ACTIVATED = ImageEvent.ACTIVATED.value
    SNAPSHOTTED = ImageEvent.SNAPSHOTTED.value


# Every state a job of this product can be in (the metrics' `flyio_jobs{state}` labels).
JOB_STATES: tuple[str, ...] = tuple(dict.fromkeys([*(s.value for s in ImageState), *(s.value for s in SnapshotState)]))

# Not a transition: the first history row of a job `rebuild-db` records as already complete.
REBUILT_EVENT = "rebuilt"


def check_vm_id(vm_id: str) -> str:
    """`vm_id` when it is 1-MAX_VM_ID printable characters without '/' or whitespace at
    either end (which would list as a blank or a look-alike VM); else one PermanentError line."""
    if not vm_id or len(vm_id) > MAX_VM_ID or not vm_id.isprintable() or "/" in vm_id or vm_id != vm_id.strip():
        raise PermanentError(f"invalid VM id {vm_id!r}: 1-{MAX_VM_ID} printable characters, no '/', "
                             "no whitespace at either end")
    return vm_id
