"""The safeguards a process-image run uses, built from the state dir and the pool."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from devices.base import ThinPool
from safeguards.guard import GuardConfig, OperationGuard
from safeguards.health import HealthThresholds, SystemHealthChecker


def build_safeguards(
    state_dir: Path, pool: ThinPool, thresholds: HealthThresholds | None = None
) -> tuple[Callable[[], str | None], Callable[[str], AbstractContextManager[Any]]]:
    """(health guard for the workflow's transitions, operation guard for dm-heavy steps)."""
    checker = SystemHealthChecker(pool_status=pool.get_pool_status, thresholds=thresholds or HealthThresholds(),
                                  state_dir=state_dir)
    # The guard's own pre-check would repeat the transition guard's; the transition
    # guard is where a failing check makes the job wait instead of fail.
    guard = OperationGuard(GuardConfig(max_concurrent=1, state_dir=state_dir))
    return checker.as_guard(), guard.operation
