"""A QEMU guest with a device-mapper kernel for tests (see tests/vm/README.md)."""

from tests.vm.harness import (
    AssetsUnavailable,
    GuestAssets,
    GuestResult,
    RunningGuest,
    VmAssets,
    VmCommandError,
    VmError,
    default_cache_dir,
    ensure_assets,
    run_in_guest,
    start_guest,
)

__all__ = [
    "AssetsUnavailable", "GuestAssets", "GuestResult", "RunningGuest", "VmAssets", "VmCommandError", "VmError",
    "default_cache_dir", "ensure_assets", "run_in_guest", "start_guest",
]
