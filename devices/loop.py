"""Loop devices through losetup: attach, detach, find which loop backs a file."""

from __future__ import annotations

import json
from pathlib import Path

from support.proc import CommandFailed, run_command

LOSETUP_TIMEOUT = 30.0


def attach(path: Path, *, read_only: bool = False) -> str:
    """A new loop device backed by `path`; returns /dev/loopN."""
    argv = ["losetup", "--find", "--show", "--direct-io=off"]
    if read_only:
        argv.append("--read-only")
    return run_command([*argv, str(path)], timeout=LOSETUP_TIMEOUT).stdout.strip()


def detach(device: str) -> None:
    """Detach `device`; already gone is fine."""
    try:
        run_command(["losetup", "--detach", device], timeout=LOSETUP_TIMEOUT)
    except CommandFailed as exc:
        if "No such device" not in str(exc) and "No such file" not in str(exc):
            raise


def list_loops() -> dict[str, str]:
    """Every attached loop device and its backing file."""
    out = run_command(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], timeout=LOSETUP_TIMEOUT).stdout
    if not out.strip():
        return {}
    return {d["name"]: (d.get("back-file") or "").removesuffix(" (deleted)") for d in json.loads(out).get("loopdevices", [])}


def find_backing(path: Path) -> list[str]:
    """The loop devices backed by `path` (normally zero or one)."""
    target = str(Path(path).resolve())
    return sorted(dev for dev, backing in list_loops().items() if backing == target)
