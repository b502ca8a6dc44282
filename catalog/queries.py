"""The operator's pin of an image and delete of a snapshot (the listings are support/reads.py)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from catalog.models import Image, Snapshot, UnpackedImage
from catalog.ledger import DeviceLedger, engine_transactions
from catalog.behind import refuse_if_behind
from catalog.device_records import RecordStore
from catalog.records import rewrite_image_record, set_pinned, snapshots_of_vm
from devices.base import ThinPool
from safeguards.setup import build_cleanup_guard
from support.errors import ManagerError
from support.log import get_logger

log = get_logger("catalog.queries")


def pin_image(engine: Engine, name_or_id: str, *, pinned: bool) -> str:
    """Pin or unpin an image (by name or id); its name."""
    assert engine.url.database, "pin_image needs a file database"
    records = RecordStore(Path(engine.url.database).parent)
    with Session(engine) as session, session.begin():
        image = set_pinned(session, name_or_id, pinned)
        rewrite_image_record(records, image)  # before the commit: the record is never behind the row
        log.info("image pinned" if pinned else "image unpinned", image=image.name, image_id=image.id)
        return image.name


def delete_snapshot(engine: Engine, pool: ThinPool, snapshot_id: int | None = None, *, vm_id: str | None = None,
                    operation: Callable[[str], AbstractContextManager[Any]] | None = None) -> list[str]:
    """Deactivate and delete a snapshot's device, then its row, through the device ledger:
    the snapshot `snapshot_id`, or every snapshot of VM `vm_id`. A hazard leaves the device
    orphaned for gc. The device names deleted, in order.

    The device steps run inside `operation`, by default the cleanup Operation Guard of the
    state dir that holds the database (`<state-dir>/images.db`)."""
    if (snapshot_id is None) == (vm_id is None):
        raise ManagerError("give a snapshot id or --vm VM_ID")
    if operation is None:
        assert engine.url.database, "delete_snapshot needs a file database"
        operation = build_cleanup_guard(Path(engine.url.database).parent)
    ledger = DeviceLedger(pool, engine_transactions(engine))
    refuse_if_behind(engine, ledger.records)
    with Session(engine) as session:
        if vm_id is not None:
            snaps = snapshots_of_vm(session, vm_id)
            if not snaps:
                raise ManagerError(f"VM {vm_id!r} has no snapshot")
        else:
            snap = session.get(Snapshot, snapshot_id)
            if snap is None:
                raise ManagerError(f"snapshot {snapshot_id} not found")
            snaps = [snap]
        targets = [(snap.id, snap.device_id, snap.device_name, snap.image_id) for snap in snaps]
    deleted = []
    for snap_id, device_id, name, image_id in targets:
        with operation("delete-snapshot"):
            ledger.delete(device_id, why="delete-snapshot")
        with Session(engine) as session, session.begin():
            if session.scalars(select(Snapshot.id).where(Snapshot.image_id == image_id)).first() is None:
                session.get(Image, image_id).activation_status = "inactive"
        log.info("snapshot deleted", snapshot_id=snap_id, device_name=name, vm_id=vm_id)
        deleted.append(name)
    return deleted
