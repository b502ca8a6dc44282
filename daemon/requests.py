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

from daemon.protocol import SOURCE_FIELDS
from states.submit import DEFAULT_BUCKET
from support.sizes import parse_size

QUEUED, RUNNING, WAITING, DONE, FAILED = "queued", "running", "waiting", "done", "failed"
UNFINISHED = (QUEUED, RUNNING, WAITING)


@dataclass
class ImageRequestRecord:
    """One process-image request as the daemon received it, and where it stands."""

    id: int
    source: dict[str, str]                  # exactly one of SOURCE_FIELDS -> value
    bucket: str = DEFAULT_BUCKET
    endpoint_url: str | None = None
    device_size_bytes: int | None = None    # None: the daemon's default
    state: str = QUEUED
    job_id: int | None = None
    error: str | None = None
    submitted_at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def describe(self) -> str:
        (kind, value), = self.source.items()
        return f"{kind}={value}"


def record_from_message(request_id: int, message: dict[str, Any], default_bucket: str = DEFAULT_BUCKET) -> ImageRequestRecord:
    """Validate a process-image message without touching the network (ValueError: one line)."""
    given = {name: str(message[name]) for name in SOURCE_FIELDS if message.get(name)}
    if len(given) != 1:
        raise ValueError("give exactly one of s3_key, image, s3_prefix or url")
    size = message.get("device_size")
    device_size = None
    if size not in (None, ""):
        device_size = parse_size(str(size)) if not isinstance(size, int) else size
        if device_size <= 0:
            raise ValueError(f"device_size must be positive, got {size!r}")
    return ImageRequestRecord(id=request_id, source=given, bucket=str(message.get("bucket") or default_bucket),
                              endpoint_url=message.get("endpoint_url") or None, device_size_bytes=device_size)


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
