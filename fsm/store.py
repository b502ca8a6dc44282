"""Durable jobs and their history. Every write is one BEGIN IMMEDIATE transaction; a
transition and its history row commit together, guarded by the expected state and owner
(compare-and-set), so two processes can never both move the same job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from fsm.database import READ_ONLY
from fsm.definition import FINAL_STATES
from fsm.models import Job, JobEvent, JobNote, NoteKind
from fsm.ownership import Owner, owner_alive
from support.errors import ManagerError


class JobNotFound(ManagerError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} not found")


class JobBusy(ManagerError):
    """The job is owned by a live process; it is not touched."""


class LostOwnership(ManagerError):
    """Another process took the job over (our lease expired); stop without writing."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def load_context(job: Job) -> dict[str, Any]:
    return json.loads(job.context or "{}")


class JobStore:
    """Reads and writes jobs, job_events and job_notes. Holds no state besides the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Reads begin deferred: they neither wait for a writer nor hold one up (fsm/database.py).
        self._reads = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One BEGIN IMMEDIATE transaction: commits on success, rolls back on any error."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session that only reads: a deferred transaction, which in WAL mode neither waits
        for a writer nor holds one up (the catalog's checks before a job, a step's lookups)."""
        with self._reads() as session:
            yield session

    # -- reading ---------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        with self._reads() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job

    def list_jobs(self, state: str | None = None) -> list[Job]:
        with self._reads() as session:
            query = select(Job).order_by(Job.id)
            if state:
                query = query.where(Job.state == state)
            return list(session.scalars(query))

    def history(self, job_id: int) -> list[JobEvent]:
        self.get(job_id)
        with self._reads() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))

    def notes(self, job_id: int) -> list[JobNote]:
        """The job's wait episodes and abort requests, oldest first."""
        self.get(job_id)
        with self._reads() as session:
            return list(session.scalars(select(JobNote).where(JobNote.job_id == job_id).order_by(JobNote.id)))

    def find(self, workflow: str, key: str) -> Job | None:
        with self._reads() as session:
            return session.scalars(select(Job).where(Job.workflow == workflow, Job.idempotency_key == key)).first()

    # -- writing ---------------------------------------------------------------------

    def create_or_get(self, workflow: str, key: str, initial: str, context: dict[str, Any]) -> tuple[Job, bool]:
        """The job for (workflow, key), created in `initial` if there is none yet."""
        with self.transaction() as session:
            job = session.scalars(select(Job).where(Job.workflow == workflow, Job.idempotency_key == key)).first()
            if job is not None:
                return job, False
            now = utcnow()
            job = Job(workflow=workflow, idempotency_key=key, state=initial, attempt=0,
                      context=json.dumps(context, sort_keys=True), created_at=now, updated_at=now)
            session.add(job)
            session.flush()
            return job, True

    def add_finished(self, session: Session, workflow: str, key: str, state: str, context: dict[str, Any], *,
                     event: str, detail: dict[str, Any] | None = None) -> Job:
        """A job recorded as already finished in `state` (a catalog rebuilt from what the work
        left behind), with one history row saying so; inside the caller's transaction."""
        now = utcnow()
        job = Job(workflow=workflow, idempotency_key=key, state=state, attempt=0,
                  context=json.dumps(context, sort_keys=True), created_at=now, updated_at=now)
        session.add(job)
        session.flush()
        session.add(JobEvent(job_id=job.id, seq=1, from_state=None, to_state=state, event=event, started_at=now,
                             finished_at=now, attempt=0, error=None,
                             detail=json.dumps(detail, sort_keys=True) if detail else None))
        return job

    def claim(self, job_id: int, owner: Owner, lease_seconds: float) -> Job:
        """Make `owner` the job's owner unless a live process owns it (JobBusy)."""
        with self.transaction() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            now = utcnow()
            ours = job.owner_pid == owner.pid and job.owner_boot_id == owner.boot_id
            if not ours and owner_alive(job.owner_pid, job.owner_boot_id, job.lease_expires_at, now):
                raise JobBusy(f"job {job_id} is being run by pid {job.owner_pid}; not touching it")
            job.owner_pid = owner.pid
            job.owner_boot_id = owner.boot_id
            job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            job.updated_at = now
            return job

    def renew(self, job_id: int, owner: Owner, lease_seconds: float) -> bool:
        """Extend the lease; False when the job is no longer ours."""
        with self.transaction() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.owner_pid == owner.pid, Job.owner_boot_id == owner.boot_id)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            )
            return result.rowcount == 1

    def release(self, job_id: int, owner: Owner) -> None:
        """Give the job up; nobody waits in it any more (a reason to wait stays in `error`)."""
        with self.transaction() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.owner_pid == owner.pid, Job.owner_boot_id == owner.boot_id)
                .values(owner_pid=None, owner_boot_id=None, lease_expires_at=None, waiting_since=None)
            )

    def owned_job(self, session: Session, job_id: int, owner: Owner | None, expected_state: str) -> Job:
        """The job row, checked to be in `expected_state` and (if given) owned by `owner`."""
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if owner is not None and (job.owner_pid != owner.pid or job.owner_boot_id != owner.boot_id):
            raise LostOwnership(f"job {job_id} is no longer owned by pid {owner.pid}")
        if job.state != expected_state:
            raise LostOwnership(f"job {job_id} moved to {job.state} while this process expected {expected_state}")
        return job

    def append_transition(
        self,
        session: Session,
        job: Job,
        *,
        to_state: str,
        event: str,
        started_at: datetime,
        attempt: int,
        error: str | None = None,
        context: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> JobEvent:
        """Move the job and append its history row, inside the caller's transaction.
        `detail` is what the transition concerned (the workflow's describe hook)."""
        last_seq = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job.id)) or 0
        now = utcnow()
        row = JobEvent(job_id=job.id, seq=last_seq + 1, from_state=job.state, to_state=to_state, event=event,
                       started_at=started_at, finished_at=now, attempt=attempt, error=error,
                       detail=json.dumps(detail, sort_keys=True) if detail else None)
        session.add(row)
        job.state = to_state
        job.updated_at = now
        job.attempt = 0
        job.error = error
        job.waiting_since = None
        if context is not None:
            job.context = json.dumps(context, sort_keys=True)
        return row

    def save_context(self, session: Session, job_id: int, owner: Owner, context: dict[str, Any]) -> None:
        job = session.get(Job, job_id)
        if job is None or job.owner_pid != owner.pid or job.owner_boot_id != owner.boot_id:
            raise LostOwnership(f"job {job_id} is no longer owned by pid {owner.pid}")
        text = json.dumps(context, sort_keys=True)
        if text != job.context:  # unchanged: a step that only read commits no write (no WAL fsync)
            job.context = text
            job.updated_at = utcnow()

    def amend_result(self, job_id: int, state: str, context: dict[str, Any]) -> Job:
        """Rewrite what a final job left in its context (a device's path, bound anew after a
        reboot), guarded: the job must still be in `state` and owned by no process. Not a
        change of state: no history row."""
        with self.transaction() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state != state or job.owner_pid is not None:
                raise LostOwnership(f"job {job_id} moved to {job.state} (owner pid {job.owner_pid}) while its "
                                    f"result was being amended")
            job.context = json.dumps(context, sort_keys=True)
            job.updated_at = utcnow()
            return job

    def set_progress(self, job_id: int, owner: Owner, *, attempt: int | None = None, error: str | None = None,
                     waiting_since: datetime | None = None) -> None:
        """Record the attempt number and the reason a job waits or retries; `waiting_since`
        is set while it sleeps on that reason and cleared by every other call."""
        values: dict[str, Any] = {"updated_at": utcnow(), "error": error, "waiting_since": waiting_since}
        if attempt is not None:
            values["attempt"] = attempt
        with self.transaction() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.owner_pid == owner.pid).values(**values))

    def set_stopped_before_step(self, job_id: int, owner: Owner, stopped: bool) -> None:
        """Mark (or clear) that a shutdown stopped the job before its current step began."""
        with self.transaction() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.owner_pid == owner.pid,
                                              Job.owner_boot_id == owner.boot_id)
                            .values(stopped_before_step=stopped))

    def request_abort(self, job_id: int, reason: str, *, requested_by_pid: int) -> Job:
        """Ask the job's owner to abort at its next safe point (every wait checks within a
        fraction of a second); the request is kept in history with who asked and when.
        Returns the job as the request left it (its owner may abort it a moment later)."""
        with self.transaction() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            now = utcnow()
            job.abort_requested = reason
            job.updated_at = now
            session.add(JobNote(job_id=job_id, kind=NoteKind.ABORT_REQUEST.value, state=job.state, started_at=now,
                                finished_at=now, reasons=json.dumps([reason]), waits=0,
                                requested_by_pid=requested_by_pid))
            return job

    def add_note(self, session: Session, note: JobNote) -> None:
        """Append a wait episode (or other note) inside the caller's transaction."""
        session.add(note)

    def abort_requested(self, job_id: int) -> str | None:
        with self._reads() as session:
            return session.scalar(select(Job.abort_requested).where(Job.id == job_id))


def is_db_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError)


# -- what other parts ask of the jobs (the catalog's eviction and gc), inside their session --

def job_state(session: Session, job_id: int | None) -> str | None:
    """The state of job `job_id` (None: no such job, or no id)."""
    return session.scalar(select(Job.state).where(Job.id == job_id)) if job_id is not None else None


def unfinished_contexts(session: Session) -> list[dict[str, Any]]:
    """The context data of every job not finished: what such a job may still use."""
    return [json.loads(context or "{}")
            for context in session.scalars(select(Job.context).where(Job.state.not_in(FINAL_STATES)))]


def running_jobs(session: Session) -> list[Job]:
    """Unfinished jobs a live process owns, oldest first."""
    now = utcnow()
    jobs = session.scalars(select(Job).where(Job.state.not_in(FINAL_STATES)).order_by(Job.id)).all()
    return [job for job in jobs if owner_alive(job.owner_pid, job.owner_boot_id, job.lease_expires_at, now)]
