"""The one way this project runs a subprocess: argument list, timeout, stderr kept.

A kernel tool (dmsetup, losetup, mkfs...) has one owner module, which runs it through
its ErrorTable: the tool's error output is mapped once, there, to an errno that
ToolFailed carries (as containerd's devmapper dmsetup.go does), and callers test
`exc.errno`, never the text.
"""

from __future__ import annotations

import errno as errnos
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


class ToolFailed(CommandFailed):
    """A kernel tool exited non-zero; `errno` is what its owner's ErrorTable read in its
    output (None: nothing it knows). The message is CommandFailed's, unchanged."""

    def __init__(self, result: CommandResult, errno: int | None) -> None:
        super().__init__(result)
        self.errno = errno

    @property
    def reason(self) -> str:
        """The errno's name (`EBUSY`), or `unknown`."""
        return errnos.errorcode.get(self.errno, "unknown") if self.errno is not None else "unknown"


@dataclass(frozen=True)
class ErrorTable:
    """One owner's map from its tools' error output to an errno: (text, errno) rows, the
    first row whose text appears in the output wins (so a text goes before any shorter
    text it contains: "No such device or address" before "No such device")."""

    rows: tuple[tuple[str, int], ...]

    def errno_of(self, output: str) -> int | None:
        """The errno of the first row found in `output`, or None."""
        for text, code in self.rows:
            if text in output:
                return code
        return None

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> CommandResult:
        """run_command(argv); a non-zero exit (when `check`) raises ToolFailed with the errno
        read from its stderr (its stdout when stderr is empty, as CommandFailed shows)."""
        result = run_command(argv, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise self.failure(result)
        return result

    def failure(self, result: CommandResult) -> ToolFailed:
        """The ToolFailed for a finished command (one run with check=False)."""
        return ToolFailed(result, self.errno_of(result.stderr or result.stdout))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (EPERM means it does, owned by someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
