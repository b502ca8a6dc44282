"""Kill points on the real workflows, for tests and for bench/crash_campaign.py.

A kill point is a named log event of a real `process-image` or `snapshot` run (JSON log
lines on stderr): a transition into a state, the Operation Guard's `operation started` of a
device operation, a layer's blob fetched or downloaded. `run_until` runs the CLI as a
subprocess and SIGKILLs it when the n-th line matching the point appears, so every kill is
named and shown to have landed where it says (`Kill.hit`, `Kill.event`).

`Campaign` is one state directory (blockfile backend) against one bucket: each trial makes a
fresh small image (or a new VM's snapshot of a completed one), kills it at a point, then
checks what the next start must guarantee (`check_after_kill`): `fsm resume` completes every
job; every device in the pool is named by exactly one row; `gc --dry-run` reports exactly
the devices recorded as orphaned (those in the pool; a record of a device never made is
counted as skipped) and `gc --force` removes exactly those; the snapshot's tree
is the expected one; SQLite's integrity check passes; every job's history is contiguous and
made only of transitions its workflow allows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo.samples import LayerSpec, diff_trees, expected_tree, family_layers, snapshot_tree, write_layer

REPO = Path(__file__).resolve().parents[1]
BACKEND_ENV = {"FLYIO_BACKEND": "blockfile"}
DEVICE_SIZE = "64M"
LAYERS = 3  # a base layer (create_thin + mkfs) and two upper ones (create_snap)
SCALE_MB = 4.0  # golang's shared layers 1-3 at this scale: about 3 MB of tar in all
FOUND_ORPHAN = re.compile(r"Found orphaned device\s+device_id=(\d+)\s")
SUMMARY = re.compile(r"Summary\s+cleaned=(\d+) failed=(\d+) orphaned=(\d+) skipped=(\d+) total_devices=(\d+)")

Event = dict[str, Any]


# --------------------------------------------------------------------------- kill points


@dataclass(frozen=True)
class KillPoint:
    """A log event to kill at; `occurrences` is how often one run of the campaign's image
    (3 layers) or VM snapshot logs it, so a kill can land on an upper layer's instance."""

    name: str
    workflow: str  # "image" or "snapshot": which job the trial runs
    matches: Callable[[Event], bool]
    occurrences: int = 1


def _into(state: str) -> Callable[[Event], bool]:
    return lambda e: e.get("msg") == "transition" and e.get("to_state") == state


def _operation(name: str) -> Callable[[Event], bool]:
    return lambda e: e.get("msg") == "operation started" and e.get("operation") == name


def _message(text: str) -> Callable[[Event], bool]:
    return lambda e: e.get("msg") == text


IMAGE_KILL_POINTS: tuple[KillPoint, ...] = (
    KillPoint("image: into downloading", "image", _into("downloading")),
    KillPoint("image: blob fetched", "image", _message("blob fetched"), LAYERS),
    KillPoint("image: blob downloaded", "image", _message("blob downloaded"), LAYERS),
    KillPoint("image: into verifying", "image", _into("verifying")),
    KillPoint("image: into creating_device", "image", _into("creating_device"), LAYERS),
    KillPoint("image: operation started create-device", "image", _operation("create-device"), LAYERS),
    KillPoint("image: into making_fs", "image", _into("making_fs")),
    KillPoint("image: operation started make-filesystem", "image", _operation("make-filesystem")),
    KillPoint("image: into unpacking", "image", _into("unpacking"), LAYERS),
    KillPoint("image: operation started unpack-image", "image", _operation("unpack-image"), LAYERS),
    KillPoint("image: layer unpacked", "image", _message("layer unpacked"), LAYERS),
    KillPoint("image: into activating", "image", _into("activating")),
    KillPoint("image: into snapshotting", "image", _into("snapshotting")),
    KillPoint("image: operation started snapshot", "image", _operation("snapshot")),
)
SNAPSHOT_KILL_POINTS: tuple[KillPoint, ...] = (
    KillPoint("snapshot: job created", "snapshot", _message("job created")),
    KillPoint("snapshot: into activating", "snapshot", _into("activating")),
    KillPoint("snapshot: into snapshotting", "snapshot", _into("snapshotting")),
    KillPoint("snapshot: operation started snapshot", "snapshot", _operation("snapshot")),
    KillPoint("snapshot: snapshot created", "snapshot", _message("snapshot created")),
    KillPoint("snapshot: snapshot ready", "snapshot", _message("snapshot ready")),
)
KILL_POINTS: dict[str, KillPoint] = {p.name: p for p in IMAGE_KILL_POINTS + SNAPSHOT_KILL_POINTS}


@dataclass(frozen=True)
class Kill:
    """Where one SIGKILL landed: the point, which occurrence of it, and the line itself."""

    point: str
    occurrence: int
    hit: bool  # False: the run ended before the point's n-th occurrence (nothing killed)
    event: Event | None
    returncode: int | None


def manager_argv(state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args]


def manager(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess on the blockfile backend."""
    return subprocess.run(manager_argv(state_dir, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **BACKEND_ENV})


def run_until(state_dir: Path, args: list[str], point: KillPoint | str, occurrence: int = 1,
              timeout: float = 300) -> Kill:
    """Run the CLI with JSON logs and SIGKILL it on the `occurrence`-th line matching
    `point`. The kill is sent as soon as the line is read: it lands right after the event."""
    kill_point = KILL_POINTS[point] if isinstance(point, str) else point
    child = subprocess.Popen(manager_argv(state_dir, "--log-format", "json", *args), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **BACKEND_ENV})
    assert child.stderr is not None
    seen, landed = 0, None
    for line in child.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and kill_point.matches(event):
            seen += 1
            if seen == occurrence:
                child.send_signal(signal.SIGKILL)
                landed = event
                break
    child.stderr.close()
    returncode = child.wait(timeout=timeout)
    return Kill(kill_point.name, occurrence, landed is not None, landed, returncode)


# --------------------------------------------------------------------------- what must hold


def db_rows(state_dir: Path, sql: str, *params: Any) -> list[tuple]:
    with sqlite3.connect(state_dir / "images.db") as db:
        return db.execute(sql, params).fetchall()


def pool_devices(state_dir: Path) -> set[int]:
    """Thin ids of every device in the blockfile pool (the kernel's truth, not the rows)."""
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    return {device.device_id for device in BlockfilePool(PoolConfig(directory=str(state_dir))).list_devices()}


def recorded_orphans(state_dir: Path) -> set[int]:
    return {r[0] for r in db_rows(state_dir, "SELECT device_id FROM orphaned_devices WHERE cleaned_at IS NULL")}


def assert_every_device_named_once(state_dir: Path) -> None:
    """Every device in the pool is named by exactly one row: a live row, or one uncleaned
    orphan record (what gc will clean)."""
    names = [row[0] for row in db_rows(state_dir, "SELECT device_id FROM unpacked_images UNION ALL "
                                                  "SELECT device_id FROM snapshots UNION ALL SELECT device_id FROM "
                                                  "orphaned_devices WHERE cleaned_at IS NULL")]
    assert len(names) == len(set(names)), f"a device named twice: {sorted(names)}"
    assert pool_devices(state_dir) <= set(names), f"unnamed: {pool_devices(state_dir) - set(names)}"


def gc_found(output: str) -> set[int]:
    """The device ids of gc's `Found orphaned device device_id=N` lines."""
    return {int(n) for n in FOUND_ORPHAN.findall(output)}


def assert_gc_removes_exactly_the_orphans(state_dir: Path) -> tuple[int, int]:
    """`gc --dry-run` names exactly the recorded orphans that are in the pool and counts as
    skipped those that are not (a kill between a device row's intent and the kernel call
    leaves a row of a device never made), changing nothing; `gc --force` removes exactly
    the former and marks every record cleaned. Returns (removed, skipped)."""
    orphans, before = recorded_orphans(state_dir), pool_devices(state_dir)
    present, never_made = orphans & before, orphans - before
    dry = manager(state_dir, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert gc_found(dry.stdout) == present, (dry.stdout[-3000:], orphans, before)
    counts = SUMMARY.search(dry.stdout)
    assert counts and counts.group(3, 4) == (str(len(present)), str(len(never_made))), dry.stdout[-2000:]
    assert pool_devices(state_dir) == before and recorded_orphans(state_dir) == orphans
    if not orphans:
        return 0, 0
    force = manager(state_dir, "gc", "--force")
    assert force.returncode == 0, force.stderr[-3000:] + force.stdout[-3000:]
    assert gc_found(force.stdout) == present
    counts = SUMMARY.search(force.stdout)
    assert counts and counts.group(1, 2, 4) == (str(len(present)), "0", str(len(never_made))), force.stdout[-2000:]
    assert pool_devices(state_dir) == before - present
    assert recorded_orphans(state_dir) == set()
    return len(present), len(never_made)


def assert_database_sound(state_dir: Path) -> None:
    """SQLite's integrity check passes; every job's history has no gap and is made only of
    transitions its workflow allows (engine events included)."""
    assert db_rows(state_dir, "PRAGMA integrity_check") == [("ok",)]
    from cli.app import open_store
    from fsm.runner import history_is_contiguous
    from states.registry import all_workflows

    workflows = all_workflows()
    store = open_store(state_dir)
    try:
        for job in store.list_jobs():
            workflow = workflows[job.workflow]
            events = store.history(job.id)
            steps = [(e.seq, e.event, e.from_state, e.to_state) for e in events]
            assert history_is_contiguous(events, workflow.initial), (job.id, steps)
            assert events[-1].to_state == job.state, (job.id, steps)
            allowed = allowed_transitions(workflow)
            aborted_in = None
            for e in events:
                move = (e.event, e.from_state, e.to_state)
                if e.event == "retry":  # back to the resume point of the state it was aborted in
                    assert e.from_state == "aborted" and e.to_state == workflow.resume_point(aborted_in), (job.id, steps)
                else:
                    assert move in allowed, (job.id, move, steps)
                aborted_in = e.from_state if e.event == "abort" else aborted_in
    finally:
        store.engine.dispose()


def allowed_transitions(workflow: Any) -> set[tuple[str, str, str]]:
    """(event, from, to) of the workflow's own transitions and of the engine's events:
    abort from any non-final state, resume to a state's resume point, reopen of a complete job."""
    from fsm.definition import ABORTED, COMPLETE, FINAL_STATES

    moves = {(t.trigger, t.source, t.dest) for t in workflow.transitions}
    for state in workflow.state_names:
        if state in FINAL_STATES:
            continue
        moves.add(("abort", state, ABORTED))
        if workflow.resume_point(state) != state:
            moves.add(("resume", state, workflow.resume_point(state)))
    moves.add(("reopen", COMPLETE, workflow.initial))
    return moves


def tree_of_device(device: str, target: Path) -> dict[str, Any]:
    """The file tree of `device`, mounted read-only (no journal replay) at `target`."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "ro,nodev,nosuid,noload", device, str(target)], check=True, timeout=60,
                   capture_output=True)
    try:
        return snapshot_tree(target)
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60, capture_output=True)


# --------------------------------------------------------------------------- the campaign


@dataclass
class Trial:
    """One kill and what the next start made of it."""

    kill: Kill
    outcome: str  # "resumed", "resumed, N orphan(s) gc'd", or "finished before the kill"
    seconds: float


@dataclass
class Campaign:
    """Trials on one state directory against one bucket (see the module docstring)."""

    state_dir: Path
    work_dir: Path
    s3_client: Any
    bucket: str
    endpoint_url: str
    seed: str = "kill-campaign"
    trials: list[Trial] = field(default_factory=list)
    images: dict[str, list[LayerSpec]] = field(default_factory=dict)  # complete images and their layers
    last_kill: Kill | None = None  # of the trial under way (kept when its checks fail)
    _count: int = 0

    def new_image(self) -> tuple[str, list[LayerSpec]]:
        """A fresh 3-layer image in the bucket: content of its own, so every layer is new
        to the pool (nothing reused) and the kill points inside device creation are reached."""
        self._count += 1
        name = f"k{self._count}"
        layers = family_layers("golang", SCALE_MB, seed=f"{self.seed}-{name}")[:LAYERS]
        for number, spec in enumerate(layers, start=1):
            path = write_layer(spec, self.work_dir / "layers" / name / f"{number}.tar")
            self.s3_client.put_object(Bucket=self.bucket, Key=f"images/{name}/{number}.tar", Body=path.read_bytes())
        return name, layers

    def image_args(self, name: str) -> list[str]:
        return ["process-image", "--image", name, "--bucket", self.bucket, "--endpoint-url", self.endpoint_url,
                "--device-size", DEVICE_SIZE]

    def complete_image(self) -> str:
        """A complete image for a snapshot trial: the last one made, or a new one now."""
        if not self.images:
            name, layers = self.new_image()
            done = manager(self.state_dir, *self.image_args(name))
            assert done.returncode == 0, done.stderr[-3000:]
            self.images[name] = layers
        return next(reversed(self.images))

    def run(self, point: KillPoint | str, occurrence: int = 1) -> Trial:
        """Kill a fresh job at `point` (its `occurrence`-th instance), then check the next start."""
        kill_point = KILL_POINTS[point] if isinstance(point, str) else point
        started = time.monotonic()
        if kill_point.workflow == "image":
            image, layers = self.new_image()
            kill = run_until(self.state_dir, self.image_args(image), kill_point, occurrence)
            self.images[image] = layers
            workflow, key = "image", None
        else:
            image = self.complete_image()
            layers = self.images[image]
            vm = f"vm-{len(self.trials) + 1}"
            size = ["--size", "96M"] if len(self.trials) % 3 == 0 else []
            kill = run_until(self.state_dir, ["snapshot", image, "--vm", vm, *size], kill_point, occurrence)
            workflow, key = "snapshot", vm
        self.last_kill = kill
        removed, skipped = self.check_after_kill(workflow, image, key, layers)
        if not kill.hit:
            outcome = "finished before the kill"
        elif skipped:
            outcome = f"resumed, {skipped} orphan row(s) of a device never made marked by gc"
        else:
            outcome = f"resumed, {removed} orphan(s) gc'd" if removed else "resumed"
        trial = Trial(kill, outcome, time.monotonic() - started)
        self.trials.append(trial)
        return trial

    def check_after_kill(self, workflow: str, image: str, vm: str | None,
                         layers: list[LayerSpec]) -> tuple[int, int]:
        """Everything the next start must guarantee (module docstring); returns what gc did
        (orphans removed, rows of devices never made marked)."""
        resumed = manager(self.state_dir, "fsm", "resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        states = db_rows(self.state_dir, "SELECT id, workflow, state FROM jobs WHERE state != 'complete'")
        assert states == [], (states, resumed.stderr[-3000:])
        assert_every_device_named_once(self.state_dir)
        cleaned = assert_gc_removes_exactly_the_orphans(self.state_dir)
        assert_every_device_named_once(self.state_dir)
        device = self._snapshot_device(workflow, image, vm)
        actual = tree_of_device(device, self.work_dir / "mnt")
        assert diff_trees(expected_tree(layers), actual) == [], (workflow, image, vm)
        assert_database_sound(self.state_dir)
        return cleaned

    def _snapshot_device(self, workflow: str, image: str, vm: str | None) -> str:
        for (context,) in db_rows(self.state_dir, "SELECT context FROM jobs WHERE workflow = ?", workflow):
            data = json.loads(context)
            if data.get("image", {}).get("name") == image and data.get("vm_id") == vm:
                return str(data["snapshot_device"])
        raise AssertionError(f"no {workflow} job for image {image} vm {vm}")


def table(trials: Iterable[Trial]) -> list[tuple[str, int, str]]:
    """(kill point, times hit, outcomes) in the order of KILL_POINTS."""
    hits: dict[str, int] = {}
    outcomes: dict[str, dict[str, int]] = {}
    for trial in trials:
        if trial.kill.hit:
            hits[trial.kill.point] = hits.get(trial.kill.point, 0) + 1
        counts = outcomes.setdefault(trial.kill.point, {})
        kind = ("resumed, orphans gc'd" if "gc'd" in trial.outcome
                else "resumed, never-made orphan rows marked" if "never made" in trial.outcome
                else "FAILED" if trial.outcome.startswith("FAILED") else trial.outcome)
        counts[kind] = counts.get(kind, 0) + 1
    return [(name, hits.get(name, 0), "; ".join(f"{kind} ×{n}" for kind, n in outcomes[name].items()))
            for name in KILL_POINTS if name in outcomes]


def format_table(rows: list[tuple[str, int, str]]) -> str:
    """A markdown table of `table(...)`."""
    lines = ["| kill point | times hit | outcome |", "|---|---|---|"]
    lines += [f"| {name} | {hits} | {outcome} |" for name, hits, outcome in rows]
    return "\n".join(lines)
