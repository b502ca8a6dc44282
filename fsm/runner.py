"""Runs jobs: to completion, from their resume point after a crash, and through abort
and retry. Exactly one process runs a job at a time (owner + lease, compare-and-set).

Every change of a job's state, a step's event or an operator's (abort, resume, retry,
reopen), is fired on the job's `transitions` machine (fsm/machine.py), which decides the
edge; the store then persists it (owned_job + append_transition, one transaction)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tenacity import RetryCallState, retry_if_exception_type, retry_if_not_exception_type
from transitions import MachineError

from fsm.context import AbortRequested, StepContext, StopRequested
from fsm.definition import ABORTED, COMPLETE, FINAL_STATES, OperatorEvent, StateSpec, Workflow
from fsm.machine import JobModel, build_machine, can_fire, fire
from fsm.models import Job, JobEvent, NoteKind, WaitOutcome
from fsm.ownership import Owner, owner_alive
from fsm.store import JobBusy, JobStore, LostOwnership, load_context, utcnow
from fsm.waiting import Clock, Episode, RealClock, pause
from support.errors import ManagerError, NotReadyError
from support.log import get_logger
from support.retry import WaitBudget, retrying

log = get_logger("fsm.runner")

ABORT_EVENT = OperatorEvent.ABORT.value
RESUME_EVENT = OperatorEvent.RESUME.value
RETRY_EVENT = OperatorEvent.RETRY.value
REOPEN_EVENT = OperatorEvent.REOPEN.value


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
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.workflows = dict(workflows)
        self.config = config
        self.owner = Owner.current()
        self.stop_event = stop_event or threading.Event()
        self.clock = clock or RealClock(self.stop_event)

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

        A job run by a live process is asked to abort instead: the request is recorded and
        the job is returned as the request left it (not aborted, `abort_requested` set); its
        owner aborts it at its next safe point: any wait within a fraction of a second, a
        running step when it returns."""
        job = self.store.get(job_id)
        model = self._operator_machine(job, ABORT_EVENT, f"job {job_id} is {job.state}; only unfinished jobs can be aborted")
        try:
            job = self.store.claim(job_id, self.owner, self.config.lease_seconds)
        except JobBusy:
            job = self.store.request_abort(job_id, reason, requested_by_pid=self.owner.pid)
            log.warning("abort requested", job_id=job_id, owner_pid=job.owner_pid, reason=reason)
            return job
        try:
            ctx = self._context(job)
            self._abort(model, ctx, reason, started_at=utcnow())
        finally:
            self.store.release(job_id, self.owner)
        return self.store.get(job_id)

    def retry(self, job_id: int) -> Job:
        """Re-run an aborted job from the resume point of the state it was aborted in."""
        job = self.store.get(job_id)
        model = self._operator_machine(job, RETRY_EVENT, f"job {job_id} is {job.state}; only aborted jobs can be "
                                                          "retried (unfinished ones: `fsm resume`)")
        aborted_from = self._aborted_from(job_id)
        if not fire(model, RETRY_EVENT, self._context(job), aborted_from=aborted_from):
            raise InvalidOperation(f"job {job_id} was aborted in {aborted_from}, a state its workflow cannot retry")
        job = self.store.claim(job_id, self.owner, self.config.lease_seconds)
        try:
            with self.store.transaction() as session:
                row = self.store.owned_job(session, job_id, self.owner, ABORTED)
                row.abort_requested = None
                self.store.append_transition(session, row, to_state=model.state, event=RETRY_EVENT,
                                             started_at=utcnow(), attempt=0)
            log.info("job retried", job_id=job_id, state=model.state)
        finally:
            self.store.release(job_id, self.owner)
        return self.run(job_id)

    def reopen(self, job_id: int, reason: str) -> Job:
        """Send a complete job whose results are gone back to its initial state (a `reopen`
        event with the reason), history kept; `run` then does the work again."""
        job = self.store.get(job_id)
        model = self._operator_machine(job, REOPEN_EVENT, f"job {job_id} is {job.state}; only complete jobs can be reopened")
        fire(model, REOPEN_EVENT, self._context(job))
        self.store.claim(job_id, self.owner, self.config.lease_seconds)
        try:
            with self.store.transaction() as session:
                row = self.store.owned_job(session, job_id, self.owner, COMPLETE)
                self.store.append_transition(session, row, to_state=model.state, event=REOPEN_EVENT,
                                             started_at=utcnow(), attempt=0, error=reason)
            log.warning("job reopened", job_id=job_id, reason=reason)
        finally:
            self.store.release(job_id, self.owner)
        return self.store.get(job_id)

    # -- the loop ---------------------------------------------------------------------

    def _operator_machine(self, job: Job, event: str, refusal: str) -> JobModel:
        """The job's machine, in its state; InvalidOperation(`refusal`) when the machine has
        no `event` edge out of that state (e.g. abort of a final job)."""
        model, machine = build_machine(self.workflow(job.workflow), job.state)
        if not can_fire(machine, job.state, event):
            raise InvalidOperation(refusal)
        return model

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
        model, machine = build_machine(wf, ctx.state)
        model.abort_requested = job.abort_requested  # `job` is the row the claim just read
        if job.stopped_before_step:
            self.store.set_stopped_before_step(ctx.job_id, self.owner, False)
            log.info("job resumed where it stopped", job_id=ctx.job_id, state=ctx.state)
        elif can_fire(machine, ctx.state, RESUME_EVENT):
            self._move_to_resume_point(wf, model, ctx)
        while model.state not in FINAL_STATES:
            reason = model.abort_requested
            if reason:
                self._abort(model, ctx, reason, started_at=utcnow())
                return
            if ctx.should_stop():  # between steps: the next one has not begun
                self.store.set_stopped_before_step(ctx.job_id, self.owner, True)
                raise StopRequested("shutdown requested")
            spec = wf.state(model.state)
            ctx.state = spec.name
            started_at = utcnow()
            before = copy.deepcopy(ctx.data)  # what the step concerned, for the transition's detail
            try:
                event = self._run_step_when_ready(wf, spec, ctx)
            except AbortRequested as request:  # asked while the step waited; the hook records what it made
                self._abort(model, ctx, request.reason, started_at=utcnow())
                return
            except (StopRequested, LostOwnership):
                raise
            except Exception as exc:  # anything not retried away ends the job, with its reason kept
                self._abort(model, ctx, _abort_reason(exc, ctx.attempt, spec), started_at=started_at)
                return
            # str(): a step may return an enum member; history and logs hold its plain value
            if event is None or not self._fire_with_guards(wf, model, ctx, str(event), started_at, before):
                return

    def _move_to_resume_point(self, wf: Workflow, model: JobModel, ctx: StepContext) -> None:
        """The `resume` edge: a job interrupted inside a state goes back to its resume point."""
        interrupted_in = model.state
        fire(model, RESUME_EVENT, ctx)
        with self.store.transaction() as session:
            row = self.store.owned_job(session, ctx.job_id, self.owner, interrupted_in)
            self.store.append_transition(session, row, to_state=model.state, event=RESUME_EVENT,
                                         started_at=utcnow(), attempt=0, context=ctx.data,
                                         detail=self._detail(wf, interrupted_in, ctx.data, RESUME_EVENT))
        log.info("job resumed from its resume point", job_id=ctx.job_id, interrupted_in=interrupted_in, state=model.state)
        ctx.state = model.state

    def _run_step_when_ready(self, wf: Workflow, spec: StateSpec, ctx: StepContext) -> str | None:
        """The step's event. While the step says NotReadyError (the Operation Guard's health
        check) the job waits as on a failing guard and runs the step again; None: left waiting."""
        backoff = _guard_waits(wf)
        with self._episode(ctx, Episode(NoteKind.GUARD_WAIT, spec.name)) as episode:
            while True:
                try:
                    return self._run_step(spec, ctx)
                except NotReadyError as exc:
                    if not self._wait(ctx, backoff, episode, str(exc), leave=exc.leave_waiting):
                        return None

    def _run_step(self, spec: StateSpec, ctx: StepContext) -> str:
        policy = spec.retry
        with self._episode(ctx, Episode(NoteKind.RETRY_WAIT, spec.name)) as episode:
            attempts = retrying(
                policy.backoff, attempts=policy.max_attempts,
                retry=(retry_if_exception_type(policy.transient)
                       & retry_if_not_exception_type((NotReadyError, AbortRequested, StopRequested))),
                sleep=lambda seconds: pause(ctx, seconds, self.clock),
                before_sleep=lambda rs: self._before_retry(ctx, episode, rs),
            )
            for attempt in attempts:
                with attempt:
                    ctx.attempt = attempt.retry_state.attempt_number
                    if ctx.attempt > 1:  # the first attempt is implied; a commit per step is enough
                        self.store.set_progress(ctx.job_id, self.owner, attempt=ctx.attempt)
                    assert spec.step is not None
                    return spec.step(ctx)
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _before_retry(self, ctx: StepContext, episode: Episode, state: RetryCallState) -> None:
        """A failed attempt is about to be retried: say so in the log and on the job row."""
        error = str(state.outcome.exception()) if state.outcome else ""
        wait = state.next_action.sleep if state.next_action else 0.0
        episode.saw(error)
        self.store.set_progress(ctx.job_id, self.owner, attempt=state.attempt_number,
                                error=f"retrying: {error}", waiting_since=episode.started_at)
        log.warning("step failed, retrying", job_id=ctx.job_id, state=episode.state, attempt=state.attempt_number,
                    wait_s=round(wait, 2), error=error)

    def _fire_with_guards(self, wf: Workflow, model: JobModel, ctx: StepContext, event: str, started_at: datetime,
                          before: dict[str, Any]) -> bool:
        """Fire the step's event; wait with backoff while a guard says no. False: stop driving.
        `before` is the job's data as the step found it: what the transition concerned."""
        from_state = model.state
        backoff = _guard_waits(wf)
        try:
            with self._episode(ctx, Episode(NoteKind.GUARD_WAIT, from_state, event)) as episode:
                while not self._try_fire(wf, model, ctx, event, started_at, before):
                    reason = model.guard_reason
                    if reason is None:
                        self._abort(model, ctx, f"workflow error: no transition for {event} from {from_state}",
                                    started_at=started_at)
                        return False
                    if not self._wait(ctx, backoff, episode, reason):
                        return False
                return True
        except MachineError as exc:
            self._abort(model, ctx, f"workflow error: {exc.value}", started_at=started_at)
            return False
        except AbortRequested as request:  # asked while a guard held the job; the step's work is done
            self._abort(model, ctx, request.reason, started_at=utcnow())
            return False

    def _try_fire(self, wf: Workflow, model: JobModel, ctx: StepContext, event: str, started_at: datetime,
                  before: dict[str, Any]) -> bool:
        """Fire `event` and commit the transition; False when a guard or condition held it."""
        from_state = model.state
        if not fire(model, event, ctx):
            return False
        detail = self._detail(wf, from_state, before, event, ctx.data)
        with self.store.transaction() as session:
            row = self.store.owned_job(session, ctx.job_id, self.owner, from_state)
            self.store.append_transition(session, row, to_state=model.state, event=event, started_at=started_at,
                                         attempt=ctx.attempt, context=ctx.data, detail=detail)
            model.abort_requested = row.abort_requested
        log.info("transition", job_id=ctx.job_id, event=event, from_state=from_state, to_state=model.state,
                 duration_ms=int((utcnow() - started_at).total_seconds() * 1000),
                 **({"detail": detail["text"]} if detail and "text" in detail else {}))
        return True

    def _wait(self, ctx: StepContext, backoff: WaitBudget, episode: Episode, reason: str, *,
              leave: bool = False) -> bool:
        """Record `waiting: <reason>` and sleep the next backoff (interrupted by an abort
        request or shutdown); False once it is spent, or at once with `leave` (the job is
        left waiting, unowned, for `fsm resume`)."""
        wait = None if leave else backoff.next_wait()
        if wait is None:
            if leave:  # the reason is recorded even though this process does not wait on it
                episode.saw(reason)
                self.store.set_progress(ctx.job_id, self.owner, error=f"waiting: {reason}",
                                        waiting_since=episode.started_at)
            episode.outcome = WaitOutcome.LEFT_WAITING
            log.warning("job left waiting; `fsm resume` picks it up", job_id=ctx.job_id, reason=reason,
                        state=episode.state, **_event_field(episode))
            return False
        episode.saw(reason)
        self.store.set_progress(ctx.job_id, self.owner, error=f"waiting: {reason}", waiting_since=episode.started_at)
        log.warning("guard failed, job waits", job_id=ctx.job_id, reason=reason, wait_s=round(wait, 2),
                    state=episode.state, **_event_field(episode))
        pause(ctx, wait, self.clock)
        return True

    @contextmanager
    def _episode(self, ctx: StepContext, episode: Episode) -> Iterator[Episode]:
        """Yield `episode` to the waits of one loop; when the loop ends, however it ends,
        the episode (if it waited at all) becomes one history row."""
        try:
            yield episode
        except BaseException as exc:
            self._record_episode(ctx, episode, episode.ended_by(exc))
            raise
        self._record_episode(ctx, episode, episode.ended_by(None))

    def _record_episode(self, ctx: StepContext, episode: Episode, outcome: WaitOutcome | None) -> None:
        if outcome is None:
            return
        with self.store.transaction() as session:
            self.store.add_note(session, episode.note(ctx.job_id, outcome))
        log.info("wait ended", job_id=ctx.job_id, kind=episode.kind.value, state=episode.state,
                 outcome=outcome.value, waits=episode.waits,
                 waited_s=round((utcnow() - episode.started_at).total_seconds(), 2))

    def _detail(self, wf: Workflow, state: str, data: Mapping[str, Any], event: str | None,
                after: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The workflow's description of a transition; a failing hook costs the detail, not the job."""
        try:
            return wf.detail(state, data, event, after)
        except Exception as exc:
            log.warning("describe hook failed", workflow=wf.name, state=state, event=event, error=str(exc))
            return None

    def _abort(self, model: JobModel, ctx: StepContext, reason: str, *, started_at: datetime) -> None:
        """The `abort` edge, with the workflow's abort hook inside the same transaction (a
        failing hook rolls the abort back: the job stays where it was)."""
        wf = self.workflow(ctx.workflow)
        from_state = model.state
        detail = self._detail(wf, from_state, ctx.data, ABORT_EVENT)
        fire(model, ABORT_EVENT, ctx)
        with self.store.transaction() as session:
            row = self.store.owned_job(session, ctx.job_id, self.owner, from_state)
            if wf.on_abort is not None:
                ctx._session = session
                try:
                    wf.on_abort(ctx, reason)
                finally:
                    ctx._session = None
            row.abort_requested = None
            self.store.append_transition(session, row, to_state=model.state, event=ABORT_EVENT, started_at=started_at,
                                         attempt=ctx.attempt, error=reason, context=ctx.data, detail=detail)
        ctx.state = model.state
        log.error("FSM aborted", job_id=ctx.job_id, workflow=ctx.workflow, reason=reason)


def _guard_waits(wf: Workflow) -> WaitBudget:
    """The waits of one job on one failing precondition: doubling, capped, given up after a total."""
    return WaitBudget(wf.guard_policy.backoff, wf.guard_policy.give_up_after)


def _event_field(episode: Episode) -> dict[str, str]:
    return {"event": episode.event} if episode.event else {}


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
