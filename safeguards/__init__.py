"""The operations guide's safeguards: Health Checker, Operation Guard, Manager Lock.

    from safeguards import ManagerLock, OperationGuard, GuardConfig, SystemHealthChecker

See docs/safeguards.md for what each one reads, its defaults and how it behaves.
"""

from safeguards.guard import GuardConfig, GuardTimeout, HealthCheckFailed, OperationGuard
from safeguards.health import CheckResult, HealthReport, HealthThresholds, ProcReader, SystemHealthChecker
from safeguards.manager_lock import LockHeld, LockInfo, LockLost, ManagerLock, read_lock

__all__ = [
    "CheckResult", "GuardConfig", "GuardTimeout", "HealthCheckFailed", "HealthReport", "HealthThresholds",
    "LockHeld", "LockInfo", "LockLost", "ManagerLock", "OperationGuard", "ProcReader", "SystemHealthChecker",
    "read_lock",
]
