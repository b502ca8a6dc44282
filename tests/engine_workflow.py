"""A small workflow for the engine's own tests: each step appends a line to a side-effect
log (an at-least-once effect), sometimes sleeps, so kills land inside and between steps."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from fsm import Runner, StateSpec, StepContext, TransitionSpec, Workflow
from fsm.database import open_engine
from fsm.store import JobStore
from migrations import upgrade_database


def _effect(ctx: StepContext, name: str) -> None:
    # One side effect per step, written with O_APPEND so a kill never leaves half a line.
    line = f"{ctx.job_id} {name}\n".encode()
    fd = os.open(ctx.data["effects"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    time.sleep(random.uniform(0, ctx.data.get("max_sleep", 0.02)))


def _step(name: str, event: str):
    def step(ctx: StepContext) -> str:
        _effect(ctx, name)
        if name == "copying":
            ctx.data["copied"] = ctx.data.get("copied", 0) + 1
        return event
    step.__name__ = f"step_{name}"
    return step


def _has_more_rounds(ctx: StepContext) -> bool:
    return ctx.data.get("copied", 0) < ctx.data.get("rounds", 2)


def _no_more_rounds(ctx: StepContext) -> bool:
    return not _has_more_rounds(ctx)


ENGINE_TEST = Workflow(
    name="enginetest",
    initial="pending",
    states=(
        StateSpec("pending", step=_step("pending", "start")),
        StateSpec("fetching", step=_step("fetching", "fetched")),
        StateSpec("preparing", step=_step("preparing", "prepared")),
        StateSpec("copying", step=_step("copying", "copied"), resume_point="preparing"),
        StateSpec("finishing", step=_step("finishing", "finished")),
    ),
    transitions=(
        TransitionSpec("start", "pending", "fetching"),
        TransitionSpec("fetched", "fetching", "preparing"),
        TransitionSpec("prepared", "preparing", "copying"),
        TransitionSpec("copied", "copying", "preparing", conditions=(_has_more_rounds,)),
        TransitionSpec("copied", "copying", "finishing", conditions=(_no_more_rounds,)),
        TransitionSpec("finished", "finishing", "complete"),
    ),
)


def open_runner(db_path: Path) -> Runner:
    upgrade_database(db_path)
    return Runner(JobStore(open_engine(db_path)), {ENGINE_TEST.name: ENGINE_TEST})


def race(db_path: Path, job_id: int, go_file: Path) -> int:
    """Say "ready", wait for `go_file` to appear, then try to run the job; print who won."""
    runner = open_runner(db_path)
    print("ready", flush=True)
    while not go_file.exists():
        time.sleep(0.001)
    from fsm import JobBusy
    try:
        job = runner.run(job_id)
    except JobBusy:
        print("busy", flush=True)
        return 0
    print(f"won {job.state}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    """`python -m tests.engine_workflow DB EFFECTS JOBS [PREFIX]` : resume, then start JOBS jobs;
    `python -m tests.engine_workflow race DB JOB_ID GO_FILE` : race to run one job."""
    if argv[0] == "race":
        return race(Path(argv[1]), int(argv[2]), Path(argv[3]))
    db_path, effects, jobs = Path(argv[0]), argv[1], int(argv[2])
    prefix = argv[3] if len(argv) > 3 else "job"
    runner = open_runner(db_path)
    runner.resume_all()
    for n in range(jobs):
        runner.start(ENGINE_TEST.name, f"{prefix}-{n}", {"effects": effects, "rounds": 2, "max_sleep": 0.05})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
