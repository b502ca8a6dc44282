"""The daemon's durable request spool: one JSON file per submitted request under
`<state-dir>/fsm/requests/`. A request is accepted (and answered) before its S3 objects
are resolved, so it has no job yet; the file is what makes it survive a restart. Once
resolved it names its job, and the job itself (jobs table) is the durable truth."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.protocol import JOB_OPS, REGISTRY_FIELDS, SOURCE_FIELDS
from images.bucket import DEFAULT_BUCKET
from support.sizes import parse_size

QUEUED, RUNNING, WAITING, DONE, FAILED = "queued", "running", "waiting", "done", "failed"
UNFINISHED = (QUEUED, RUNNING, WAITING)


@dataclass
class ImageRequestRecord:
    """One process-image or snapshot request as the daemon received it, and where it stands."""

    id: int
    source: dict[str, str]                  # exactly one of SOURCE_FIELDS -> value (snapshot: {"image": ...})
    bucket: str = DEFAULT_BUCKET
    endpoint_url: str | None = None
    device_size_bytes: int | None = None    # None: the daemon's default (snapshot: the origin's)
    op: str = "process-image"               # one of JOB_OPS
    vm_id: str | None = None                # snapshot: the VM
    state: str = QUEUED
    job_id: int | None = None
    error: str | None = None
    registry: dict[str, Any] | None = None  # a "ref": platform, plain_http, ca_cert, registry_config
    submitted_at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def describe(self) -> str:
        (kind, value), = self.source.items()
        return f"{kind}={value}" if self.op != "snapshot" else f"snapshot {kind}={value} vm={self.vm_id}"


def record_from_message(request_id: int, message: dict[str, Any], default_bucket: str = DEFAULT_BUCKET) -> ImageRequestRecord:
    """Validate a process-image or snapshot message without touching the network
    (ValueError: one line)."""
    op = str(message.get("op") or "process-image")
    if op not in JOB_OPS:
        raise ValueError(f"{op!r} does not queue a job")
    if op == "snapshot":
        if not message.get("image") or not message.get("vm"):
            raise ValueError('a snapshot request needs "image" (name or id) and "vm"')
        return ImageRequestRecord(id=request_id, source={"image": str(message["image"])}, op=op,
                                  vm_id=str(message["vm"]), device_size_bytes=request_size(message.get("size"), "size"))
    given = {name: str(message[name]) for name in SOURCE_FIELDS if message.get(name)}
    if len(given) != 1:
        raise ValueError("give exactly one of s3_key, image, s3_prefix, url or ref")
    registry = {name: message[name] for name in REGISTRY_FIELDS if message.get(name)}
    if registry and "ref" not in given:
        raise ValueError(f"{', '.join(registry)} go with \"ref\" only")
    return ImageRequestRecord(id=request_id, source=given, bucket=str(message.get("bucket") or default_bucket),
                              endpoint_url=message.get("endpoint_url") or None, registry=registry or None,
                              device_size_bytes=request_size(message.get("device_size"), "device_size"))


def request_size(value: Any, name: str) -> int | None:
    """A size field of a request ("8G" or bytes), None when absent; ValueError when bad."""
    if value in (None, ""):
        return None
    if isinstance(value, bool):  # JSON true is not a size, though Python counts it an int
        raise ValueError(f"{name} must be a size, got {value!r}")
    size = parse_size(str(value)) if not isinstance(value, int) else value
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return size


class RequestSpool:
    """Reads and writes request files; ids are allocated under a lock (one daemon per host)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._next_id = max((r.id for r in self.load_all()), default=0) + 1

    def _path(self, request_id: int) -> Path:
        return self.directory / f"{request_id:08d}.json"

    def allocate(self, message: dict[str, Any]) -> ImageRequestRecord:
        """A new record for `message`, saved before it is returned."""
        with self._lock:
            record = record_from_message(self._next_id, message)
            self._next_id += 1
            self.save(record)
        return record

    def save(self, record: ImageRequestRecord) -> None:
        """Atomic replace: a crash leaves the old or the new file, never half of one."""
        path = self._path(record.id)
        tmp = path.with_suffix(f".tmp.{threading.get_ident()}")
        with open(tmp, "w") as fh:
            json.dump(asdict(record), fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def get(self, request_id: int) -> ImageRequestRecord | None:
        try:
            return _load(self._path(request_id))
        except FileNotFoundError:
            return None

    def load_all(self) -> list[ImageRequestRecord]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(_load(path))
            except (OSError, ValueError, TypeError):
                continue  # a stray file is not a request
        return records


def _load(path: Path) -> ImageRequestRecord:
    data = json.loads(path.read_text())
    known = {f.name for f in fields(ImageRequestRecord)}
    return ImageRequestRecord(**{k: v for k, v in data.items() if k in known})
