"""Run a command inside a throwaway QEMU guest whose kernel has device-mapper.

The guest sees the host's whole root read-only (same Python, venv and checkout at the
same paths) and one writable directory, `share_dir`, mounted at the same absolute path.
Whatever must survive the guest (pool files, images.db) lives in the share. Killing
QEMU is a faithful power cut: the guest's loop devices and pool vanish, files stay.

    result = run_in_guest(["dmsetup", "targets"], share_dir=tmp, timeout=120)
    assert result.returncode == 0, result.output
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.vm.assets import GuestAssets, ensure_assets

EXIT_MARKER = "FLYIO-GUEST-EXIT="
SCRIPT_DIR = ".flyio-guest"
GUEST_PATH = "/work/main/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The guest's root is read-only: keep caches and bytecode out of it.
GUEST_ENV = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PATH": GUEST_PATH, "LANG": "C.UTF-8", "TMPDIR": "/tmp",
             "PY_COLORS": "0", "TERM": "dumb"}


@dataclass(frozen=True)
class GuestResult:
    """How a guest run ended. returncode is None when no exit marker was printed
    (timed out, killed, or the guest crashed)."""

    returncode: int | None
    output: str
    timed_out: bool
    seconds: float


def _write_script(share_dir: Path, argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | None) -> Path:
    folder = share_dir / SCRIPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"run-{uuid.uuid4().hex[:8]}.sh"
    lines = ["#!/bin/sh"]
    for key, value in {**GUEST_ENV, **(env or {})}.items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd or os.getcwd())} || exit 125")
    lines.append(" ".join(shlex.quote(a) for a in argv))
    script.write_text("\n".join(lines) + "\n")
    return script


def qemu_command(assets: GuestAssets, share_dir: Path, script: Path, memory_mb: int = 1024) -> list[str]:
    """The QEMU argv real-kernel.md measured: TCG, 2 vCPUs, serial console, two 9p shares."""
    share = str(share_dir.resolve())
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory_mb), "-smp", "2",
        "-nographic", "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
        "-append", f"console=ttyS0 quiet panic=-1 flyio.share={share} flyio.script={script}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=passthrough,multidevs=remap",
    ]


class RunningGuest:
    """A booted (or booting) guest; its console output accumulates in `.output`."""

    def __init__(self, argv: list[str], script: Path) -> None:
        self.script = script
        self.started = time.monotonic()
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        # QEMU is long-running and its console must be read while it runs, so Popen
        # (not support.proc.run_command, which waits for the end).
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(lambda: self.process.stdout.read1(65536), b""):  # type: ignore[union-attr]
            with self._lock:
                self._chunks.append(raw.decode(errors="replace").replace("\r", ""))

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def returncode(self) -> int | None:
        """The guest command's exit code from the marker line, once printed."""
        # Not anchored: the console's escape sequences may precede it on its line.
        found = re.findall(rf"{EXIT_MARKER}(\d+)", self.output)
        return int(found[-1]) if found else None

    def wait(self, timeout: float) -> GuestResult:
        """Wait for QEMU to exit; past `timeout` kill it and report timed_out."""
        timed_out = False
        try:
            self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        self._reader.join(timeout=10)
        self.script.unlink(missing_ok=True)
        return GuestResult(returncode=None if timed_out else self.returncode(), output=self.output,
                           timed_out=timed_out, seconds=time.monotonic() - self.started)

    def kill(self) -> None:
        """SIGKILL QEMU: the guest loses power mid-flight (nothing is flushed or unmounted)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> RunningGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._reader.join(timeout=10)
        self.script.unlink(missing_ok=True)


def start_guest(argv: Sequence[str], *, share_dir: Path | str, env: Mapping[str, str] | None = None,
                cwd: str | None = None, memory_mb: int = 1024) -> RunningGuest:
    """Boot a guest that runs `argv` (chrooted in the host's root, in `cwd`) and powers off."""
    share = Path(share_dir).resolve()
    assets = ensure_assets()
    script = _write_script(share, argv, env, cwd)
    return RunningGuest(qemu_command(assets, share, script, memory_mb), script)


def run_in_guest(argv: Sequence[str], *, share_dir: Path | str | None = None, timeout: float = 300,
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> GuestResult:
    """Boot a guest, run `argv` in it, return its exit code and console output.
    Without `share_dir` a temporary one is used and removed afterwards."""
    if share_dir is None:
        with tempfile.TemporaryDirectory(prefix="flyio-vm-") as tmp:
            return run_in_guest(argv, share_dir=tmp, timeout=timeout, env=env, cwd=cwd)
    with start_guest(argv, share_dir=share_dir, env=env, cwd=cwd) as guest:
        return guest.wait(timeout)
