"""What a step sees: its job's id, state, attempt and context data, and a way to persist."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from fsm.ownership import Owner
from fsm.store import JobStore
from support.errors import ManagerError
from support.log import StructLogger, get_logger


class StopRequested(ManagerError):
    """The process is shutting down; the job stops at a safe point and resumes later."""


class AbortRequested(ManagerError):
    """An operator asked (`fsm abort`) for the job to abort; raised at a safe point (every
    wait checks), the runner then aborts it with the request's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class StepContext:
    """Passed to every step, condition, guard and abort hook.

    `data` is the job's JSON context. It is saved with every transition; a step that
    creates something outside the database saves its intent first with `transaction()`.
    """

    job_id: int
    workflow: str
    state: str
    attempt: int
    data: dict[str, Any]
    store: JobStore
    owner: Owner | None
    stop_event: threading.Event = field(default_factory=threading.Event)
    log: StructLogger = field(default_factory=lambda: get_logger("fsm.job"))
    _session: Session | None = None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A transaction that also saves `data`; joins the abort's transaction when inside one."""
        if self._session is not None:
            yield self._session
            return
        with self.store.transaction() as session:
            self._session = session
            try:
                yield session
                if self.owner is not None:
                    self.store.save_context(session, self.job_id, self.owner, self.data)
            finally:
                self._session = None

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for lookups that change nothing, `data` included (nothing is saved);
        joins the abort's transaction when inside one."""
        if self._session is not None:
            yield self._session
            return
        with self.store.reading() as session:
            yield session

    def save(self) -> None:
        """Persist `data` now (intent first, before creating a kernel object)."""
        with self.transaction():
            pass

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def check_stop(self) -> None:
        """Raise StopRequested at a safe point of a long step when shutdown was asked for."""
        if self.stop_event.is_set():
            raise StopRequested("shutdown requested")

    def check_interrupt(self) -> None:
        """Raise StopRequested (shutdown) or AbortRequested (`fsm abort`) when either was
        asked for. Every wait calls it between slices of its sleep; a long step may call it
        at a safe point (nothing half made), as with check_stop."""
        self.check_stop()
        reason = self.store.abort_requested(self.job_id)
        if reason:
            raise AbortRequested(reason)
