"""The device ledger: the one owner of every thin device's life.

Modelled on containerd's devmapper `PoolDevice`: each change of a device is one call here,
which commits the row's new state *before* the kernel call it announces and the outcome
*after* it. A kernel call that fails moves the device to `orphaned_devices` (recorded,
never cleaned here: gc does that when the host is idle) and the error goes on up. Nothing
else writes a device row's state or calls the pool's create, activate, deactivate or
delete; everything else only reads rows (catalog/records.py).

    (none) --create--> creating --kernel ok--> created
    created --begin_unpack--> unpacking --mark_ready--> ready       (a layer chain's device)
    created --mark_ready--> ready                                  (a VM snapshot)
    ready --delete--> deleting --kernel ok--> (row removed)
    any state --kernel call failed / job aborted--> orphaned (an orphaned_devices row)

A device's size is its row's: every activation reads it from there, so a device made
with one `--device-size` is never activated at another.

Each device also describes itself in a record beside the pool (catalog/device_records.py),
written here alone and always before the row's commit: `creating` with the row's intent,
`ready` before the row says ready, `deleting` before the kernel is asked to delete, and
removed once the device is gone. So the record is never behind the row: a device whose
record says ready is a device someone may need, whatever images.db says.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from catalog.device_records import DeviceKind, DeviceRecord, RecordState, RecordStore
from catalog.models import DeviceState, Image, OrphanedDevice, Snapshot, UnpackedImage
from catalog.records import allocate_device_id, utcnow
from devices.base import DeviceExists, OriginMissing, ThinPool, device_name
from fsm.database import READ_ONLY
from support.errors import HazardError, ManagerError, PermanentError
from support.log import get_logger

log = get_logger("catalog.ledger")
ROW_COMMITTED = "device row committed"  # with the record and kernel lines: the kill points of the write order
T = TypeVar("T")

Transaction = Callable[[], AbstractContextManager[Session]]


class SnapshotTooSmall(PermanentError):
    """A VM snapshot asked for less room than its origin holds."""


class DeviceInUse(ManagerError):
    """A device something holds (mounted, open, under another device): not deleted."""


@dataclass(frozen=True)
class Device:
    """A device as its row records it."""

    device_id: int
    name: str
    kind: DeviceKind
    state: DeviceState
    size_bytes: int
    job_id: int | None


def device_of_row(row: UnpackedImage | Snapshot) -> Device:
    kind = DeviceKind.LAYER if isinstance(row, UnpackedImage) else DeviceKind.SNAPSHOT
    return Device(device_id=row.device_id, name=row.device_name, kind=kind, state=DeviceState(row.state),
                  size_bytes=int(row.size_bytes or 0), job_id=row.job_id)


def record_state(state: DeviceState) -> RecordState:
    """What the device's record says for a row in `state`: only ready and deleting differ
    from the intent (a created or unpacking device is still untrusted)."""
    if state == DeviceState.READY:
        return RecordState.READY
    if state == DeviceState.DELETING:
        return RecordState.DELETING
    return RecordState.CREATING


def record_of_row(session: Session, row: UnpackedImage | Snapshot) -> DeviceRecord:
    """The record describing a device row as it stands in `session`."""
    created = str(row.created_at)
    updated = str(row.updated_at or row.created_at)
    state = record_state(DeviceState(row.state))
    if isinstance(row, UnpackedImage):
        parent = (session.scalars(select(UnpackedImage.device_id).where(UnpackedImage.chain_id == row.parent_chain_id))
                  .first() if row.parent_chain_id else None)
        return DeviceRecord(device_id=row.device_id, kind=DeviceKind.LAYER, state=state, size_bytes=int(row.size_bytes),
                            job_id=row.job_id, created_at=created, updated_at=updated, chain_id=row.chain_id,
                            layer_digest=row.layer_digest, parent_chain_id=row.parent_chain_id,
                            origin_device_id=parent)
    image = session.get(Image, row.image_id)
    return DeviceRecord(device_id=row.device_id, kind=DeviceKind.SNAPSHOT, state=state,
                        size_bytes=int(row.size_bytes or 0), job_id=row.job_id, created_at=created, updated_at=updated,
                        origin_device_id=row.origin_device_id, image_source=image.source if image else None,
                        vm_id=row.vm_id)


def find_device(session: Session, device_id: int) -> Device | None:
    """The live row of `device_id` (layer chain or snapshot), or None."""
    row: UnpackedImage | Snapshot | None = session.scalars(
        select(UnpackedImage).where(UnpackedImage.device_id == device_id)).first()
    if row is None:
        row = session.scalars(select(Snapshot).where(Snapshot.device_id == device_id)).first()
    return device_of_row(row) if row is not None else None


def orphan_device(session: Session, records: RecordStore, *, device_id: int, reason: str,
                  job_id: int | None) -> OrphanedDevice:
    """Move a device from its live row to orphaned_devices, inside the caller's transaction
    (an abort's): recorded, not touched. Its record says so first: a record written ready
    just before a crash took the row's commit with it must not keep gc away from a device
    nobody was ever given."""
    record = records.device(device_id)
    if isinstance(record, DeviceRecord) and record.state != RecordState.ORPHANED:
        records.write_device(replace(record, state=RecordState.ORPHANED, updated_at=str(utcnow())))
    session.execute(delete(UnpackedImage).where(UnpackedImage.device_id == device_id))
    session.execute(delete(Snapshot).where(Snapshot.device_id == device_id))
    row = OrphanedDevice(device_id=device_id, device_name=device_name(device_id), reason=reason, job_id=job_id,
                         detected_at=utcnow())
    session.add(row)
    return row


def engine_transactions(engine: Engine) -> Transaction:
    """Write transactions on `engine`, for a ledger used outside a job (gc, delete-snapshot)."""
    return sessionmaker(engine, expire_on_commit=False).begin


def catalog_transaction(engine: Engine) -> AbstractContextManager[Session]:
    """One write transaction on the catalog outside a job (a command's or the daemon's
    look-up before its job starts): commits on success, rolls back on any error."""
    return engine_transactions(engine)()


def catalog_reading(engine: Engine) -> AbstractContextManager[Session]:
    """A session on the catalog that only reads, outside a job: a deferred transaction,
    which in WAL mode neither waits for a writer nor holds one up (JobStore.reading's kind)."""
    return Session(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


class DeviceLedger:
    """Every device transition, against one pool and one database.

    `transaction` opens one write transaction (a job passes its StepContext's, so its
    context data commits with the row)."""

    def __init__(self, pool: ThinPool, transaction: Transaction, records: RecordStore | None = None) -> None:
        self.pool = pool
        self.transaction = transaction
        self.records = records if records is not None else RecordStore(Path(pool.config.directory))
        # The table of each device this ledger made (a device id is in one or the other):
        # a snapshot's next state changes look in one table, not first in the layers'.
        self._tables: dict[int, type[UnpackedImage] | type[Snapshot]] = {}

    # -- creating ------------------------------------------------------------------------

    def create_layer_device(self, *, chain_id: str, layer_digest: str, parent_chain_id: str | None,
                            size_bytes: int, job_id: int) -> Device:
        """The device of a layer chain: a fresh thin device of `size_bytes` for the base
        layer; for an upper one a thin snapshot of the parent chain's device, at the
        parent's size (the chain's size stands, whatever this job asked for)."""
        with self.transaction() as session:
            parent = _ready_chain_device(session, parent_chain_id) if parent_chain_id else None
            size = parent.size_bytes if parent is not None else size_bytes
            device_id = self._allocate(session)
            now = utcnow()
            row = UnpackedImage(chain_id=chain_id, layer_digest=layer_digest, parent_chain_id=parent_chain_id,
                                device_id=device_id, device_name=device_name(device_id), size_bytes=size,
                                state=DeviceState.CREATING, job_id=job_id, created_at=now, updated_at=now)
            session.add(row)
            self._record(session, row)
        log.debug(ROW_COMMITTED, device_name=device_name(device_id), state=DeviceState.CREATING.value)
        if parent is None:
            self._kernel(device_id, job_id, "create_thin", lambda: self.pool.create_thin(device_id, size))
        else:
            self._kernel(device_id, job_id, "create_snap",
                         lambda: self.pool.create_snapshot(device_id, parent.device_id))
        return self._set_state(device_id, DeviceState.CREATED)

    def create_vm_snapshot(self, *, image_id: int, origin: Device, vm_id: str | None, size_bytes: int,
                           job_id: int) -> Device:
        """A writable snapshot of an image's top layer device for one VM (None: the image's
        first snapshot, made by process-image), of `size_bytes` (not below the origin's)."""
        if size_bytes < origin.size_bytes:
            raise SnapshotTooSmall(f"snapshot size {size_bytes} bytes is below its origin {origin.name}'s "
                                   f"{origin.size_bytes} bytes")
        with self.transaction() as session:
            device_id = self._allocate(session)
            now = utcnow()
            row = Snapshot(image_id=image_id, origin_device_id=origin.device_id, device_id=device_id,
                           device_name=device_name(device_id), state=DeviceState.CREATING, vm_id=vm_id,
                           size_bytes=size_bytes, job_id=job_id, created_at=now, updated_at=now)
            session.add(row)
            self._record(session, row)
        self._tables[device_id] = Snapshot
        log.debug(ROW_COMMITTED, device_name=device_name(device_id), state=DeviceState.CREATING.value)
        self._kernel(device_id, job_id, "create_snap", lambda: self.pool.create_snapshot(device_id, origin.device_id))
        return self._set_state(device_id, DeviceState.CREATED)

    # -- using ---------------------------------------------------------------------------

    def activate(self, device: int | Device) -> str:
        """Map the device at its row's size; its block device path. Activation is not a
        state of the row: a failure raises and changes nothing (a job's abort then records
        its unfinished devices; a ready device stays ready for the operator to look at).
        Given the Device this ledger just returned, its row is not read again."""
        known = device if isinstance(device, Device) else self._get(device)
        return self.pool.activate(known.device_id, known.size_bytes)

    def activate_all(self, devices: list[Device]) -> dict[int, str | ManagerError]:
        """`activate` of each device (as this ledger or its caller read it), in one call to
        the pool: each one's path, or the error that refused it."""
        return self.pool.activate_all([(device.device_id, device.size_bytes) for device in devices])

    def deactivate(self, device_id: int) -> None:
        """Unmap the device (its data stays). A failure is left to the caller: the device
        stays where it is, named by its row (or by none, for gc's orphans)."""
        self.pool.deactivate(device_id)

    def begin_unpack(self, device_id: int) -> Device:
        """A layer's contents are about to be written: until mark_ready they are not trusted."""
        return self._set_state(device_id, DeviceState.UNPACKING)

    def mark_ready(self, device_id: int) -> Device:
        return self._set_state(device_id, DeviceState.READY)

    def orphan(self, device_id: int, *, reason: str, job_id: int | None) -> None:
        """Give up on a device: recorded for gc, not touched."""
        with self.transaction() as session:
            orphan_device(session, self.records, device_id=device_id, reason=reason, job_id=job_id)

    # -- deleting ------------------------------------------------------------------------

    def delete(self, device_id: int, *, why: str) -> None:
        """Deactivate and delete a live device, then its row. A deactivate the kernel
        refuses (the device is mounted or held open) leaves it as it was; one that fails
        or hangs, or a failed delete, leaves it orphaned for gc; both raise."""
        device = self._get(device_id)
        self._set_state(device_id, DeviceState.DELETING)
        try:
            self.pool.deactivate(device_id)
        except HazardError as exc:
            self.orphan(device_id, reason=f"{why}: deactivate failed: {exc}", job_id=device.job_id)
            raise
        except ManagerError:
            # Refused, not broken (mounted, held open): the device is as it was.
            self._set_state(device_id, device.state)
            raise
        self._kernel(device_id, device.job_id, f"{why}: delete", lambda: self.pool.delete(device_id))
        with self.transaction() as session:
            session.execute(delete(UnpackedImage).where(UnpackedImage.device_id == device_id))
            session.execute(delete(Snapshot).where(Snapshot.device_id == device_id))
        log.debug(ROW_COMMITTED, device_name=device.name, state="removed")
        self.records.remove_device(device_id)
        log.debug("device record removed", device_name=device.name)
        log.info("device deleted", device_name=device.name, kind=device.kind.value, reason=why)

    def delete_unused(self, device_id: int, *, why: str, active_path: str | None) -> None:
        """`delete`, for a device nobody should be using (an evicted image's): refused with
        DeviceInUse, nothing changed, when it is mounted, open or held by another device.
        `active_path` is its block device when active (None: inactive, nothing can hold it)."""
        from devices.holders import holders_of

        held = holders_of(active_path) if active_path else []
        if held:
            raise DeviceInUse(f"{device_name(device_id)} is in use ({', '.join(held)}); not deleted")
        self.delete(device_id, why=why)

    def free_orphan(self, device_id: int) -> None:
        """Delete a device no live row names (gc, after unmount and deactivate), and mark
        its orphaned_devices rows cleaned. A failure raises; nothing is recorded."""
        self.pool.delete(device_id)
        self.records.remove_device(device_id)
        with self.transaction() as session:
            session.execute(update(OrphanedDevice).where(OrphanedDevice.device_name == device_name(device_id),
                                                         OrphanedDevice.cleaned_at.is_(None))
                            .values(cleaned_at=utcnow()))

    def forget_gone_orphans(self, row_ids: list[int]) -> None:
        """Mark cleaned the orphaned_devices rows whose device the pool no longer holds."""
        with self.transaction() as session:
            session.execute(update(OrphanedDevice).where(OrphanedDevice.id.in_(row_ids),
                                                         OrphanedDevice.cleaned_at.is_(None))
                            .values(cleaned_at=utcnow()))

    def describe_existing_devices(self) -> int:
        """Write a record for every device row that has none (a catalog from before devices
        described themselves); how many were written."""
        written = 0
        with self.transaction() as session:
            rows: list[UnpackedImage | Snapshot] = [*session.scalars(select(UnpackedImage)),
                                                    *session.scalars(select(Snapshot))]
            for row in rows:
                if not self.records.has_device(row.device_id):
                    self._record(session, row)
                    written += 1
        return written

    # -- the one pattern -------------------------------------------------------------------

    def _kernel(self, device_id: int, job_id: int | None, what: str, call: Callable[[], T]) -> T:
        """Run one kernel call on a device whose row already says what is being tried; on
        any failure the device becomes an orphan (its state is unknown) and the error is
        raised as it was."""
        try:
            result = call()
            log.debug("device kernel call done", device_name=device_name(device_id), call=what)
            return result
        except (DeviceExists, OriginMissing):
            # Nothing was made: the id is taken by a device this ledger did not make (no
            # record named it when it was allocated), or the origin is not in the pool. Not
            # ours to orphan: our intent goes, and a device that is there stays as it is.
            self._forget_intent(device_id)
            raise
        except BaseException as exc:
            reason = f"{what} failed: {exc}" if str(exc) else f"{what} interrupted ({type(exc).__name__})"
            if isinstance(exc, Exception):
                self.orphan(device_id, reason=reason, job_id=job_id)
                log.error("device left for gc", device_name=device_name(device_id), step=what, error=str(exc))
            raise

    def _allocate(self, session: Session) -> int:
        """A thin id no row and no record has used: after an older backup was restored the
        counter may be behind devices that describe themselves (`rebuild-db --merge`)."""
        device_id = allocate_device_id(session)
        while self.records.has_device(device_id):
            device_id = allocate_device_id(session)
        return device_id

    def _record(self, session: Session, row: UnpackedImage | Snapshot) -> None:
        """Write the device's record as `row` stands, before the caller's transaction commits."""
        session.flush()
        record = record_of_row(session, row)
        self.records.write_device(record)
        log.debug("device record written", device_name=record.name, state=record.state.value)

    def _forget_intent(self, device_id: int) -> None:
        with self.transaction() as session:
            session.execute(delete(UnpackedImage).where(UnpackedImage.device_id == device_id))
            session.execute(delete(Snapshot).where(Snapshot.device_id == device_id))
        self.records.remove_device(device_id)

    def _set_state(self, device_id: int, state: DeviceState) -> Device:
        with self.transaction() as session:
            row: UnpackedImage | Snapshot | None = None
            if self._tables.get(device_id) is not Snapshot:
                row = session.scalars(select(UnpackedImage).where(UnpackedImage.device_id == device_id)).first()
            if row is None:
                row = session.scalars(select(Snapshot).where(Snapshot.device_id == device_id)).one()
            changes_record = record_state(DeviceState(row.state)) != record_state(state)
            row.state = state
            row.updated_at = utcnow()
            if changes_record:
                self._record(session, row)  # the record first: it is never behind the row
            session.flush()
            device = device_of_row(row)
        log.debug(ROW_COMMITTED, device_name=device.name, state=state.value)
        return device

    def _get(self, device_id: int) -> Device:
        with self.transaction() as session:
            device = find_device(session, device_id)
        if device is None:
            raise LookupError(f"no row names {device_name(device_id)}")
        return device


def _ready_chain_device(session: Session, chain_id: str) -> Device:
    row = session.scalars(select(UnpackedImage).where(UnpackedImage.chain_id == chain_id)).first()
    if row is None or row.state != DeviceState.READY:
        raise ManagerError(f"parent layer chain {chain_id} has no ready device")
    return device_of_row(row)
