"""How fast the engine persists transitions: durable commits (WAL, synchronous=FULL).

    python -m bench.fsm_transitions [--jobs 50] [--states 10]

Prints persisted transitions per second and the p50/p99 latency of one transition,
measured as the gap between consecutive committed history rows of a job whose steps
do nothing (so the figure is the engine's own cost: claim, attempt, fire, commit).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fsm import RetryPolicy, Runner, StateSpec, TransitionSpec, Workflow
from fsm.database import open_engine
from fsm.store import JobStore
from migrations import upgrade_database


def chain_workflow(length: int) -> Workflow:
    names = [f"s{i}" for i in range(length)]
    states = tuple(StateSpec(n, step=lambda ctx: "next", retry=RetryPolicy(max_attempts=1)) for n in names)
    transitions = tuple(TransitionSpec("next", a, b) for a, b in zip(names, names[1:] + ["complete"]))
    return Workflow(name="bench", initial=names[0], states=states, transitions=transitions)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--states", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="fsm-bench-"))
    db = workdir / "images.db"
    upgrade_database(db)
    workflow = chain_workflow(args.states)
    runner = Runner(JobStore(open_engine(db)), {workflow.name: workflow})
    started = time.perf_counter()
    for n in range(args.jobs):
        runner.start(workflow.name, f"job-{n}", {})
    elapsed = time.perf_counter() - started
    gaps: list[float] = []
    total = 0
    for job in runner.store.list_jobs():
        events = runner.store.history(job.id)
        total += len(events)
        gaps += [(b.finished_at - a.finished_at).total_seconds() * 1000 for a, b in zip(events, events[1:])]
    print(f"database: {db} (WAL, synchronous=FULL, BEGIN IMMEDIATE)")
    print(f"jobs: {args.jobs}  transitions persisted: {total}  wall: {elapsed:.2f}s")
    print(f"transitions/s: {total / elapsed:.0f}")
    print(f"transition latency: p50 {percentile(gaps, 0.50):.2f} ms  p99 {percentile(gaps, 0.99):.2f} ms  "
          f"mean {statistics.mean(gaps):.2f} ms")


if __name__ == "__main__":
    main()
