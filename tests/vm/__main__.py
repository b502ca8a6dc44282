"""`python -m tests.vm [--timeout S] [--share DIR] -- CMD...`: run CMD in a dm-thin guest."""

from __future__ import annotations

import argparse
import sys

from tests.vm.harness import run_in_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before QEMU is killed")
    parser.add_argument("--share", default=None, help="writable directory, mounted at the same path in the guest")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    result = run_in_guest(command, share_dir=args.share, timeout=args.timeout)
    sys.stdout.write(result.output)
    if result.timed_out:
        print(f"guest timed out after {result.seconds:.0f}s", file=sys.stderr)
        return 124
    if result.returncode is None:
        print("guest ended without an exit marker", file=sys.stderr)
        return 125
    print(f"guest exited {result.returncode} after {result.seconds:.1f}s", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
