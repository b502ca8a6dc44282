"""Image eviction: kubelet's image GC for the thin pool.

Candidates are the complete images that nobody pinned, that have no snapshot (a VM's,
or process-image's first one, which operators hand to a VM too) and that no unfinished job
names, least recently used first (images.last_used_at: the last process-image or snapshot
of it). A snapshot is a VM's disk: a stopped VM starts again on it, so eviction never
deletes one; only `delete-snapshot` does, and an image with a snapshot is listed as kept
with the reason. Evicting an image deletes, through the device ledger, its layer chains'
devices, children before parents, except every chain a kept image or an unfinished job
also uses. The image row stays, `evicted`: processing it again re-creates its devices.

Without `all_images`, eviction stops as soon as pool data usage is below the low
watermark (re-read from the pool after each image). Everything runs inside the Operation
Guard, so never during another job's device step; a device that is mounted, open or held
is never deleted (its image is skipped, nothing of it deleted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from catalog.behind import refuse_if_behind
from catalog.ledger import DeviceInUse, DeviceLedger, engine_transactions
from catalog.models import DeviceState, Image, ImageLayer, Layer, Snapshot, UnpackedImage
from catalog.records import image_job_state, mark_evicted
from devices.base import PoolStatus, ThinPool
from devices.policy import UsagePolicy
from fsm.definition import COMPLETE
from fsm.store import unfinished_contexts
from support.errors import ManagerError
from support.log import get_logger

log = get_logger("catalog.eviction")

Guard = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class JobUses:
    """What an unfinished job may still use: its image (by id once it has one, by source
    before) and the layer chains it found or made (a job between steps may be about to
    reuse a chain it found ready)."""

    image_id: int | None = None
    source: str | None = None
    chain_ids: tuple[str, ...] = ()


# Reads JobUses from an unfinished job's context: the workflows own the context's shape
# (states/data.py job_uses), the catalog only the rule that such images and chains stay.
UsesOf = Callable[[Mapping[str, Any]], JobUses]


@dataclass(frozen=True)
class DeviceToDelete:
    device_id: int
    name: str
    kind: str  # "layer": a candidate has no snapshot, and eviction deletes none
    estimated_bytes: int


@dataclass(frozen=True)
class Candidate:
    """An image that may be evicted and the devices that would go with it, in delete order."""

    image_id: int
    name: str
    last_used_at: datetime | None
    devices: tuple[DeviceToDelete, ...]

    @property
    def estimated_bytes(self) -> int:
        return sum(d.estimated_bytes for d in self.devices)


@dataclass
class EvictionReport:
    dry_run: bool
    policy: UsagePolicy
    before: PoolStatus
    after: PoolStatus | None = None
    evicted: list[Candidate] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # image name -> why it stayed though chosen
    kept: dict[str, str] = field(default_factory=dict)      # image name -> why it is no candidate
    seconds: float = 0.0

    @property
    def estimated_bytes(self) -> int:
        return sum(c.estimated_bytes for c in self.evicted)


# -- planning ------------------------------------------------------------------------------

def _unfinished_job_uses(session: Session, uses_of: UsesOf) -> tuple[set[int], set[str], set[str]]:
    """(image ids, image sources, chain ids) that unfinished jobs may still use."""
    image_ids: set[int] = set()
    sources: set[str] = set()
    chains: set[str] = set()
    for data in unfinished_contexts(session):
        uses = uses_of(data)
        if uses.image_id is not None:
            image_ids.add(uses.image_id)
        if uses.source:
            sources.add(uses.source)
        chains.update(uses.chain_ids)
    return image_ids, sources, chains


def _why_not_candidate(session: Session, image: Image, job_images: set[int], job_sources: set[str]) -> str | None:
    if image.activation_status == "evicted":
        return "already evicted"
    if image.pinned:
        return "pinned"
    if image.id in job_images or image.source in job_sources:
        return "an unfinished job uses it"
    snapshot = session.scalars(select(Snapshot).where(Snapshot.image_id == image.id)
                               .order_by(Snapshot.vm_id.is_(None), Snapshot.id)).first()  # a VM's first
    if snapshot is not None and snapshot.vm_id is not None:
        return f"VM {snapshot.vm_id} has a snapshot of it"
    if snapshot is not None:
        return (f"its snapshot {snapshot.device_name} ({snapshot.state}, process-image's) may be a VM's disk; "
                f"delete-snapshot {snapshot.id} frees it")
    if image_job_state(session, image) != COMPLETE:
        return "not complete"
    return None


def plan_eviction(session: Session, uses_of: UsesOf) -> tuple[list[Candidate], dict[str, str]]:
    """Every candidate, least recently used first, each with the devices it alone holds
    (given that every image before it in the list goes too), and why the rest stay."""
    job_images, job_sources, job_chains = _unfinished_job_uses(session, uses_of)
    images = list(session.scalars(select(Image).order_by(Image.last_used_at.is_not(None), Image.last_used_at,
                                                         Image.id)))
    chains_of = {image.id: [(row.position, row.chain_id, row.digest) for row in session.scalars(
        select(ImageLayer).where(ImageLayer.image_id == image.id).order_by(ImageLayer.position))] for image in images}
    kept: dict[str, str] = {}
    chosen: list[Image] = []
    for image in images:
        why = _why_not_candidate(session, image, job_images, job_sources)
        if why is None:
            chosen.append(image)
        else:
            kept[image.name] = why
    # Chains every image that stays needs; an image going later still counts as staying
    # for the ones before it (eviction may stop early).
    staying = {image.id for image in images if image.name in kept and image.activation_status != "evicted"}
    origins = set(session.scalars(select(Snapshot.origin_device_id)))
    candidates = []
    for index, image in enumerate(chosen):
        still_here = staying | {later.id for later in chosen[index + 1:]}
        needed = {chain for image_id in still_here for _, chain, _ in chains_of.get(image_id, [])} | job_chains
        devices: list[DeviceToDelete] = []
        for _, chain_id, digest in sorted(chains_of.get(image.id, []), reverse=True):  # children first
            row = session.scalars(select(UnpackedImage).where(UnpackedImage.chain_id == chain_id)).first()
            if row is None or chain_id in needed or row.device_id in origins:
                continue
            if row.state != DeviceState.READY:
                continue
            layer = session.get(Layer, digest)
            devices.append(DeviceToDelete(row.device_id, row.device_name, "layer", int(layer.size_bytes) if layer else 0))
        candidates.append(Candidate(image.id, image.name, image.last_used_at, tuple(devices)))
    return candidates, kept


# -- doing it ------------------------------------------------------------------------------

def evict_images(engine: Engine, pool: ThinPool, policy: UsagePolicy, *, uses_of: UsesOf, dry_run: bool = True,
                 all_images: bool = False, operation: Guard | None = None) -> EvictionReport:
    """Evict candidates until data usage is below `policy.low` (all of them with
    `all_images`). A dry run plans with estimates and changes nothing. `uses_of` reads
    what an unfinished job may still use from its context (states.data.job_uses)."""
    started = time.monotonic()
    guard = operation or (lambda _name: nullcontext())
    with guard("evict-images"):
        report = EvictionReport(dry_run=dry_run, policy=policy, before=pool.get_pool_status())
        with Session(engine) as session:
            candidates, report.kept = plan_eviction(session, uses_of)
        if dry_run:
            _simulate(report, candidates, all_images)
        else:
            _evict(engine, pool, report, candidates, all_images, uses_of)
            report.after = pool.get_pool_status()
    report.seconds = time.monotonic() - started
    log.info("image eviction finished" if not dry_run else "image eviction planned (dry run)",
             evicted=len(report.evicted), skipped=len(report.skipped), data_before=f"{report.before.data_used_fraction:.1%}",
             data_after=f"{report.after.data_used_fraction:.1%}" if report.after else "-",
             low_watermark=f"{policy.low:.0%}", seconds=round(report.seconds, 2))
    return report


def _below_low(status: PoolStatus, policy: UsagePolicy) -> bool:
    return status.data_used_fraction < policy.low


def _simulate(report: EvictionReport, candidates: list[Candidate], all_images: bool) -> None:
    status = report.before
    total = status.total_data_blocks * status.data_block_bytes
    used = status.used_data_blocks * status.data_block_bytes
    for candidate in candidates:
        if not all_images and total and used / total < report.policy.low:
            break
        report.evicted.append(candidate)
        used -= candidate.estimated_bytes


def _evict(engine: Engine, pool: ThinPool, report: EvictionReport, candidates: list[Candidate],
           all_images: bool, uses_of: UsesOf) -> None:
    ledger = DeviceLedger(pool, engine_transactions(engine))
    refuse_if_behind(engine, ledger.records)  # the catalog must know every ready device before one is deleted
    for candidate in candidates:
        status = pool.get_pool_status()
        if not all_images and _below_low(status, report.policy):
            break
        # Re-planned for this image now: an earlier image's failure may have kept chains.
        with Session(engine) as session:
            fresh = {c.image_id: c for c in plan_eviction(session, uses_of)[0]}
        current = fresh.get(candidate.image_id)
        if current is None:
            report.skipped[candidate.name] = "no longer a candidate"
            continue
        active = {d.device_id: d.path for d in pool.list_devices() if d.active}
        try:
            _evict_one(engine, ledger, current, active)
        except DeviceInUse as exc:
            report.skipped[current.name] = str(exc)
            log.warning("image not evicted: a device is in use", image=current.name, error=str(exc))
            continue
        except ManagerError as exc:
            report.skipped[current.name] = str(exc)
            log.error("image eviction failed; its devices are left for gc", image=current.name, error=str(exc))
            break  # a device call that failed: the next one is how kernels hang
        after = pool.get_pool_status()
        freed = (status.used_data_blocks - after.used_data_blocks) * after.data_block_bytes
        report.evicted.append(current)
        log.info("image evicted", image=current.name, image_id=current.image_id,
                 last_used_at=str(current.last_used_at), devices=",".join(d.name for d in current.devices),
                 freed_bytes=freed, data_used=f"{after.data_used_fraction:.1%}")


def _evict_one(engine: Engine, ledger: DeviceLedger, candidate: Candidate, active: dict[int, str | None]) -> None:
    """Refuse the whole image if any of its devices is held; else delete them in order."""
    from devices.holders import holders_of

    for device in candidate.devices:
        path = active.get(device.device_id)
        held = holders_of(path) if path else []
        if held:
            raise DeviceInUse(f"{device.name} is in use ({', '.join(held)})")
    for device in candidate.devices:
        ledger.delete_unused(device.device_id, why=f"evict image {candidate.name}",
                             active_path=active.get(device.device_id))
    with Session(engine) as session, session.begin():
        mark_evicted(session, candidate.image_id)
