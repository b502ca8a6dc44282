"""Progress bars for long work on a terminal; silent with --quiet or when not a tty."""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    def advance_to(self, done: int) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def advance_to(self, done: int) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(description: str, total: int | None) -> Progress:
    return _Silent()


class _Bar:
    def __init__(self, description: str, total: int | None) -> None:
        # rich costs ~35 ms to import: only when a bar is drawn, not for every command.
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
        self._task = self._rich.add_task(description, total=total)
        self._rich.start()

    def advance_to(self, done: int) -> None:
        self._rich.update(self._task, completed=done)

    def close(self) -> None:
        self._rich.stop()


def terminal_progress(description: str, total: int | None) -> Progress:
    """A bar on stderr when it is a terminal, nothing otherwise."""
    return _Bar(description, total) if sys.stderr.isatty() else _Silent()
