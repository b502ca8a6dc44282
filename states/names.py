"""The product's workflow names, as the `workflow` column of jobs holds them, and the
rule for a VM's id. Its own module so a command that only reads jobs (or a client that
checks a VM id before asking the daemon) needs nothing of the workflows themselves."""

from support.errors import PermanentError

IMAGE_WORKFLOW = "image"
SNAPSHOT_WORKFLOW = "snapshot"
MAX_VM_ID = 128


def check_vm_id(vm_id: str) -> str:
    """`vm_id` when it is 1-MAX_VM_ID printable characters without '/' or whitespace at
    either end (which would list as a blank or a look-alike VM); else one PermanentError line."""
    if not vm_id or len(vm_id) > MAX_VM_ID or not vm_id.isprintable() or "/" in vm_id or vm_id != vm_id.strip():
        raise PermanentError(f"invalid VM id {vm_id!r}: 1-{MAX_VM_ID} printable characters, no '/', "
                             "no whitespace at either end")
    return vm_id
