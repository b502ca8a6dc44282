"""Is the catalog behind its pool? Devices describe themselves in records beside the pool
(catalog/device_records.py); a ready record the catalog does not know means images.db is
older than the pool (an older backup restored, or a new database), and a command that
changes devices must not act on that view. `rebuild-db --merge` (states/rebuild.py) mends it.
"""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from catalog.device_records import DeviceRecord, RecordStore
from catalog.models import DeviceIdCounter, Snapshot, UnpackedImage
from catalog.records import FIRST_DEVICE_ID
from support.errors import ManagerError

MERGE_HINT = "run `flyio-image-manager rebuild-db --merge`"


class CatalogBehind(ManagerError):
    """Devices recorded beside the pool as ready are newer than images.db."""


def catalog_behind(session: Session, records: RecordStore) -> list[DeviceRecord]:
    """Ready device records newer than the catalog: ids at or past its id counter, which only
    a later catalog could have handed out (an older backup restored, or a new database).
    Costs one directory listing, and a read of each such record."""
    counter = session.get(DeviceIdCounter, 1)
    next_id = counter.next_device_id if counter is not None else FIRST_DEVICE_ID
    newer = []
    for device_id in records.device_ids():
        if device_id < next_id:
            continue
        record = records.device(device_id)
        if isinstance(record, DeviceRecord) and record.ready:
            newer.append(record)
    return newer


def refuse_if_behind(engine: Engine, records: RecordStore) -> None:
    """CatalogBehind (one line naming rebuild-db --merge) when devices recorded as ready are
    newer than the catalog: a command that changes devices must not act on an older view."""
    with Session(engine) as session:
        newer = catalog_behind(session, records)
    if newer:
        raise CatalogBehind(behind_message(newer))


def behind_message(newer: list[DeviceRecord]) -> str:
    names = ", ".join(record.name for record in newer[:5]) + (", ..." if len(newer) > 5 else "")
    return (f"the catalog is behind the pool: {len(newer)} ready device(s) recorded beside the pool are missing "
            f"from images.db ({names}; an older backup restored, or a new database?); {MERGE_HINT}")


def missing_from_catalog(session: Session, records: RecordStore) -> list[DeviceRecord]:
    """Every ready device record that no row names (check-db's full comparison)."""
    named = set(session.scalars(select(UnpackedImage.device_id))) | set(session.scalars(select(Snapshot.device_id)))
    return [record for record in records.devices().values()
            if isinstance(record, DeviceRecord) and record.ready and record.device_id not in named]


