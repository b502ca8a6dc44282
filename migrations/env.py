"""alembic environment: both metadatas, batch mode for SQLite, the project's engine setup."""

from __future__ import annotations

from pathlib import Path

from alembic import context

from catalog.models import CatalogBase
from fsm.database import open_engine
from fsm.models import FsmBase

target_metadata = [FsmBase.metadata, CatalogBase.metadata]


def run_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url and url.startswith("sqlite:///")
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = open_engine(Path(url.removeprefix("sqlite:///")))
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _run(connection: object) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
