"""The three kinds of failure every step is classified into (see docs/engine.md).

* transient: retried with backoff and jitter, bounded (S3 5xx, timeouts of reads, EBUSY);
* permanent: the job aborts with a clear reason (checksum mismatch, hostile tar);
* hazard: the kernel misbehaved; the job aborts at once, records what it touched as
  orphaned, and cleans nothing (the guide's "fail-dumb" pattern).
"""

from __future__ import annotations


class ManagerError(Exception):
    """Base of every error this product raises on purpose; str() is one line for operators."""


class TransientError(ManagerError):
    """Worth retrying: the same call may succeed later."""


class NotReadyError(TransientError):
    """Not now: a precondition of the step does not hold yet (a failing health check).
    The job waits as on a failing guard (`waiting: ...`, backoff) and never aborts for it.

    With `leave_waiting`, waiting in this process cannot help (a CLI command holds the
    manager lock, so nothing else may free what the job needs): the job is left waiting at
    once, the reason recorded, for `fsm resume`."""

    def __init__(self, message: str, *, leave_waiting: bool = False) -> None:
        super().__init__(message)
        self.leave_waiting = leave_waiting


class PermanentError(ManagerError):
    """Retrying cannot help: the input or the request is wrong."""


class HazardError(ManagerError):
    """The kernel or a device misbehaved; touching it again risks a hang or a panic."""

    def __init__(self, message: str, *, device_name: str | None = None) -> None:
        super().__init__(message)
        self.device_name = device_name
