"""The device ledger on a real blockfile pool and a real SQLite file: the row's state is
written before each kernel call and its outcome after; a failed call leaves an orphan
record and no device that no row names; delete goes through `deleting` to no row."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_process_image import teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and the XFS pool")
MB = 1024**2
CHAIN = "sha256:" + "c" * 64


class RecordingPool:
    """The real pool, with each call noted together with the device row's state at that
    moment (read from the database file by another connection), to show intent first."""

    def __init__(self, pool: Any, db: Path) -> None:
        self.pool, self.db, self.calls = pool, db, []
        self.fail_on: str | None = None

    def _row_state(self, device_id: int) -> str | None:
        with sqlite3.connect(self.db) as conn:
            row = conn.execute("SELECT state FROM unpacked_images WHERE device_id=? UNION ALL "
                               "SELECT state FROM snapshots WHERE device_id=?", (device_id, device_id)).fetchone()
        return row[0] if row else None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.pool, name)
        if name not in ("create_thin", "create_snapshot", "activate", "deactivate", "delete"):
            return method

        def call(device_id: int, *args: Any) -> Any:
            self.calls.append((name, device_id, self._row_state(device_id)))
            if self.fail_on == name:
                raise OSError(5, "Input/output error")
            return method(device_id, *args)

        return call


@pytest.fixture
def ledger_env(tmp_path: Path) -> Iterator[tuple[Any, RecordingPool, Path]]:
    from catalog.ledger import DeviceLedger, engine_transactions
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool
    from fsm.database import open_engine
    from migrations import upgrade_database

    state_dir = tmp_path / "state"
    db = state_dir / "images.db"
    upgrade_database(db)
    pool = BlockfilePool(PoolConfig(directory=str(state_dir), data_size_bytes=512 * MB))
    pool.ensure_pool_exists()
    recording = RecordingPool(pool, db)
    engine = open_engine(db)
    try:
        yield DeviceLedger(recording, engine_transactions(engine)), recording, db  # type: ignore[arg-type]
    finally:
        engine.dispose()
        teardown(state_dir)


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_each_kernel_call_is_announced_by_the_row_and_sizes_come_from_it(ledger_env: Any) -> None:
    ledger, pool, db = ledger_env
    base = ledger.create_layer_device(chain_id=CHAIN, layer_digest=CHAIN, parent_chain_id=None,
                                      size_bytes=64 * MB, job_id=7)
    assert (base.state, base.size_bytes) == ("created", 64 * MB)
    assert pool.calls == [("create_thin", base.device_id, "creating")]
    ledger.activate(base.device_id)
    ledger.begin_unpack(base.device_id)
    ledger.deactivate(base.device_id)
    ledger.mark_ready(base.device_id)
    # An upper layer asked at another size keeps its parent's: the chain's size stands.
    upper = ledger.create_layer_device(chain_id=CHAIN[:-1] + "d", layer_digest=CHAIN, parent_chain_id=CHAIN,
                                       size_bytes=32 * MB, job_id=7)
    assert upper.size_bytes == 64 * MB and pool.calls[-1] == ("create_snapshot", upper.device_id, "creating")
    path = ledger.activate(upper.device_id)
    assert Path(path).exists() and os.path.getsize(pool.pool._file(upper.device_id)) == 64 * MB
    assert pool.calls[-1][0] == "activate"

    ledger.deactivate(upper.device_id)
    ledger.delete(upper.device_id, why="test")
    assert pool.calls[-2:] == [("deactivate", upper.device_id, "deleting"), ("delete", upper.device_id, "deleting")]
    assert rows(db, f"SELECT count(*) FROM unpacked_images WHERE device_id={upper.device_id}") == [(0,)]
    assert {d.device_id for d in pool.pool.list_devices()} == {base.device_id}


def test_a_failed_kernel_call_leaves_an_orphan_record_not_an_unnamed_device(ledger_env: Any) -> None:
    from catalog.ledger import SnapshotTooSmall

    ledger, pool, db = ledger_env
    pool.fail_on = "create_thin"
    with pytest.raises(OSError):
        ledger.create_layer_device(chain_id=CHAIN, layer_digest=CHAIN, parent_chain_id=None, size_bytes=64 * MB,
                                   job_id=3)
    assert rows(db, "SELECT count(*) FROM unpacked_images") == [(0,)]
    orphans = rows(db, "SELECT device_name, job_id, reason FROM orphaned_devices")
    assert len(orphans) == 1 and orphans[0][1] == 3 and orphans[0][2].startswith("create_thin failed")

    pool.fail_on = None
    base = ledger.create_layer_device(chain_id=CHAIN, layer_digest=CHAIN, parent_chain_id=None, size_bytes=64 * MB,
                                      job_id=3)
    ledger.mark_ready(base.device_id)
    with pytest.raises(SnapshotTooSmall):  # refused before any row or device
        ledger.create_vm_snapshot(image_id=1, origin=base, vm_id="vm", size_bytes=32 * MB, job_id=3)
    assert rows(db, "SELECT count(*) FROM snapshots") == [(0,)]

    pool.fail_on = "delete"
    with pytest.raises(OSError):
        ledger.delete(base.device_id, why="delete-snapshot")
    assert rows(db, "SELECT count(*) FROM unpacked_images") == [(0,)]
    reasons = [r for (r,) in rows(db, "SELECT reason FROM orphaned_devices ORDER BY id")]
    assert reasons[-1].startswith("delete-snapshot: delete failed")
    # The device is still in the pool, named by its orphan record: gc's to clean.
    assert base.device_id in {d.device_id for d in pool.pool.list_devices()}
    pool.fail_on = None
    ledger.free_orphan(base.device_id)
    assert rows(db, f"SELECT count(*) FROM orphaned_devices WHERE device_id={base.device_id} "
                    "AND cleaned_at IS NULL") == [(0,)]
    assert base.device_id not in {d.device_id for d in pool.pool.list_devices()}
