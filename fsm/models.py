"""The engine's two tables: one row per job, one append-only row per transition."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from support.sqlnames import NAMING_CONVENTION

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
