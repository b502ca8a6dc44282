"""The engine's behaviours, in-process, on real SQLite files."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from fsm import (ABORTED, COMPLETE, GuardPolicy, InvalidOperation, JobAborted, JobBusy, JobNotFound,
                 RetryPolicy, Runner, StateSpec, StepContext, TransitionSpec, Workflow)
from fsm.database import open_engine
from fsm.runner import history_is_contiguous
from fsm.store import JobStore
from migrations import upgrade_database
from support.errors import NotReadyError, PermanentError, TransientError

FAST = RetryPolicy(max_attempts=3, initial_wait=0.0, max_wait=0.0, jitter=0.0)


class FakeClock:
    """Time that moves only when a wait sleeps: no real sleeping; every slice is counted,
    and `on_sleep` lets a test act in the middle of a wait (e.g. ask for an abort)."""

    def __init__(self, on_sleep: Callable[[int], None] | None = None) -> None:
        self.now = 0.0
        self.slices: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slices.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.slices))


def make_runner(tmp_path: Path, workflow: Workflow, clock: FakeClock | None = None) -> Runner:
    db = tmp_path / "images.db"
    upgrade_database(db)
    return Runner(JobStore(open_engine(db)), {workflow.name: workflow}, clock=clock or FakeClock())


def two_step(step_a, step_b, *, on_abort=None, guards=(), retry=FAST) -> Workflow:
    return Workflow(
        name="two", initial="a",
        states=(StateSpec("a", step=step_a, retry=retry), StateSpec("b", step=step_b, retry=retry, resume_point="a")),
        transitions=(TransitionSpec("go", "a", "b", guards=guards), TransitionSpec("done", "b", "complete")),
        on_abort=on_abort, guard_policy=GuardPolicy(initial_wait=1.0, max_wait=2.0, give_up_after=5),
    )


def test_transient_errors_are_retried_then_succeed(tmp_path: Path) -> None:
    calls = {"a": 0}

    def flaky(ctx: StepContext) -> str:
        calls["a"] += 1
        if calls["a"] < 3:
            raise TransientError("S3 503")
        return "go"

    runner = make_runner(tmp_path, two_step(flaky, lambda ctx: "done"))
    job = runner.start("two", "k", {})
    assert job.state == COMPLETE
    assert calls["a"] == 3
    assert runner.store.history(job.id)[0].attempt == 3


def test_transient_errors_exhausted_abort_with_the_count(tmp_path: Path) -> None:
    def always(ctx: StepContext) -> str:
        raise TransientError("S3 503")

    runner = make_runner(tmp_path, two_step(always, lambda ctx: "done"))
    job = runner.start("two", "k", {})
    assert job.state == ABORTED
    assert job.error == "gave up after 3 attempts in a: S3 503"


def test_permanent_error_aborts_at_once_and_runs_the_abort_hook_in_the_same_transaction(tmp_path: Path) -> None:
    calls = {"b": 0}
    recorded: list[str] = []

    def bad(ctx: StepContext) -> str:
        calls["b"] += 1
        raise PermanentError("checksum mismatch")

    def on_abort(ctx: StepContext, reason: str) -> None:
        with ctx.transaction() as session:
            session.execute(text("CREATE TABLE IF NOT EXISTS hook_log (reason TEXT)"))
            session.execute(text("INSERT INTO hook_log VALUES (:r)"), {"r": reason})
        recorded.append(reason)

    runner = make_runner(tmp_path, two_step(lambda ctx: "go", bad, on_abort=on_abort))
    job = runner.start("two", "k", {})
    assert (job.state, job.error, calls["b"]) == (ABORTED, "checksum mismatch", 1)
    assert recorded == ["checksum mismatch"]
    with runner.store.engine.begin() as conn:
        assert conn.execute(text("SELECT reason FROM hook_log")).scalars().all() == ["checksum mismatch"]
    with pytest.raises(JobAborted, match="fsm retry"):
        runner.start("two", "k", {})


def test_a_failing_abort_hook_rolls_the_abort_back(tmp_path: Path) -> None:
    def on_abort(ctx: StepContext, reason: str) -> None:
        raise RuntimeError("disk full")

    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done", on_abort=on_abort))
    job, _ = runner.store.create_or_get("two", "k", "a", {})
    with pytest.raises(RuntimeError):
        runner.abort(job.id, "operator")
    assert runner.store.get(job.id).state == "a"
    assert runner.store.history(job.id) == []


def test_retry_reruns_from_the_resume_point_and_keeps_history(tmp_path: Path) -> None:
    state = {"fail": True}

    def b(ctx: StepContext) -> str:
        if state["fail"]:
            raise PermanentError("boom")
        return "done"

    runner = make_runner(tmp_path, two_step(lambda ctx: "go", b))
    job = runner.start("two", "k", {})
    assert job.state == ABORTED
    state["fail"] = False
    job = runner.retry(job.id)
    assert job.state == COMPLETE
    events = [(e.from_state, e.to_state, e.event) for e in runner.store.history(job.id)]
    # b resumes at a, so the retry goes back to a and walks forward again.
    assert events == [("a", "b", "go"), ("b", "aborted", "abort"), ("aborted", "a", "retry"),
                      ("a", "b", "go"), ("b", "complete", "done")]
    assert history_is_contiguous(runner.store.history(job.id), "a")
    with pytest.raises(InvalidOperation, match="only aborted jobs"):
        runner.retry(job.id)


def test_a_failing_guard_makes_the_job_wait_not_abort(tmp_path: Path) -> None:
    answers = iter(["memory_pressure: available 3% < 5%", "io_wait: 70% > 50%", None])
    seen_errors: list[str | None] = []

    def guard(ctx: StepContext) -> str | None:
        seen_errors.append(ctx.store.get(ctx.job_id).error)
        return next(answers)

    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done", guards=(guard,)))
    job = runner.start("two", "k", {})
    assert job.state == COMPLETE
    assert seen_errors == [None, "waiting: memory_pressure: available 3% < 5%", "waiting: io_wait: 70% > 50%"]
    assert [e.event for e in runner.store.history(job.id)] == ["go", "done"]


def test_a_guard_that_never_passes_leaves_the_job_waiting_for_resume(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done", guards=(lambda ctx: "pool: needs_check",)))
    job = runner.start("two", "k", {})
    assert job.state == "a"
    assert job.error == "waiting: pool: needs_check"
    assert job.owner_pid is None
    assert [j.id for j in runner.resumable_jobs()] == [job.id]


def test_completed_key_returns_at_once_without_running(tmp_path: Path) -> None:
    calls = {"n": 0}

    def counted(ctx: StepContext) -> str:
        calls["n"] += 1
        return "go"

    runner = make_runner(tmp_path, two_step(counted, lambda ctx: "done"))
    first = runner.start("two", "same", {})
    second = runner.start("two", "same", {})
    assert (first.id, second.id, calls["n"]) == (second.id, first.id, 1)


def test_context_saved_with_each_transition_and_intent_first(tmp_path: Path) -> None:
    def a(ctx: StepContext) -> str:
        ctx.data["device_id"] = 7
        ctx.save()  # intent first: on disk before anything is created
        assert runner.store.get(ctx.job_id).context == '{"device_id": 7}'
        return "go"

    runner = make_runner(tmp_path, two_step(a, lambda ctx: "done"))
    job = runner.start("two", "k", {})
    assert job.context == '{"device_id": 7}'


def test_abort_rules(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done"))
    with pytest.raises(JobNotFound, match="job 99 not found"):
        runner.abort(99, "x")
    done = runner.start("two", "done", {})
    with pytest.raises(InvalidOperation, match="complete; only unfinished jobs can be aborted"):
        runner.abort(done.id, "x")
    waiting, _ = runner.store.create_or_get("two", "w", "a", {})
    aborted = runner.abort(waiting.id, "operator said so")
    assert (aborted.state, aborted.error) == (ABORTED, "operator said so")


def test_a_job_owned_by_a_live_process_is_not_touched(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done"))
    job, _ = runner.store.create_or_get("two", "k", "a", {})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with runner.store.transaction() as session:
            session.execute(text("UPDATE jobs SET owner_pid=:p, owner_boot_id=:b, lease_expires_at=datetime('now','+60 seconds') WHERE id=:id"),
                            {"p": holder.pid, "b": runner.owner.boot_id, "id": job.id})
        assert runner.resumable_jobs() == []
        with pytest.raises(JobBusy, match=f"pid {holder.pid}"):
            runner.run(job.id)
        requested = runner.abort(job.id, "stop it")  # recorded, not an error: the owner stops
        assert (requested.state, requested.abort_requested) == ("a", "stop it")
    finally:
        holder.kill()
        holder.wait()
    # Owner dead now: the job is resumable, and the pending abort request is honoured.
    assert [j.id for j in runner.resumable_jobs()] == [job.id]
    assert runner.run(job.id).state == ABORTED


def test_a_live_owner_whose_lease_expired_loses_the_job(tmp_path: Path) -> None:
    """A hung owner (alive, but it stopped renewing its lease) no longer holds the job."""
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done"))
    job, _ = runner.store.create_or_get("two", "k", "a", {})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with runner.store.transaction() as session:
            session.execute(text("UPDATE jobs SET owner_pid=:p, owner_boot_id=:b, lease_expires_at=datetime('now','-1 seconds') WHERE id=:id"),
                            {"p": holder.pid, "b": runner.owner.boot_id, "id": job.id})
        assert [j.id for j in runner.resumable_jobs()] == [job.id]
        assert runner.run(job.id).state == COMPLETE
    finally:
        holder.kill()
        holder.wait()


def test_a_job_owned_by_another_boot_is_resumable(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done"))
    job, _ = runner.store.create_or_get("two", "k", "b", {})
    with runner.store.transaction() as session:
        session.execute(text("UPDATE jobs SET owner_pid=:p, owner_boot_id='old-boot', lease_expires_at=datetime('now','+60 seconds') WHERE id=:id"),
                        {"p": os.getpid(), "id": job.id})
    assert [j.id for j in runner.resumable_jobs()] == [job.id]
    finished = runner.resume_all()
    assert [j.state for j in finished] == [COMPLETE]
    # b resumes at a: the history shows the resume.
    assert [e.event for e in runner.store.history(job.id)][0] == "resume"


def test_reopen_sends_a_complete_job_back_to_its_start_keeping_history(tmp_path: Path) -> None:
    calls = {"a": 0}

    def a(ctx: StepContext) -> str:
        calls["a"] += 1
        return "go"

    runner = make_runner(tmp_path, two_step(a, lambda ctx: "done"))
    job = runner.start("two", "k", {})
    with pytest.raises(InvalidOperation, match="only complete jobs"):
        runner.reopen(runner.store.create_or_get("two", "other", "a", {})[0].id, "x")
    reopened = runner.reopen(job.id, "results gone")
    assert (reopened.state, reopened.error) == ("a", "results gone")
    assert runner.start("two", "k", {}).state == COMPLETE
    assert calls["a"] == 2
    assert [e.event for e in runner.store.history(job.id)] == ["go", "done", "reopen", "go", "done"]
    assert history_is_contiguous(runner.store.history(job.id), "a")


def test_a_shutdown_between_steps_resumes_in_that_state_not_at_its_resume_point(tmp_path: Path) -> None:
    runs = {"a": 0, "b": 0}
    runner_box: list[Runner] = []

    def a(ctx: StepContext) -> str:
        runs["a"] += 1
        runner_box[0].stop_event.set()  # SIGTERM while a runs: the job stops before b begins
        return "go"

    def b(ctx: StepContext) -> str:
        runs["b"] += 1
        return "done"

    workflow = two_step(a, b)  # b's resume point is a: a crash inside b redoes a
    runner = make_runner(tmp_path, workflow)
    runner_box.append(runner)
    job = runner.start("two", "k", {})
    assert job.state == "b" and job.stopped_before_step and runs == {"a": 1, "b": 0}

    restarted = Runner(runner.store, {workflow.name: workflow}, clock=FakeClock())
    job = restarted.run(job.id)
    assert job.state == COMPLETE and not job.stopped_before_step
    assert runs == {"a": 1, "b": 1}, "b had not begun: a must not run again"
    assert [e.event for e in restarted.store.history(job.id)] == ["go", "done"]


def test_a_job_killed_inside_a_step_still_resumes_at_the_resume_point(tmp_path: Path) -> None:
    runs = {"a": 0}

    def a(ctx: StepContext) -> str:
        runs["a"] += 1
        return "go"

    workflow = two_step(a, lambda ctx: "done")
    runner = make_runner(tmp_path, workflow)
    job, _ = runner.store.create_or_get("two", "k", "a", {})
    with runner.store.transaction() as session:  # as a process killed while running b leaves it
        row = session.get(type(job), job.id)
        runner.store.append_transition(session, row, to_state="b", event="go", started_at=row.updated_at, attempt=1)
    job = runner.run(job.id)
    assert job.state == COMPLETE and runs == {"a": 1}
    assert [e.event for e in runner.store.history(job.id)] == ["go", "resume", "go", "done"]


# -- an abort request reaches a waiting job -------------------------------------------------

def abort_after_slices(runner_box: list[Runner], slices: int, reason: str) -> Callable[[int], None]:
    """An on_sleep hook: after `slices` slices of waiting, an operator asks for an abort."""
    def hook(count: int) -> None:
        if count == slices:
            job = runner_box[0].store.list_jobs()[0]
            runner_box[0].store.request_abort(job.id, reason, requested_by_pid=4242)
    return hook


def waiting_runner(tmp_path: Path, workflow: Workflow, slices: int, reason: str) -> tuple[Runner, FakeClock]:
    box: list[Runner] = []
    clock = FakeClock(abort_after_slices(box, slices, reason))
    box.append(make_runner(tmp_path, workflow, clock))
    return box[0], clock


def notes_of(runner: Runner, job_id: int) -> list[tuple[str, str | None, int]]:
    return [(n.kind, n.outcome, n.waits) for n in runner.store.notes(job_id)]


def test_an_abort_request_ends_a_guard_wait_at_the_next_slice(tmp_path: Path) -> None:
    hooked: list[str] = []
    workflow = two_step(lambda ctx: "go", lambda ctx: "done", guards=(lambda ctx: "memory_pressure: 3% < 5%",),
                        on_abort=lambda ctx, reason: hooked.append(reason))
    runner, clock = waiting_runner(tmp_path, workflow, slices=3, reason="operator test")
    job = runner.start("two", "k", {})
    assert (job.state, job.error, job.abort_requested) == (ABORTED, "operator test", None)
    assert hooked == ["operator test"]
    # The first wait (1 s) is slept in slices of 0.25 s; the request after the third ends it.
    assert clock.slices == [0.25, 0.25, 0.25]
    assert [e.event for e in runner.store.history(job.id)] == ["abort"]
    assert notes_of(runner, job.id) == [("abort-request", None, 0), ("guard-wait", "aborted", 1)]
    wait = runner.store.notes(job.id)[1]
    assert (wait.state, wait.event, wait.reasons) == ("a", "go", '["memory_pressure: 3% < 5%"]')
    request = runner.store.notes(job.id)[0]
    assert (request.requested_by_pid, request.reasons, request.state) == (4242, '["operator test"]', "a")


def test_an_abort_request_ends_a_retry_back_off(tmp_path: Path) -> None:
    def failing(ctx: StepContext) -> str:
        raise TransientError("S3 503")

    slow = RetryPolicy(max_attempts=5, initial_wait=4.0, max_wait=30.0, jitter=0.0)
    runner, clock = waiting_runner(tmp_path, two_step(failing, lambda ctx: "done", retry=slow), slices=2,
                                   reason="stop retrying")
    job = runner.start("two", "k", {})
    assert (job.state, job.error) == (ABORTED, "stop retrying")
    assert clock.slices == [0.25, 0.25]
    assert notes_of(runner, job.id) == [("abort-request", None, 0), ("retry-wait", "aborted", 1)]
    assert runner.store.notes(job.id)[1].reasons == '["S3 503"]'


def test_an_abort_request_ends_a_step_not_ready_wait(tmp_path: Path) -> None:
    def not_ready(ctx: StepContext) -> str:
        raise NotReadyError("health check failed before create-device: io_wait: 70% > 50%")

    runner, clock = waiting_runner(tmp_path, two_step(not_ready, lambda ctx: "done"), slices=1, reason="enough")
    job = runner.start("two", "k", {})
    assert (job.state, job.error) == (ABORTED, "enough")
    assert clock.slices == [0.25]
    assert notes_of(runner, job.id) == [("abort-request", None, 0), ("guard-wait", "aborted", 1)]


def test_a_shutdown_ends_a_wait_and_the_job_stays_resumable(tmp_path: Path) -> None:
    box: list[Runner] = []
    clock = FakeClock(lambda count: box[0].stop_event.set() if count == 2 else None)
    box.append(make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done",
                                              guards=(lambda ctx: "pool: needs_check",)), clock))
    job = box[0].start("two", "k", {})
    assert job.state == "a" and job.owner_pid is None and job.waiting_since is None
    assert clock.slices == [0.25, 0.25]
    assert notes_of(box[0], job.id) == [("guard-wait", "stopped", 1)]


def test_one_guard_wait_episode_is_one_row_with_every_reason(tmp_path: Path) -> None:
    answers = iter(["memory_pressure: 3% < 5%", "io_wait: 70% > 50%", "memory_pressure: 3% < 5%", None])
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done", guards=(lambda ctx: next(answers),)))
    job = runner.start("two", "k", {})
    assert job.state == COMPLETE and job.waiting_since is None
    [wait] = runner.store.notes(job.id)
    assert (wait.kind, wait.outcome, wait.waits) == ("guard-wait", "passed", 3)
    assert wait.reasons == '["memory_pressure: 3% < 5%", "io_wait: 70% > 50%"]'
    assert wait.finished_at >= wait.started_at


def test_a_guard_that_never_passes_is_one_episode_left_waiting(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done",
                                            guards=(lambda ctx: "pool: needs_check",)), clock)
    job = runner.start("two", "k", {})
    assert notes_of(runner, job.id) == [("guard-wait", "left waiting", 3)]
    assert sum(clock.slices) == 5.0 and max(clock.slices) == 0.25  # waits 1 + 2 + 2, in slices


def test_a_step_not_ready_with_leave_waiting_is_left_waiting_at_once_and_resumes(tmp_path: Path) -> None:
    """Admission in a CLI command: no wait in this process can help, so none happens; the
    reason is recorded and the next run (fsm resume) tries the step again."""
    room = iter([False, True])

    def admitted(ctx: StepContext) -> str:
        if not next(room):
            raise NotReadyError("pool has no room below its high watermark (85%)", leave_waiting=True)
        return "go"

    clock = FakeClock()
    runner = make_runner(tmp_path, two_step(admitted, lambda ctx: "done"), clock)
    job = runner.start("two", "k", {})
    assert (job.state, job.error, job.owner_pid) == ("a", "waiting: pool has no room below its high watermark (85%)", None)
    assert clock.slices == []  # not one slice slept
    assert notes_of(runner, job.id) == [("guard-wait", "left waiting", 1)]
    assert [j.id for j in runner.resumable_jobs()] == [job.id]
    assert runner.run(job.id).state == COMPLETE


def test_the_describe_hook_is_stored_with_each_transition_from_the_data_the_step_found(tmp_path: Path) -> None:
    def a(ctx: StepContext) -> str:
        ctx.data["item"] = ctx.data.get("item", 0) + 1  # moves on, as the layer loop does
        return "go"

    def describe(state: str, data, event: str | None, after) -> dict[str, object] | None:
        return {"text": f"item {data.get('item', 0)} {event or 'now'}", "state": state}

    workflow = dataclasses.replace(two_step(a, lambda ctx: "done"), describe=describe)
    runner = make_runner(tmp_path, workflow)
    job = runner.start("two", "k", {})
    details = [e.detail for e in runner.store.history(job.id)]
    assert details == ['{"state": "a", "text": "item 0 go"}', '{"state": "b", "text": "item 1 done"}']


def test_a_failing_describe_hook_costs_the_detail_not_the_job(tmp_path: Path) -> None:
    workflow = dataclasses.replace(two_step(lambda ctx: "go", lambda ctx: "done"),
                                   describe=lambda state, data, event, after: 1 / 0)
    runner = make_runner(tmp_path, workflow)
    job = runner.start("two", "k", {})
    assert job.state == COMPLETE and [e.detail for e in runner.store.history(job.id)] == [None, None]


def test_the_operator_events_are_edges_of_the_jobs_machine(tmp_path: Path) -> None:
    from fsm.definition import OperatorEvent
    from fsm.machine import build_machine, fire, transition_table

    workflow = two_step(lambda ctx: "go", lambda ctx: "done")
    edges = {(t["trigger"], t["source"], t["dest"]) for t in transition_table(workflow)}
    assert {(OperatorEvent.ABORT, "a", ABORTED), (OperatorEvent.ABORT, "b", ABORTED),
            (OperatorEvent.RESUME, "b", "a"),  # b resumes at a; a at itself: no edge
            (OperatorEvent.RETRY, ABORTED, "a"), (OperatorEvent.REOPEN, COMPLETE, "a")} <= edges
    assert not any(trigger == OperatorEvent.ABORT and source in (COMPLETE, ABORTED) for trigger, source, _ in edges)
    runner = make_runner(tmp_path, workflow)
    job, _ = runner.store.create_or_get("two", "k", "a", {})
    ctx = runner._context(job)
    model, _ = build_machine(workflow, ABORTED)
    assert not fire(model, OperatorEvent.RETRY, ctx, aborted_from="nowhere")  # its condition holds it
    assert fire(model, OperatorEvent.RETRY, ctx, aborted_from="b") and model.state == "a"


def test_an_abort_request_made_while_a_step_ran_lands_between_steps(tmp_path: Path) -> None:
    """A step that never waits: the request is seen before the next step, from the state the
    job moved to (the machine's), and the job aborts there."""
    runner = make_runner(tmp_path, two_step(lambda ctx: "go", lambda ctx: "done"))

    def a(ctx: StepContext) -> str:
        runner.store.request_abort(ctx.job_id, "asked mid-step", requested_by_pid=1)
        return "go"

    runner.workflows["two"] = two_step(a, lambda ctx: "done")
    job = runner.start("two", "k", {})
    assert (job.state, job.error) == (ABORTED, "asked mid-step")
    assert [(e.from_state, e.to_state, e.event) for e in runner.store.history(job.id)] == [
        ("a", "b", "go"), ("b", ABORTED, "abort")]
