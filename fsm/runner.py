"""Runs jobs: to completion, from their resume point after a crash, and through abort
and retry. Exactly one process runs a job at a time (owner + lease, compare-and-set)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tenacity import Retrying, retry_if_exception_type, retry_if_not_exception_type, stop_after_attempt, wait_exponential_jitter
from transitions import MachineError

from fsm.context import StepContext, StopRequested
from fsm.definition import ABORT_EVENT, ABORTED, COMPLETE, FINAL_STATES, GuardPolicy, StateSpec, Workflow
from fsm.machine import build_machine, fire
from fsm.models import Job, JobEvent
from fsm.ownership import Owner, owner_alive
from fsm.store import JobBusy, JobStore, LostOwnership, load_context, utcnow
from support.errors import ManagerError, NotReadyError
from support.log import get_logger

log = get_logger("fsm.runner")

RESUME_EVENT = "resume"
RETRY_EVENT = "retry"
REOPEN_EVENT = "reopen"


class JobAborted(ManagerError):
    """Raised by `start` when the job for this key was aborted; `fsm retry` re-runs it."""


class InvalidOperation(ManagerError):
    """The operation does not apply to the job in its current state."""


class _Heartbeat:
    """Renews the job's lease while a long step runs, so a live owner is never taken over."""

    def __init__(self, store: JobStore, job_id: int, owner: Owner, lease_seconds: float) -> None:
        self._store, self._job_id, self._owner, self._lease = store, job_id, owner, lease_seconds
        self._done = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self._lease / 3):
            try:
                if not self._store.renew(self._job_id, self._owner, self._lease):
                    self.lost = True
                    return
            except Exception as exc:  # a busy database must not kill the job; the next beat retries
                log.warning("lease renewal failed", job_id=self._job_id, error=str(exc))

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class _Backoff:
    """The waits of one job on one failing precondition: doubling, capped, given up after a total."""

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy, self.waited, self.wait = policy, 0.0, policy.initial_wait

    def next_wait(self) -> float | None:
        """Seconds to wait now, or None when `give_up_after` is spent."""
        if self.waited >= self.policy.give_up_after:
            return None
        wait = self.wait
        self.waited += wait
        self.wait = min(wait * 2, self.policy.max_wait)
        return wait


@dataclass(frozen=True)
class RunnerConfig:
    lease_seconds: float = 30.0


class Runner:
    """Runs the jobs of the given workflows against one store."""

    def __init__(
        self,
        store: JobStore,
        workflows: Mapping[str, Workflow],
        *,
        config: RunnerConfig = RunnerConfig(),
        stop_event: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        self.workflows = dict(workflows)
        self.config = config
        self.owner = Owner.current()
        self.stop_event = stop_event or threading.Event()
        self._sleep = sleep or self._interruptible_sleep

    def _interruptible_sleep(self, seconds: float) -> None:
        if self.stop_event.wait(seconds):
            raise StopRequested("shutdown requested")

    def workflow(self, name: str) -> Workflow:
        try:
            return self.workflows[name]
        except KeyError:
            raise ManagerError(f"unknown workflow {name!r}") from None

    # -- public operations ------------------------------------------------------------

    def start(self, workflow: str, key: str, context: dict[str, Any]) -> Job:
        """Run the job for `key` to the end; a completed one returns at once, untouched."""
        wf = self.workflow(workflow)
        job, created = self.store.create_or_get(workflow, key, wf.initial, context)
        if created:
            log.info("job created", job_id=job.id, workflow=workflow, key=key)
        if job.state == COMPLETE:
            return job
        if job.state == ABORTED:
            raise JobAborted(f"job {job.id} for {key} was aborted ({job.error}); inspect with `fsm show {job.id}`, re-run with `fsm retry {job.id}`")
        return self.run(job.id)

    def run(self, job_id: int) -> Job:
        """Run a job from where it stands (its resume point) until it is final or stops."""
        job = self.store.claim(job_id, self.owner, self.config.lease_seconds)
        try:
            with _Heartbeat(self.store, job_id, self.owner, self.config.lease_seconds):
                self._drive(job)
        except StopRequested:
            log.info("job stopped at a safe point; it resumes on the next start", job_id=job_id)
        finally:
            self.store.release(job_id, self.owner)
        return self.store.get(job_id)

    def resumable_jobs(self) -> list[Job]:
        """Unfinished jobs whose owner is gone (dead pid, other boot, expired lease)."""
        now = utcnow()
        return [
            job for job in self.store.list_jobs()
            if job.state not in FINAL_STATES and job.workflow in self.workflows
            and not owner_alive(job.owner_pid, job.owner_boot_id, job.lease_expires_at, now)
        ]

    def resume_all(self) -> list[Job]:
        """Resume every unfinished job nobody runs; jobs of live owners are left alone."""
        finished: list[Job] = []
        for job in self.resumable_jobs():
            if self.stop_event.is_set():
                break
            try:
                finished.append(self.run(job.id))
            except JobBusy as exc:
                log.info("job taken by another process", job_id=job.id, detail=str(exc))
        return finished

    def abort(self, job_id: int, reason: str) -> Job:
        """Abort a job: its workflow's abort hook records what it leaves; nothing is cleaned.

        A job run by a live process is asked to abort at its next safe point instead."""
        job = self.store.get(job_id)
        if job.state in FINAL_STATES:
            raise InvalidOperation(f"job {job_id} is {job.state}; only unfinished jobs can be aborted")
        try:
            job = self.store.claim(job_id, self.owner, self.config.lease_seconds)
        except JobBusy:
            self.store.request_abort(job_id, reason)
            raise JobBusy(f"job {job_id} is running in pid {job.owner_pid}; abort requested, it stops at its next safe point") from None
        try:
            ctx = self._context(job)
            self._abort(ctx, reason, started_at=utcnow())
        finally:
            self.store.release(job_id, self.owner)
        return self.store.get(job_id)

    def retry(self, job_id: int) -> Job:
        """Re-run an aborted job from the resume point of the state it was aborted in."""
        job = self.store.get(job_id)
        if job.state != ABORTED:
            raise InvalidOperation(f"job {job_id} is {job.state}; only aborted jobs can be retried (unfinished ones: `fsm resume`)")
        wf = self.workflow(job.workflow)
        aborted_from = self._aborted_from(job_id)
        target = wf.resume_point(aborted_from)
        job = self.store.claim(job_id, self.owner, self.config.lease_seconds)
        try:
            with self.store.transaction() as session:
                row = self.store.owned_job(session, job_id, self.owner, ABORTED)
                row.abort_requested = None
                self.store.append_transition(session, row, to_state=target, event=RETRY_EVENT,
                                             started_at=utcnow(), attempt=0)
            log.info("job retried", job_id=job_id, state=target)
        finally:
            self.store.release(job_id, self.owner)
        return self.run(job_id)

    def reopen(self, job_id: int, reason: str) -> Job:
        """Send a complete job whose results are gone back to its initial state (a `reopen`
        event with the reason), history kept; `run` then does the work again."""
        job = self.store.get(job_id)
        if job.state != COMPLETE:
            raise InvalidOperation(f"job {job_id} is {job.state}; only complete jobs can be reopened")
        wf = self.workflow(job.workflow)
        self.store.claim(job_id, self.owner, self.config.lease_seconds)
        try:
            with self.store.transaction() as session:
                row = self.store.owned_job(session, job_id, self.owner, COMPLETE)
                self.store.append_transition(session, row, to_state=wf.initial, event=REOPEN_EVENT,
                                             started_at=utcnow(), attempt=0, error=reason)
            log.warning("job reopened", job_id=job_id, reason=reason)
        finally:
            self.store.release(job_id, self.owner)
        return self.store.get(job_id)

    # -- the loop ---------------------------------------------------------------------

    def _aborted_from(self, job_id: int) -> str:
        for event in reversed(self.store.history(job_id)):
            if event.to_state == ABORTED and event.from_state:
                return event.from_state
        raise InvalidOperation(f"job {job_id} has no abort in its history")

    def _context(self, job: Job) -> StepContext:
        return StepContext(job_id=job.id, workflow=job.workflow, state=job.state, attempt=job.attempt,
                           data=load_context(job), store=self.store, owner=self.owner,
                           stop_event=self.stop_event, log=get_logger("fsm.job"))

    def _drive(self, job: Job) -> None:
        wf = self.workflow(job.workflow)
        ctx = self._context(job)
        if job.state in FINAL_STATES:
            return
        if job.stopped_before_step:
            self.store.set_stopped_before_step(ctx.job_id, self.owner, False)
            log.info("job resumed where it stopped", job_id=ctx.job_id, state=ctx.state)
        else:
            self._move_to_resume_point(wf, ctx)
        model, _machine = build_machine(wf, ctx.state)
        while model.state not in FINAL_STATES:
            reason = self.store.abort_requested(ctx.job_id)
            if reason:
                self._abort(ctx, reason, started_at=utcnow())
                return
            if ctx.should_stop():  # between steps: the next one has not begun
                self.store.set_stopped_before_step(ctx.job_id, self.owner, True)
                raise StopRequested("shutdown requested")
            spec = wf.state(model.state)
            ctx.state = spec.name
            started_at = utcnow()
            try:
                event = self._run_step_when_ready(wf, spec, ctx)
            except (StopRequested, LostOwnership):
                raise
            except Exception as exc:  # anything not retried away ends the job, with its reason kept
                self._abort(ctx, _abort_reason(exc, ctx.attempt, spec), started_at=started_at, error=exc)
                return
            if event is None or not self._fire_with_guards(wf, model, ctx, event, started_at):
                return

    def _move_to_resume_point(self, wf: Workflow, ctx: StepContext) -> None:
        target = wf.resume_point(ctx.state)
        if target == ctx.state:
            return
        with self.store.transaction() as session:
            row = self.store.owned_job(session, ctx.job_id, self.owner, ctx.state)
            self.store.append_transition(session, row, to_state=target, event=RESUME_EVENT,
                                         started_at=utcnow(), attempt=0, context=ctx.data)
        log.info("job resumed from its resume point", job_id=ctx.job_id, interrupted_in=ctx.state, state=target)
        ctx.state = target

    def _run_step_when_ready(self, wf: Workflow, spec: StateSpec, ctx: StepContext) -> str | None:
        """The step's event. While the step says NotReadyError (the Operation Guard's health
        check) the job waits as on a failing guard and runs the step again; None: left waiting."""
        backoff = _Backoff(wf.guard_policy)
        while True:
            try:
                return self._run_step(spec, ctx)
            except NotReadyError as exc:
                if not self._wait(ctx, backoff, str(exc), state=spec.name):
                    return None

    def _run_step(self, spec: StateSpec, ctx: StepContext) -> str:
        policy = spec.retry
        retrying = Retrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.jitter),
            retry=retry_if_exception_type(policy.transient) & retry_if_not_exception_type(NotReadyError),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda rs: log.warning(
                "step failed, retrying", job_id=ctx.job_id, state=spec.name,
                attempt=rs.attempt_number, error=str(rs.outcome.exception()) if rs.outcome else ""),
        )
        for attempt in retrying:
            with attempt:
                ctx.attempt = attempt.retry_state.attempt_number
                if ctx.attempt > 1:  # the first attempt is implied; a commit per step is enough
                    self.store.set_progress(ctx.job_id, self.owner, attempt=ctx.attempt)
                assert spec.step is not None
                return spec.step(ctx)
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _fire_with_guards(self, wf: Workflow, model: Any, ctx: StepContext, event: str, started_at: datetime) -> bool:
        """Fire the step's event; wait with backoff while a guard says no. False: stop driving."""
        from_state = model.state
        backoff = _Backoff(wf.guard_policy)
        while True:
            try:
                moved = fire(model, event, ctx)
            except MachineError as exc:
                self._abort(ctx, f"workflow error: {exc.value}", started_at=started_at)
                return False
            if moved:
                with self.store.transaction() as session:
                    row = self.store.owned_job(session, ctx.job_id, self.owner, from_state)
                    self.store.append_transition(session, row, to_state=model.state, event=event,
                                                 started_at=started_at, attempt=ctx.attempt, context=ctx.data)
                log.info("transition", job_id=ctx.job_id, event=event, from_state=from_state, to_state=model.state,
                         duration_ms=int((utcnow() - started_at).total_seconds() * 1000))
                return True
            reason = model.guard_reason
            if reason is None:
                self._abort(ctx, f"workflow error: no transition for {event} from {from_state}", started_at=started_at)
                return False
            if not self._wait(ctx, backoff, reason, state=from_state, event=event):
                return False

    def _wait(self, ctx: StepContext, backoff: _Backoff, reason: str, **fields: str) -> bool:
        """Record `waiting: <reason>` and sleep the next backoff; False once it is spent
        (the job is left waiting, unowned, for `fsm resume`)."""
        wait = backoff.next_wait()
        if wait is None:
            log.warning("job left waiting; `fsm resume` picks it up", job_id=ctx.job_id, reason=reason, **fields)
            return False
        self.store.set_progress(ctx.job_id, self.owner, error=f"waiting: {reason}")
        log.warning("guard failed, job waits", job_id=ctx.job_id, reason=reason, wait_s=round(wait, 2), **fields)
        self._sleep(wait)
        return True

    def _abort(self, ctx: StepContext, reason: str, *, started_at: datetime, error: BaseException | None = None) -> None:
        wf = self.workflow(ctx.workflow)
        with self.store.transaction() as session:
            row = self.store.owned_job(session, ctx.job_id, self.owner, ctx.state)
            if wf.on_abort is not None:
                ctx._session = session
                try:
                    wf.on_abort(ctx, reason)
                finally:
                    ctx._session = None
            row.abort_requested = None
            self.store.append_transition(session, row, to_state=ABORTED, event=ABORT_EVENT, started_at=started_at,
                                         attempt=ctx.attempt, error=reason, context=ctx.data)
        ctx.state = ABORTED
        log.error("FSM aborted", job_id=ctx.job_id, workflow=ctx.workflow, reason=reason)


def _abort_reason(exc: BaseException, attempt: int, spec: StateSpec) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, spec.retry.transient):
        return f"gave up after {attempt} attempts in {spec.name}: {text}"
    return text


def history_is_contiguous(events: list[JobEvent], initial: str) -> bool:
    """True when each transition starts where the previous one ended and seq has no gaps."""
    state = initial
    for expected_seq, event in enumerate(events, start=1):
        if event.seq != expected_seq or event.from_state != state:
            return False
        state = event.to_state
    return True
