"""The operations guide's safeguards: Health Checker (safeguards.health), Operation Guard
(safeguards.guard), Manager Lock (safeguards.manager_lock).

    from safeguards.guard import GuardConfig, OperationGuard
    from safeguards.health import SystemHealthChecker

See docs/safeguards.md for what each one reads, its defaults and how it behaves. Nothing is
imported here: a command that needs only one of them (or none) loads only that.
"""
