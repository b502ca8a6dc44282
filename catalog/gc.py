"""The guide's Garbage Collection Procedure: find the guide's orphans, and (only when
forced) unmount, deactivate and delete them, one at a time.

An orphan is a device the pool lists that neither `unpacked_images` nor `snapshots`
names and that has no record beside the pool saying it was ready: either no record at all
(`orphan=no-record`: made by something else, or before records existed) or a record of an
unfinished intent (`orphan=unfinished-intent`: a create or delete that never finished,
such as an aborted job's device). A device whose record says ready is never deleted here,
whatever the catalog says: an older backup restored, or a lost database, would otherwise
turn a VM's disk into an "orphan". gc lists it as known to the pool and missing from the
catalog, for `rebuild-db --merge`. A cleanup that fails is counted and left alone: the
next step on a device that just failed is how kernels hang, so gc never retries; the
operator reboots and runs gc again.

Counts in the summary:
  total_devices  devices the pool lists
  orphaned       of those, devices no live row names
  cleaned        orphans unmounted, deactivated and deleted (their rows marked cleaned)
  failed         orphans whose cleanup stopped at a step that failed
  skipped        `orphaned_devices` rows whose device is already gone from the pool
                 (marked cleaned when forced; nothing to do on the device)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from catalog.device_records import DeviceRecord, RecordStore, UnreadableRecord
from catalog.ledger import DeviceLedger, engine_transactions
from catalog.records import live_device_names, uncleaned_orphans
from devices.base import DeviceInfo, ThinPool
from devices.mount import MOUNT_TIMEOUT, mounts, unmount
from fsm.store import running_jobs
from support.errors import ManagerError
from support.log import get_logger
from support.proc import CommandTimeout

log = get_logger("catalog.gc")

SOME_FAILED = "Some devices could not be cleaned - manual intervention may be required"
CONSIDER_REBOOT = "Consider rebooting the system if devices are stuck in D-state"
DEACTIVATE_FAILED = "deactivate failed or timed out"  # the guide's Log Analysis pattern
MISSING_FROM_CATALOG = "known to the pool, missing from the catalog: run rebuild-db --merge"
NO_RECORD = "no-record"
UNFINISHED_INTENT = "unfinished-intent"


@dataclass
class GcReport:
    """What one gc run found and did."""

    dry_run: bool
    total_devices: int = 0
    db_records: int = 0
    orphaned: int = 0
    cleaned: int = 0
    failed: int = 0
    skipped: int = 0
    orphans: list[DeviceInfo] = field(default_factory=list)
    orphan_kinds: dict[str, str] = field(default_factory=dict)  # device name -> NO_RECORD | UNFINISHED_INTENT
    missing_from_catalog: list[DeviceRecord] = field(default_factory=list)  # ready records no row names: kept
    unreadable: list[UnreadableRecord] = field(default_factory=list)  # records that do not parse: kept
    stale_records: list[int] = field(default_factory=list)  # unfinished records of devices the pool lacks
    failures: dict[str, str] = field(default_factory=dict)  # device name -> the step's error

    @property
    def ok(self) -> bool:
        return self.failed == 0


def open_read_only(db_path: Path) -> Engine:
    """An engine that can only read `db_path` (SQLite `mode=ro`): a dry run must not change
    the file, not even by checkpointing a WAL a crashed process left behind, which
    closing the last read-write connection would do."""
    return create_engine(f"sqlite:///file:{db_path}?mode=ro&uri=true", connect_args={"timeout": 5})


class GcRefused(ManagerError):
    """gc --force must not run now (jobs running, D-state processes)."""


def refuse_if_jobs_running(engine: Engine) -> None:
    """GcRefused naming the first running job (an unfinished job a live process owns: gc
    --force must not pull devices from under it), if any. The engine says which they are."""
    with Session(engine) as session:
        jobs = running_jobs(session)
    if jobs:
        job = jobs[0]
        raise GcRefused(f"job {job.id} ({job.state}) is being run by pid {job.owner_pid}; "
                        f"stop it before gc --force ({len(jobs)} running job(s))")


def collect_garbage(engine: Engine, pool: ThinPool, *, dry_run: bool = True,
                    operation: Callable[[str], AbstractContextManager[Any]] | None = None,
                    unmount_timeout: float = MOUNT_TIMEOUT) -> GcReport:
    """Steps 1-4 of the guide's procedure, logging its lines. With dry_run nothing is
    written to the database or done to a device. `operation` (the Operation Guard)
    wraps each device's cleanup so it never runs beside another dm-heavy step."""
    report = GcReport(dry_run=dry_run)
    # The pool first, then the database: a job commits a device's row before creating the
    # device (intent first), so any device listed here already has its row when we read
    # the rows; the other order could see a new device without its row and call it orphaned.
    log.info("Step 1: Querying devicemapper for thin devices")
    devices = pool.list_devices()
    report.total_devices = len(devices)
    log.info("Found thin devices in devicemapper", count=report.total_devices)

    log.info("Step 2: Querying database for device records")
    with Session(engine) as session:
        live_names = live_device_names(session)
        uncleaned_rows = {(row.id, row.device_name) for row in uncleaned_orphans(session)}
    report.db_records = len(live_names)
    log.info("Found device records in database", count=report.db_records)

    log.info("Step 3: Identifying orphaned devices")
    records = RecordStore(Path(pool.config.directory))
    _classify(report, [device for device in devices if device.name not in live_names], records)
    report.orphaned = len(report.orphans)
    for device in report.orphans:
        log.warning("Found orphaned device", device_id=device.device_id, device_name=device.name,
                    mounted=device.mounted_at is not None, orphan=report.orphan_kinds[device.name])
    for record in report.missing_from_catalog:
        log.warning(MISSING_FROM_CATALOG, device_id=record.device_id, device_name=record.name, kind=record.kind.value,
                    vm_id=record.vm_id, chain_id=record.chain_id)
    for unreadable in report.unreadable:
        log.warning("device record unreadable; device left alone", device_name=unreadable.name,
                    error=unreadable.error)
    in_pool_ids = {device.device_id for device in devices}
    report.stale_records = [device_id for device_id, record in records.devices().items()
                            if device_id not in in_pool_ids and isinstance(record, DeviceRecord) and not record.ready]
    in_pool = {device.name for device in devices}
    gone_rows = [row_id for row_id, name in uncleaned_rows if name not in in_pool]
    report.skipped = len(gone_rows)

    if dry_run:
        log.info("DRY RUN: Skipping cleanup")
        return report

    log.info("Step 4: Cleaning up orphaned devices")
    guard = operation or (lambda _name: nullcontext())
    ledger = DeviceLedger(pool, engine_transactions(engine))
    for device in report.orphans:
        with guard("gc-cleanup"):
            error = _clean_device(ledger, device, unmount_timeout)
        if error is None:
            report.cleaned += 1
            log.info("Successfully cleaned up orphaned device", device_id=device.device_id, device_name=device.name)
        else:
            report.failed += 1
            report.failures[device.name] = error
    if gone_rows:
        ledger.forget_gone_orphans(gone_rows)
    for device_id in report.stale_records:
        records.remove_device(device_id)  # an intent whose device never came to be, or is gone
    return report


def _classify(report: GcReport, unnamed: list[DeviceInfo], records: RecordStore) -> None:
    """Split devices no row names into the guide's orphans and the ones kept (a ready or
    unreadable record)."""
    for device in unnamed:
        record = records.device(device.device_id)
        if isinstance(record, UnreadableRecord):
            report.unreadable.append(record)
        elif record is not None and record.ready:
            report.missing_from_catalog.append(record)
        else:
            report.orphans.append(device)
            report.orphan_kinds[device.name] = NO_RECORD if record is None else UNFINISHED_INTENT


def _clean_device(ledger: DeviceLedger, device: DeviceInfo, unmount_timeout: float) -> str | None:
    """Unmount (if mounted), deactivate, delete; None on success, else the failed step's
    error. Each step has its own timeout (inside the pool's calls, or `unmount_timeout`)."""
    fields = {"device_id": device.device_id, "device_name": device.name}
    log.info("Attempting to clean up orphaned device", **fields)
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("Step 1: Attempting unmount", lambda: _unmount_all(device, unmount_timeout)),
        ("Step 2: Attempting deactivate", lambda: ledger.deactivate(device.device_id)),
        ("Step 3: Attempting delete from thin pool", lambda: ledger.free_orphan(device.device_id)),
    )
    for message, step in steps:
        log.debug(message, **fields)
        try:
            step()
        except (ManagerError, OSError) as exc:
            timed_out = isinstance(exc, CommandTimeout)
            if step is steps[1][1]:
                log.error(DEACTIVATE_FAILED, timed_out=timed_out, error=str(exc), **fields)
            log.error("failed to clean up orphaned device", step=message.split(":")[0], timed_out=timed_out,
                      error=str(exc), **fields)
            return f"{message.split(': ')[1].lower()}: {exc}"
    return None


def _unmount_all(device: DeviceInfo, timeout: float) -> None:
    """Unmount every mount of the device's block device (it may be mounted twice),
    newest first; not mounted is fine."""
    targets = [m.target for m in mounts() if device.path and m.source == device.path]
    if device.mounted_at and device.mounted_at not in targets:
        targets.append(device.mounted_at)
    for target in reversed(targets):
        unmount(target, timeout=timeout)


def log_summary(report: GcReport) -> None:
    """The guide's closing lines for a dry run, a clean run, or one with failures."""
    if report.missing_from_catalog:
        log.warning("devices known to the pool are missing from the catalog and were kept; run rebuild-db --merge",
                    count=len(report.missing_from_catalog),
                    devices=",".join(record.name for record in report.missing_from_catalog))
    log.info("=== Garbage Collection Summary ===")
    log.info("Summary", cleaned=report.cleaned, failed=report.failed, orphaned=report.orphaned,
             skipped=report.skipped, total_devices=report.total_devices)
    if report.dry_run:
        log.info("DRY RUN complete - no changes were made")
        log.info("Run with --force to actually clean up orphaned devices")
        return
    if report.failed:
        log.warning(SOME_FAILED)
        log.warning(CONSIDER_REBOOT)
        return
    log.info("Garbage collection complete")
