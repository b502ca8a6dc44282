"""dmsetup and thin_ls: the one module that runs device-mapper's tools.

In the role of containerd's devmapper dmsetup.go: it only wraps the tools, and maps
dmsetup's error output once, in DMSETUP_ERRORS, to an errno that ToolFailed carries.
dmsetup prints the errno of the ioctl that failed as its strerror text,

    device-mapper: message ioctl on pool  failed: File exists
    Command failed.

and `Device does not exist.` for the status or info of a mapping that is not there.
Callers (devices/devicemapper.py, devices/select.py) test `exc.errno`, never the text.

Every call goes through support.proc.run_command with a timeout; one that outlives it
raises CommandTimeout, a hazard (a D-state dm call is how kernels hang).
"""

from __future__ import annotations

import errno
from pathlib import Path

from support.errors import ManagerError
from support.proc import CommandResult, ErrorTable

DMSETUP_TIMEOUT = 30.0
THIN_LS_TIMEOUT = 60.0
VERSION_TIMEOUT = 10.0

DMSETUP_ERRORS = ErrorTable((
    ("File exists", errno.EEXIST),                  # create_thin/create_snap: the thin id is taken
    ("No data available", errno.ENODATA),           # create_snap/delete/a thin table: no such id in the pool
    ("No such device or address", errno.ENXIO),     # remove, message: no such mapping
    ("No such device", errno.ENODEV),               # /dev/mapper/control: open failed (no dm driver)
    ("not exist", errno.ENXIO),                     # status, info: "Device does not exist."
    ("No such file or directory", errno.ENOENT),    # /dev/mapper/control missing
    ("Device or resource busy", errno.EBUSY),       # remove, suspend: the mapping is open
    ("Invalid argument", errno.EINVAL),             # a message the pool refuses
    ("No space left on device", errno.ENOSPC),      # the pool's metadata is full
))
# A mapping that is not there, or no device-mapper to ask: `status` reads it as absent.
ABSENT = frozenset({errno.ENXIO, errno.ENODEV, errno.ENOENT})
# `remove` of a mapping already gone.
GONE = frozenset({errno.ENXIO, errno.ENODEV})


def dmsetup(*args: str, check: bool = True, timeout: float = DMSETUP_TIMEOUT) -> CommandResult:
    """`dmsetup <args>`; a failure (when `check`) is ToolFailed with DMSETUP_ERRORS' errno."""
    return DMSETUP_ERRORS.run(["dmsetup", *args], timeout=timeout, check=check)


def driver_answers() -> tuple[bool, str]:
    """Whether `dmsetup version` reaches the kernel driver, and why not."""
    try:
        result = dmsetup("version", check=False, timeout=VERSION_TIMEOUT)
    except ManagerError as exc:
        return False, str(exc)
    if result.returncode != 0 or "Driver version" not in result.stdout:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return False, lines[-1] if lines else "dmsetup version failed"
    return True, "device-mapper driver answers"


def udev_running() -> bool:
    return Path("/run/udev/control").exists()


def create(name: str, table: str) -> None:
    """`dmsetup create`; without udev the /dev/mapper node is made by `dmsetup mknodes`."""
    if udev_running():
        dmsetup("create", "--verifyudev", name, "--table", table)
    else:
        dmsetup("create", name, "--table", table)
        dmsetup("mknodes", name)


def mknodes(name: str) -> None:
    """Make (or, for a removed mapping, drop) the /dev/mapper node of `name`."""
    dmsetup("mknodes", name)


def remove(name: str) -> None:
    """`dmsetup remove` (+ `mknodes` without udev: it drops the stale /dev/mapper node)."""
    dmsetup("remove", name)
    if not udev_running():
        dmsetup("mknodes", name)


def is_active(name: str) -> bool:
    """Whether the mapping `name` exists (`dmsetup info`; any failure reads as no)."""
    result = dmsetup("info", "-c", "--noheadings", "-o", "name", name, check=False)
    return result.returncode == 0 and result.stdout.strip() == name


def status(name: str) -> str | None:
    """`dmsetup status <name>`'s line; None when there is no such mapping (ABSENT)."""
    result = dmsetup("status", name, check=False)
    if result.returncode != 0:
        failure = DMSETUP_ERRORS.failure(result)
        if failure.errno in ABSENT:
            return None
        raise failure
    return result.stdout.strip()


def table(name: str) -> str:
    """`dmsetup table <name>`."""
    return dmsetup("table", name).stdout


def message(pool: str, text: str) -> None:
    """`dmsetup message <pool> 0 <text>` (create_thin, create_snap, delete, metadata snaps)."""
    dmsetup("message", pool, "0", text)


def suspend(name: str) -> None:
    dmsetup("suspend", name)


def resume(name: str) -> None:
    dmsetup("resume", name)


def reload(name: str, new_table: str) -> None:
    dmsetup("reload", name, "--table", new_table)


def names(target: str) -> list[str]:
    """The mappings with a `target` table (`dmsetup ls --target`; a failure lists none)."""
    result = dmsetup("ls", "--target", target, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.split()]


def thin_ids(metadata_device: str) -> list[int]:
    """The thin ids `thin_ls` reads from the reserved metadata snapshot of `metadata_device`."""
    out = DMSETUP_ERRORS.run(["thin_ls", "--metadata-snap", "--no-headers", "-o", "DEV", metadata_device],
                             timeout=THIN_LS_TIMEOUT).stdout
    return sorted(int(tok) for tok in out.split() if tok.isdigit())
