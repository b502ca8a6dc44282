"""Crash safety for real: a workflow in a subprocess, SIGKILLed after a random number of its
side effects (so each kill lands at a step the effects log names), resumed. The real
workflows' campaign, at named log events, is tests/test_kill_campaign.py."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fsm.definition import COMPLETE, OperatorEvent
from fsm.runner import history_is_contiguous
from tests.engine_workflow import ENGINE_TEST, open_runner

REPO = Path(__file__).resolve().parents[1]
JOBS = 4
TRIALS = 30


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.engine_workflow", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _effect_lines(effects: Path) -> list[str]:
    try:
        return effects.read_text().splitlines()
    except FileNotFoundError:
        return []


def _kill_after_effects(proc: subprocess.Popen[bytes], effects: Path, count: int, timeout: float = 60) -> str | None:
    """SIGKILL `proc` once `count` more side-effect lines are in `effects`; the state of the
    last line written before the kill (where it landed), or None when the run ended first."""
    before = len(_effect_lines(effects))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lines = _effect_lines(effects)
        if len(lines) >= before + count:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return _effect_lines(effects)[-1].split()[1]
        time.sleep(0.002)  # a poll with a deadline
    return None


@pytest.mark.slow
def test_random_sigkills_then_resume_completes_every_job(tmp_path: Path) -> None:
    db, effects = tmp_path / "images.db", tmp_path / "effects.log"
    rng = random.Random(1234)
    landed: list[str] = []  # the state whose side effect was the last one before each kill
    for trial in range(TRIALS):
        proc = _spawn(str(db), str(effects), str(JOBS), f"trial{trial}")
        # Each trial's jobs write ~6 effects each: a kill after 1..20 of them lands inside
        # the run, at a step the log names (not during interpreter start-up).
        where = _kill_after_effects(proc, effects, rng.randint(1, 20))
        if where is not None:
            landed.append(where)
        proc.wait(timeout=30)
    assert len(landed) >= TRIALS // 2, f"the kills must actually interrupt work: {landed}"
    assert len(set(landed)) >= 3, f"kills landed in too few states: {Counter(landed)}"

    final = _spawn(str(db), str(effects), "0")
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()

    runner = open_runner(db)
    jobs = runner.store.list_jobs()
    assert len(jobs) >= TRIALS // 2  # most trials got to create a job before their kill
    lines = Counter(tuple(line.split()) for line in effects.read_text().splitlines())
    for job in jobs:
        assert job.state == COMPLETE, (job.id, job.state, job.error)
        events = runner.store.history(job.id)
        assert history_is_contiguous(events, ENGINE_TEST.initial), [(e.seq, e.from_state, e.to_state) for e in events]
        assert events[-1].to_state == job.state  # no half-recorded transition
        # At least once: every state left by its own event had its side effect done at least
        # as often as the history says the step completed.
        completed = Counter(e.from_state for e in events if e.event not in (OperatorEvent.RESUME, OperatorEvent.RETRY, OperatorEvent.ABORT))
        for state, count in completed.items():
            assert lines[(str(job.id), state)] >= count, (job.id, state)
        assert completed["copying"] == 2  # the loop ran exactly its two rounds in the durable history

    # Every history row belongs to a job, and every job's row state equals its last event.
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = conn.execute("SELECT count(*) FROM job_events WHERE job_id NOT IN (SELECT id FROM jobs)").fetchone()[0]
        assert orphans == 0
    resumed = sum(1 for job in jobs for e in runner.store.history(job.id) if e.event == OperatorEvent.RESUME)
    assert resumed > 0, "some kills must have landed inside a state with a resume point"


def test_two_processes_racing_to_resume_one_job_exactly_one_wins(tmp_path: Path) -> None:
    db, effects = tmp_path / "images.db", tmp_path / "effects.log"
    runner = open_runner(db)
    job, _ = runner.store.create_or_get(ENGINE_TEST.name, "race", ENGINE_TEST.initial,
                                        {"effects": str(effects), "rounds": 2, "max_sleep": 0.5})
    go = tmp_path / "go"
    procs = [_spawn("race", str(db), str(job.id), str(go)) for _ in range(2)]
    for proc in procs:  # both loaded and waiting: the race starts at the same instant under any load
        assert proc.stdout is not None and proc.stdout.readline().decode().strip() == "ready"
    go.touch()
    outputs = sorted(p.communicate(timeout=60)[0].decode().strip() for p in procs)
    assert outputs == ["busy", "won complete"], outputs
    assert runner.store.get(job.id).state == COMPLETE
    events = runner.store.history(job.id)
    assert history_is_contiguous(events, ENGINE_TEST.initial)
    assert Counter(l.split()[1] for l in effects.read_text().splitlines())["pending"] == 1
