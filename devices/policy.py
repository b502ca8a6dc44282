"""The pool's usage policy: a warning threshold and the eviction watermarks (kubelet's image
GC is the model: above `high`, evict least recently used images until below `low`).

    warn  80%   data or metadata at or above it: `pool usage above threshold` (log, monitor, metrics)
    high  85%   data at or above it: the daemon evicts; a job's device that would cross it waits
    low   75%   eviction stops once data usage is below it

Set by flags or FLYIO_POOL_WARN_PERCENT, FLYIO_POOL_HIGH_PERCENT, FLYIO_POOL_LOW_PERCENT
(percent, 0-100). A bad value, or low >= high, is a one-line ManagerError.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from devices.base import PoolStatus
from support.errors import ManagerError
from support.log import get_logger

log = get_logger("devices.policy", component="pool-manager")

ENV_WARN = "FLYIO_POOL_WARN_PERCENT"
ENV_HIGH = "FLYIO_POOL_HIGH_PERCENT"
ENV_LOW = "FLYIO_POOL_LOW_PERCENT"
ABOVE_THRESHOLD = "pool usage above threshold"


@dataclass(frozen=True)
class UsagePolicy:
    """Fractions of the pool (0-1)."""

    warn: float = 0.80
    high: float = 0.85
    low: float = 0.75

    def __post_init__(self) -> None:
        for name in ("warn", "high", "low"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 1):
                raise ManagerError(f"pool {name} threshold {value * 100:g}% is not a percent from 1 to 100")
        if self.low >= self.high:
            raise ManagerError(f"pool low watermark {self.low:.0%} must be below the high watermark {self.high:.0%}")

    def above_warning(self, status: PoolStatus) -> bool:
        return status.exists and (status.data_used_fraction >= self.warn or status.metadata_used_fraction >= self.warn)

    def above_high(self, status: PoolStatus) -> bool:
        return status.exists and status.data_used_fraction >= self.high

    def describe(self) -> str:
        return f"warn={self.warn:.0%} high={self.high:.0%} low={self.low:.0%}"

    def making_room(self, status: PoolStatus, need: int) -> UsagePolicy:
        """This policy with its low watermark lowered, when it must be, to where `need` more
        bytes fit below the high watermark: what admission evicts down to (a layer bigger
        than the gap between the watermarks needs more than the usual eviction). Unchanged
        when even an empty pool could not take `need`: evicting cannot help, growing can."""
        total = status.total_data_blocks * status.data_block_bytes
        target = self.high - need / total if total else 0.0
        if target <= 0 or target >= self.low:
            return self
        return replace(self, low=target)


def parse_percent(text: str, what: str) -> float:
    """`text` (0-100, an optional trailing %) as a fraction; a one-line error naming `what`."""
    raw = text.strip().removesuffix("%")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and 0 < value <= 100):
        raise ManagerError(f"{what}={text!r} is not a percent from 1 to 100")
    return value / 100


def policy_from(warn: str | None = None, high: str | None = None, low: str | None = None,
                environ: Mapping[str, str] | None = None) -> UsagePolicy:
    """The policy: each flag given, else its FLYIO_POOL_* variable, else the default."""
    env = os.environ if environ is None else environ
    defaults = UsagePolicy()
    values = {}
    for name, flag, variable in (("warn", warn, ENV_WARN), ("high", high, ENV_HIGH), ("low", low, ENV_LOW)):
        if flag is not None:
            values[name] = parse_percent(flag, f"--pool-{name}")
        elif env.get(variable, "").strip():
            values[name] = parse_percent(env[variable], variable)
        else:
            values[name] = getattr(defaults, name)
    return UsagePolicy(**values)


def usage_line(status: PoolStatus, policy: UsagePolicy) -> str:
    """`data=41.2% (843.1 MiB of 2048.0 MiB, 1204.9 MiB free) metadata=3.0% warn=80% high=85% low=75%`."""
    total = status.total_data_blocks * status.data_block_bytes
    used = status.used_data_blocks * status.data_block_bytes
    return (f"data={status.data_used_fraction:.1%} ({_mib(used)} of {_mib(total)}, {_mib(status.free_data_bytes)} free) "
            f"metadata={status.metadata_used_fraction:.1%} {policy.describe()}")


def warn_if_above(status: PoolStatus, policy: UsagePolicy) -> bool:
    """Log `pool usage above threshold` when data or metadata is at or above `warn`."""
    if not policy.above_warning(status):
        return False
    log.warning(ABOVE_THRESHOLD, data_used=f"{status.data_used_fraction:.1%}",
                metadata_used=f"{status.metadata_used_fraction:.1%}", threshold=f"{policy.warn:.0%}",
                high_watermark=f"{policy.high:.0%}", low_watermark=f"{policy.low:.0%}")
    return True


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"
