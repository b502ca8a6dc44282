"""The process's first /proc/stat reading, taken as the CLI starts.

A job's first I/O-wait check needs a sample at least one window old. Taken here, before the
command's imports, the S3 listing and the pool's set-up, the window runs during start-up the
process spends anyway instead of being waited out at the first guarded transition. Read
with the same clock as the health checker's default reader (time.monotonic).
"""

from __future__ import annotations

import time
from pathlib import Path

_reading: tuple[float, str] | None = None


def take_first_sample(proc_stat: Path = Path("/proc/stat")) -> None:
    """Read /proc/stat once, the first time only; a failure leaves no reading (the check
    reads /proc/stat itself and reports the error)."""
    global _reading
    if _reading is None:
        try:
            _reading = (time.monotonic(), proc_stat.read_text())
        except OSError:
            pass


def first_sample() -> tuple[float, str] | None:
    """(time.monotonic() when taken, the text of /proc/stat), or None if never taken."""
    return _reading
