"""The safeguards a process-image run uses, built from the state dir and the pool."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from devices.base import ThinPool
from safeguards.guard import GuardConfig, OperationGuard
from safeguards.health import HealthThresholds, ProcReader, SystemHealthChecker

# The Operation Guard's pre-check reuses a check that passed this recently (the transition
# guard's, run just before the step that takes the guard): one check per guarded transition.
RECENT_PASS_SECONDS = 2.0
# The transition guard reuses a check that passed this recently: a host giving VMs their
# disks at 40 a second runs the five checks about once a second, not 40 times (each reads
# the whole kernel log ring and every process's stat). A failed check is never reused.
GUARD_REUSE_SECONDS = 1.0


def build_safeguards(
    state_dir: Path, pool: ThinPool, thresholds: HealthThresholds | None = None, reader: ProcReader | None = None
) -> tuple[Callable[[], str | None], Callable[[str], AbstractContextManager[Any]]]:
    """(health guard for the workflow's transitions, operation guard for dm-heavy steps).

    One checker for both: the transition into a device state is checked, and so is each
    dm-heavy operation right before it takes the guard (the guide's "runs health check
    before acquiring lock"), by the check that passed at the transition when it is at most
    RECENT_PASS_SECONDS old, else afresh. Either failing makes the job wait, never abort.
    The checker's I/O-wait sampler runs in the background from here on. Thresholds
    default to HealthThresholds with the operator's FLYIO_HEALTH_* variables applied."""
    checker = SystemHealthChecker(pool_status=pool.get_pool_status, thresholds=thresholds, state_dir=state_dir,
                                  reader=reader)
    checker.start_sampler()
    guard = OperationGuard(GuardConfig(max_concurrent=1, health_check=lambda: checker.check_recent(RECENT_PASS_SECONDS),
                                       state_dir=state_dir))
    return checker.as_guard(GUARD_REUSE_SECONDS), guard.operation


def build_cleanup_guard(state_dir: Path) -> Callable[[str], AbstractContextManager[Any]]:
    """The Operation Guard for gc and delete-snapshot: serialized with every dm-heavy step
    of every process on `state_dir` (the same flock), without the health check: freeing
    devices is the remedy for a full pool, which the check would refuse (gc --force makes
    its own D-state check first)."""
    return OperationGuard(GuardConfig(max_concurrent=1, state_dir=state_dir)).operation
