"""The engine's tables: one row per job; append-only history: one row per transition
(job_events) and one per wait episode or abort request (job_notes)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from support.sqlnames import NAMING_CONVENTION

class NoteKind(str, Enum):
    GUARD_WAIT = "guard-wait"  # a failing guard, or a step not ready (the Operation Guard)
    RETRY_WAIT = "retry-wait"  # tenacity's back-off between attempts of a step
    ABORT_REQUEST = "abort-request"


class WaitOutcome(str, Enum):
    PASSED = "passed"  # the guard passed / the step's next attempt succeeded
    ABORTED = "aborted"  # an abort request ended the wait
    STOPPED = "stopped"  # shutdown
    LEFT_WAITING = "left waiting"  # give_up_after spent; `fsm resume` picks the job up
    FAILED = "failed"  # the step failed for good (the job aborts with its error)
    LOST = "lost"  # another process took the job over


class FsmBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(FsmBase):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("workflow", "idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workflow: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(64), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    context: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    error: Mapped[str | None] = mapped_column(Text)
    abort_requested: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # Who runs the job now; a dead owner (pid gone, other boot, or lease expired) frees it.
    owner_pid: Mapped[int | None] = mapped_column(Integer)
    owner_boot_id: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    # A shutdown stopped the job before its state's step began: nothing of the step is
    # half done, so it resumes in that state itself, not at the state's resume point.
    stopped_before_step: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Set while the job sleeps on a failing guard or a retry back-off (the reason is in
    # `error`); what `fsm show` calls "waiting since".
    waiting_since: Mapped[datetime | None] = mapped_column(DateTime)


class JobEvent(FsmBase):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(64))
    to_state: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    attempt: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # JSON from the workflow's `describe` hook: what the transition concerned (a layer).
    detail: Mapped[str | None] = mapped_column(Text)


class JobNote(FsmBase):
    """Append-only: one episode of waiting (on a guard, or a retry back-off) written when
    it ends, or one abort request written when it is asked for."""

    __tablename__ = "job_notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # NoteKind
    state: Mapped[str] = mapped_column(String(64))  # the job's state at the time
    event: Mapped[str | None] = mapped_column(String(64))  # the event a guard held back
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    reasons: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, distinct, in order seen
    waits: Mapped[int] = mapped_column(Integer, default=0)  # sleeps in the episode
    outcome: Mapped[str | None] = mapped_column(String(32))  # WaitOutcome; None for a request
    requested_by_pid: Mapped[int | None] = mapped_column(Integer)
