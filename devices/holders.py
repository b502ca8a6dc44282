"""Who holds a block device open: a mount, a kernel holder (/sys/block/X/holders: a loop or
dm device on top of it) or a process with an open file descriptor on its node. Eviction
deletes only devices none of these hold; a loop detach of an open device would otherwise
succeed lazily (autoclear) and the data would vanish under its reader."""

from __future__ import annotations

import os
from pathlib import Path

from devices.mount import mounts


def _rdev(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if st.st_rdev else None


def holders_of(device_path: str) -> list[str]:
    """What holds `device_path` open, as short descriptions (empty: nobody)."""
    rdev = _rdev(device_path)
    if rdev is None:
        return []
    found = [f"mounted at {m.target}" for m in mounts() if _rdev(m.source) == rdev]
    sys_dir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders")
    if sys_dir.is_dir():
        found += [f"held by {entry.name}" for entry in sys_dir.iterdir()]
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("/dev/") and _rdev(target) == rdev:
                found.append(f"open by pid {proc.name}")
                break
    return found
