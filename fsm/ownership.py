"""Who owns a job: a process on a boot, holding a lease. A dead owner frees the job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

from support.proc import pid_alive


@cache
def boot_id() -> str:
    """This boot's id: a pid from before a reboot (or a power cut of a VM) is never alive."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


@dataclass(frozen=True)
class Owner:
    pid: int
    boot_id: str

    @classmethod
    def current(cls) -> "Owner":
        return cls(pid=os.getpid(), boot_id=boot_id())


def owner_alive(pid: int | None, owner_boot: str | None, lease_expires_at: datetime | None, now: datetime) -> bool:
    """True when the recorded owner still runs the job: same boot, pid alive, lease valid."""
    if pid is None:
        return False
    if owner_boot != boot_id():
        return False
    if lease_expires_at is None or lease_expires_at < now:
        return False
    return pid_alive(pid)
