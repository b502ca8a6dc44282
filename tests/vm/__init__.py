"""A QEMU guest with a device-mapper kernel for tests (see tests/vm/harness.py)."""

from tests.vm.assets import AssetsUnavailable, ensure_assets
from tests.vm.harness import GuestResult, RunningGuest, run_in_guest, start_guest

__all__ = ["AssetsUnavailable", "GuestResult", "RunningGuest", "ensure_assets", "run_in_guest", "start_guest"]
