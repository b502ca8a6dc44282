"""The one way this project runs a subprocess: argument list, timeout, stderr kept."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from support.errors import HazardError, ManagerError
from support.log import get_logger

log = get_logger("proc")

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class CommandFailed(ManagerError):
    """A command exited non-zero; carries its stderr so the reason reaches the operator."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        detail = (result.stderr or result.stdout).strip().replace("\n", "; ")
        super().__init__(f"{' '.join(result.argv)} exited {result.returncode}: {detail}")


class CommandTimeout(HazardError):
    """A command outlived its timeout: for dmsetup, mkfs and mount that is a kernel hazard."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{' '.join(argv)} timed out after {timeout:g}s{detail}")


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input_text: str | None = None,
) -> CommandResult:
    """Run `argv` (never through a shell) and return its output.

    Raises CommandTimeout when it outlives `timeout` (the child is killed) and
    CommandFailed on a non-zero exit when `check` is true.
    """
    started = time.monotonic()
    try:
        completed = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        log.warning("command timed out", argv=" ".join(argv), timed_out=True, timeout=timeout)
        raise CommandTimeout(argv, timeout, stderr) from None
    except FileNotFoundError:
        raise ManagerError(f"{argv[0]}: command not found") from None
    result = CommandResult(
        argv=tuple(argv),
        returncode=completed.returncode,
        stdout=completed.stdout,
        stderr=completed.stderr,
        seconds=time.monotonic() - started,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result)
    return result


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (EPERM means it does, owned by someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
