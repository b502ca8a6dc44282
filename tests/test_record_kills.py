"""Kill campaign over the device ledger's write order (issue 18): SIGKILL right after each
step a device's life is made of (its record written, its row committed, its kernel call
done), in both workflows and in a delete, then recover the two ways an operator can:

* `fsm resume` (and the delete asked again): every device in the pool is named exactly once,
  and gc deletes no device whose record says ready;
* the database deleted and `rebuild-db`: the same, with the rebuild naming every device that
  has a ready record and listing the rest for gc.

Blockfile backend: real loop devices, mkfs.ext4, XFS pool, SQLite, SeaweedFS."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.killpoints import Campaign, Event, KillPoint, db_rows, manager, pool_devices, run_until
from tests.test_gc import teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")


def _record(state: str) -> Callable[[Event], bool]:
    return lambda e: e.get("msg") == "device record written" and e.get("state") == state


def _row(state: str) -> Callable[[Event], bool]:
    return lambda e: e.get("msg") == "device row committed" and e.get("state") == state


def _kernel(call: str) -> Callable[[Event], bool]:
    return lambda e: e.get("msg") == "device kernel call done" and str(e.get("call", "")).endswith(call)


# (point, occurrence). An image of 3 layers writes 4 `creating` records (3 layers and its
# first snapshot) and 4 `ready` ones; its first create_snap is the second layer's.
LEDGER_POINTS: tuple[tuple[KillPoint, int], ...] = (
    (KillPoint("image: base layer's record written (creating)", "image", _record("creating")), 1),
    (KillPoint("image: upper layer's row committed (creating)", "image", _row("creating")), 2),
    (KillPoint("image: upper layer's create_snap done", "image", _kernel("create_snap")), 1),
    (KillPoint("image: base layer's record written (ready)", "image", _record("ready")), 1),
    (KillPoint("image: top layer's row committed (ready)", "image", _row("ready")), 3),
    (KillPoint("image: first snapshot's record written (ready)", "image", _record("ready")), 4),
    (KillPoint("snapshot: record written (creating)", "snapshot", _record("creating")), 1),
    (KillPoint("snapshot: create_snap done", "snapshot", _kernel("create_snap")), 1),
    (KillPoint("snapshot: row committed (created)", "snapshot", _row("created")), 1),
    (KillPoint("snapshot: record written (ready)", "snapshot", _record("ready")), 1),
    (KillPoint("snapshot: row committed (ready)", "snapshot", _row("ready")), 1),
    (KillPoint("delete: record written (deleting)", "delete", _record("deleting")), 1),
    (KillPoint("delete: row committed (deleting)", "delete", _row("deleting")), 1),
    (KillPoint("delete: kernel delete done", "delete", _kernel("delete")), 1),
    (KillPoint("delete: row committed (removed)", "delete", _row("removed")), 1),
)


@pytest.fixture
def campaign(tmp_path: Path, s3_client: Any, make_bucket: Callable[..., str], s3_server: Any) -> Iterator[Campaign]:
    state_dir = tmp_path / "state"
    try:
        yield Campaign(state_dir, tmp_path, s3_client, make_bucket("record-kills"), s3_server.endpoint_url)
    finally:
        teardown(state_dir)


def ready_records(state_dir: Path) -> set[int]:
    from catalog.device_records import DeviceRecord, RecordStore

    return {i for i, r in RecordStore(state_dir).devices().items() if isinstance(r, DeviceRecord) and r.ready}


def named_by_rows(state_dir: Path) -> list[int]:
    return [row[0] for row in db_rows(state_dir, "SELECT device_id FROM unpacked_images UNION ALL "
                                                 "SELECT device_id FROM snapshots UNION ALL SELECT device_id FROM "
                                                 "orphaned_devices WHERE cleaned_at IS NULL")]


def kill_once(campaign: Campaign, point: KillPoint, occurrence: int, trial: int) -> str:
    """One trial: the job (or delete) killed at `point`. Returns what to ask again, if anything."""
    state_dir = campaign.state_dir
    if point.workflow == "image":
        image, layers = campaign.new_image()
        kill = run_until(state_dir, ["--verbose", *campaign.image_args(image)], point, occurrence)
        campaign.images[image] = layers
    elif point.workflow == "snapshot":
        image = campaign.complete_image()
        kill = run_until(state_dir, ["--verbose", "snapshot", image, "--vm", f"vm-{trial}"], point, occurrence)
    else:
        image = campaign.complete_image()
        made = manager(state_dir, "snapshot", image, "--vm", f"gone-{trial}")
        assert made.returncode == 0, made.stderr[-3000:]
        kill = run_until(state_dir, ["--verbose", "delete-snapshot", "--vm", f"gone-{trial}"], point, occurrence)
    assert kill.hit, f"{point.name} #{occurrence} was never reached"
    return f"gone-{trial}" if point.workflow == "delete" else ""


def gc_deletes_nothing_ready(state_dir: Path) -> None:
    """gc --force removes only devices without a ready record; afterwards every device in the
    pool is named by a row."""
    ready_in_pool = ready_records(state_dir) & pool_devices(state_dir)
    force = manager(state_dir, "gc", "--force")
    assert force.returncode == 0, force.stdout[-3000:] + force.stderr[-2000:]
    assert ready_in_pool <= pool_devices(state_dir), "gc deleted a device whose record says ready"
    assert pool_devices(state_dir) <= set(named_by_rows(state_dir))


def test_kills_in_the_write_order_then_fsm_resume(campaign: Campaign) -> None:
    state_dir = campaign.state_dir
    for trial, (point, occurrence) in enumerate(LEDGER_POINTS):
        again = kill_once(campaign, point, occurrence, trial)
        if again:
            asked = manager(state_dir, "delete-snapshot", "--vm", again)
            assert asked.returncode == 0 or "has no snapshot" in asked.stderr, (point.name, asked.stderr[-2000:])
        resumed = manager(state_dir, "fsm", "resume")
        assert resumed.returncode == 0, (point.name, resumed.stderr[-3000:])
        assert db_rows(state_dir, "SELECT id FROM jobs WHERE state NOT IN ('complete', 'aborted')") == [], point.name
        names = named_by_rows(state_dir)
        assert len(names) == len(set(names)), (point.name, sorted(names))
        assert pool_devices(state_dir) <= set(names), (point.name, pool_devices(state_dir) - set(names))
        gc_deletes_nothing_ready(state_dir)
        # Every ready record is a device the catalog names: nothing for rebuild-db --merge to add.
        merged = manager(state_dir, "rebuild-db", "--merge")
        assert merged.returncode == 0 and "nothing to merge" in merged.stdout, (point.name, merged.stdout)


def test_kills_in_the_write_order_then_the_database_lost_and_rebuilt(campaign: Campaign) -> None:
    state_dir = campaign.state_dir
    for trial, (point, occurrence) in enumerate(LEDGER_POINTS):
        kill_once(campaign, point, occurrence, trial)
        ready_before = ready_records(state_dir) & pool_devices(state_dir)
        for suffix in ("", "-wal", "-shm"):
            (state_dir / f"images.db{suffix}").unlink(missing_ok=True)
        rebuilt = manager(state_dir, "rebuild-db")
        assert rebuilt.returncode == 0, (point.name, rebuilt.stderr[-3000:])
        names = named_by_rows(state_dir)
        left_for_gc = {int(n) for n in re.findall(r"^not named: thin-(\d+) ", rebuilt.stdout, re.MULTILINE)}
        assert len(names) == len(set(names)), (point.name, sorted(names))
        assert set(names) & left_for_gc == set(), point.name
        assert pool_devices(state_dir) == (set(names) & pool_devices(state_dir)) | left_for_gc, (point.name, rebuilt.stdout)
        assert ready_before <= set(names), (point.name, ready_before - set(names))
        gc_deletes_nothing_ready(state_dir)
        # The rebuilt catalog works on: what the interrupted job left is finished or redone.
        resumed = manager(state_dir, "fsm", "resume")
        assert resumed.returncode == 0, (point.name, resumed.stderr[-3000:])
        # Keep a complete image for the next snapshot and delete trials.
        complete = {row[0] for row in db_rows(state_dir, "SELECT name FROM images i JOIN jobs j ON j.id = i.job_id "
                                                         "WHERE j.state = 'complete'")}
        campaign.images = {name: layers for name, layers in campaign.images.items() if name in complete}
