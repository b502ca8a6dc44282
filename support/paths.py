"""Where the manager keeps its state: one directory, overridable for tests and demos."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/flyio")
STATE_DIR_ENV = "FLYIO_STATE_DIR"


def resolve_state_dir(option: str | os.PathLike[str] | None = None) -> Path:
    """--state-dir wins, then $FLYIO_STATE_DIR, then /var/lib/flyio."""
    if option:
        return Path(option)
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else DEFAULT_STATE_DIR


def database_path(state_dir: Path) -> Path:
    return state_dir / "images.db"


def lock_path(state_dir: Path) -> Path:
    return state_dir / "fsm" / "flyio-manager.lock"


def blob_dir(state_dir: Path) -> Path:
    return state_dir / "blobs" / "sha256"
