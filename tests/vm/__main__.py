"""`python -m tests.vm [--timeout S] [--share DIR] -- CMD...`: run CMD in a dm-thin guest.
`python -m tests.vm --assets-only`: fetch (or find cached) the guest's kernel, modules and
initramfs, print what they are and exit (scripts/setup runs this).

The console is streamed as it arrives; the exit status is CMD's (124: timed out,
125: the guest ended without running it to completion, e.g. a setup failure or crash).
Without --share a temporary share is used and removed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.vm.harness import (ROOT_CACHES, SHARE_CACHES, AssetsUnavailable, GuestResult, VmError, ensure_assets,
                              run_in_guest)

EXIT_TIMEOUT = 124
EXIT_NO_MARKER = 125


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=600, help="seconds (boot included) before QEMU is killed")
    parser.add_argument("--share", type=Path, default=None,
                        help="writable directory, mounted at the same path in the guest (default: a temporary one)")
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    parser.add_argument("--cwd", default=None, help="working directory in the guest (default: the current one)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment variable")
    parser.add_argument("--root-cache", choices=ROOT_CACHES, default="loose",
                        help="9p cache mode of the read-only host root (none: always re-read from the host)")
    parser.add_argument("--share-cache", choices=SHARE_CACHES, default="mmap",
                        help="9p cache mode of the share (mmap: shared mmap works, e.g. SQLite WAL)")
    parser.add_argument("--assets-only", action="store_true",
                        help="only fetch/build the kernel, modules and initramfs (from Debian's packages), then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command and not args.assets_only:
        parser.error("no command given (python -m tests.vm -- CMD...)")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env wants NAME=VALUE, not {item!r}")
    return args


class _Stream:
    """Writes the console to stdout as it arrives; remembers whether the last line ended."""

    def __init__(self) -> None:
        self.at_line_start = True

    def __call__(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.at_line_start = text.endswith("\n")


def _run(args: argparse.Namespace, share: Path) -> GuestResult:
    env = dict(item.split("=", 1) for item in args.env)
    stream = _Stream()
    result = run_in_guest(args.command, share_dir=share, timeout=args.timeout, memory_mb=args.memory,
                          cpus=args.cpus, env=env, cwd=args.cwd, root_cache=args.root_cache,
                          share_cache=args.share_cache, on_output=stream)
    if not stream.at_line_start:  # the kernel's last message has no newline
        sys.stdout.write("\n")
        sys.stdout.flush()
    return result


def _report(result: GuestResult) -> int:
    boot = f"boot {result.boot_seconds:.1f}s, " if result.boot_seconds is not None else ""
    if result.timed_out:
        print(f"flyio-vm: timed out, QEMU killed ({boot}wall {result.wall_seconds:.1f}s)", file=sys.stderr)
        return EXIT_TIMEOUT
    if result.returncode is None:
        reason = result.guest_error or f"no exit marker (QEMU exited {result.qemu_returncode})"
        print(f"flyio-vm: {reason} ({boot}wall {result.wall_seconds:.1f}s)", file=sys.stderr)
        return EXIT_NO_MARKER
    print(f"flyio-vm: exit {result.returncode} ({boot}wall {result.wall_seconds:.1f}s)", file=sys.stderr)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.assets_only:
            assets = ensure_assets()
            print(f"flyio-vm: guest kernel {assets.kernel_version} ready: {assets.kernel} + {assets.initrd} "
                  f"({len(assets.modules)} modules)")
            return 0
        if args.share is not None:
            args.share.mkdir(parents=True, exist_ok=True)
            return _report(_run(args, args.share))
        with tempfile.TemporaryDirectory(prefix="flyio-vm-") as tmp:
            return _report(_run(args, Path(tmp)))
    except (AssetsUnavailable, VmError, ValueError) as exc:
        print(f"flyio-vm: {exc}", file=sys.stderr)
        return EXIT_NO_MARKER


if __name__ == "__main__":
    sys.exit(main())
