"""alembic: one linear history for every table (the engine's and the catalog's).

`upgrade_database(db_path)` is called at every startup; a file lock beside the database
makes two processes starting at once apply it one after the other.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(db_path: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{db_path}")
    return config


def upgrade_database(db_path: Path, revision: str = "head") -> None:
    """Bring the schema of `db_path` to `revision`, creating the file if needed."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(f"{db_path}.migrate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        command.upgrade(alembic_config(db_path), revision)
    finally:
        os.close(lock_fd)


def downgrade_database(db_path: Path, revision: str = "base") -> None:
    command.downgrade(alembic_config(db_path), revision)
