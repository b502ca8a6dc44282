"""After a reboot or a power cut: the catalog reconciled with the pool that came back.

`ensure_pool` is how every command that uses the pool gets it. When the pool was missing
(created, or re-attached to its existing files) it compares the catalog with what the pool
holds, and changes nothing it cannot undo:

* a ready snapshot (a VM's disk) whose device is in the pool but inactive is activated
  again, as it was before the cut; layer devices stay inactive until a job needs them;
* a row whose device the pool does not hold is reported (the guide's database cleanup,
  or a pool rebuilt from scratch, explains it; the operator decides);
* a device the pool holds that no row names is reported as an orphan for gc, unless its
  record beside the pool says it is ready: then the catalog is behind the pool
  (`rebuild-db --merge`), and gc will not touch it either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from catalog.device_records import DeviceRecord
from catalog.gc import MISSING_FROM_CATALOG
from catalog.ledger import DeviceLedger, device_of_row, engine_transactions
from catalog.models import DeviceState, OrphanedDevice, Snapshot, UnpackedImage
from catalog.records import ORPHAN_HINT
from devices.base import PoolStatus, ThinPool
from support.errors import ManagerError
from support.log import get_logger

log = get_logger("catalog.reconcile")


@dataclass
class Reconciliation:
    """What one reconciliation found and did, by device name."""

    reactivated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # rows whose device the pool lacks
    unnamed: list[str] = field(default_factory=list)  # devices no row names and no ready record describes
    missing_from_catalog: list[str] = field(default_factory=list)  # ready records no row names: rebuild-db --merge
    failed: dict[str, str] = field(default_factory=dict)  # re-activations that failed


def ensure_pool(pool: ThinPool, engine: Engine) -> PoolStatus:
    """The pool, created or re-attached when missing; after that, the catalog reconciled."""
    existed = pool.get_pool_status().exists
    status = pool.ensure_pool_exists()
    if not existed:
        reconcile(pool, engine)
    return status


def reconcile(pool: ThinPool, engine: Engine) -> Reconciliation:
    """Compare rows with the pool's devices; re-activate ready snapshots; report the rest."""
    started = time.monotonic()
    result = Reconciliation()
    devices = {device.device_id: device for device in pool.list_devices()}
    with Session(engine) as session:
        layers = session.execute(select(UnpackedImage.device_id, UnpackedImage.device_name,
                                        UnpackedImage.state)).all()
        snapshots = list(session.scalars(select(Snapshot)))
        orphans = set(session.scalars(select(OrphanedDevice.device_id).where(OrphanedDevice.cleaned_at.is_(None))))
    named = {row.device_id for row in layers} | {row.device_id for row in snapshots} | orphans
    for row in (*layers, *snapshots):
        if row.state == DeviceState.READY and row.device_id not in devices:
            result.missing.append(row.device_name)
            log.warning("device recorded in the database is missing from the pool", device_name=row.device_name)
    ledger = DeviceLedger(pool, engine_transactions(engine))
    inactive = [device_of_row(row) for row in snapshots  # the rows read above: not read again per device
                if row.state == DeviceState.READY and row.device_id in devices and not devices[row.device_id].active]
    paths = ledger.activate_all(inactive)
    for snapshot in inactive:
        path = paths[snapshot.device_id]
        if isinstance(path, ManagerError):
            result.failed[snapshot.name] = str(path)
            log.error("could not re-activate snapshot", device_name=snapshot.name, error=str(path))
            continue
        result.reactivated.append(snapshot.name)
        log.info("snapshot re-activated", device_name=snapshot.name, device=path)
    for device_id, device in sorted(devices.items()):
        if device_id in named:
            continue
        record = ledger.records.device(device_id)
        if isinstance(record, DeviceRecord) and record.ready:
            result.missing_from_catalog.append(device.name)
            log.warning(MISSING_FROM_CATALOG, device_id=device_id, device_name=device.name)
            continue
        result.unnamed.append(device.name)
        log.warning(ORPHAN_HINT, device_id=device_id, device_name=device.name, reason="no row names it")
    log.info("catalog reconciled with the pool", devices=len(devices), reactivated=len(result.reactivated),
             missing=len(result.missing), unnamed=len(result.unnamed), failed=len(result.failed),
             duration_ms=int((time.monotonic() - started) * 1000))
    return result
