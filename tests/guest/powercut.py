"""Guest side of the power-cut test (tests/test_vm.py::test_power_cut_mid_unpack_resumes).

    python tests/guest/powercut.py STATE_DIR LAYER_TAR

runs `process-image --url file://LAYER_TAR --backend devicemapper` (the first guest is
killed while it unpacks; the second, booted on the same share, runs it again: the pool
comes back from the existing files and the job resumes), then prints one line

    POWERCUT-RESULT {"returncode": ..., "state": ..., "pool_ids": [...], "row_names": [...]}

with the thin ids in the pool (active or not: list_devices reads the pool metadata) and
every device name a row of images.db records (live layers, snapshots, orphans).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool

REPO = Path(__file__).resolve().parents[2]


def main(state_dir: Path, layer: Path) -> int:
    # A subprocess like an operator's run. Its log (stderr) goes straight to the console,
    # where the host watches for the unpacking transition to cut the power.
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--url", f"file://{layer}",
         "--backend", "devicemapper", "--device-size", "64M"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=1200)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    fields = dict(pair.split("=", 1) for pair in last.split() if "=" in pair)
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    pool_ids = [d.device_id for d in pool.list_devices()]
    with sqlite3.connect(state_dir / "images.db") as db:
        names = [row[0] for query in ("SELECT device_name FROM unpacked_images", "SELECT device_name FROM snapshots",
                                      "SELECT device_name FROM orphaned_devices") for row in db.execute(query)]
    print("POWERCUT-RESULT " + json.dumps({"returncode": done.returncode, "state": fields.get("state"),
                                           "snapshot_device": fields.get("snapshot_device"),
                                           "pool_ids": pool_ids, "row_names": sorted(set(names))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
