"""Guest side of the power-cut test (tests/test_vm.py::test_power_cuts_resume_and_keep_completed_images).

    python tests/guest/powercut.py STATE_DIR LAYER_TAR     # process-image --url file://LAYER_TAR
    python tests/guest/powercut.py STATE_DIR --resume      # fsm resume

runs the manager on the devicemapper backend (a guest may be killed in the middle: the
power cut; the next guest, booted on the same share, runs it again or resumes), then
prints one line

    POWERCUT-RESULT {"returncode": ..., "states_before": {...}, "states": {...}, "pool_ids": [...],
                     "row_names": [...], "checksums": {...}}

with the jobs' states before and after the run, the thin ids in the pool (active or not:
list_devices reads the pool metadata), every device name a row of images.db records (live
layers, snapshots, orphans), and the sha256 of every ready device's whole contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from devices.base import PoolConfig, device_name
from devices.devicemapper import DevicemapperPool

REPO = Path(__file__).resolve().parents[2]
DEVICE_SIZE = "64M"
DEVICE_BYTES = 64 * 1024**2


def job_states(db_path: Path) -> dict[str, str]:
    if not db_path.exists():
        return {}
    with sqlite3.connect(db_path) as db:
        return {str(job_id): state for job_id, state in db.execute("SELECT id, state FROM jobs ORDER BY id")}


def device_checksums(db_path: Path, pool: DevicemapperPool) -> dict[str, str]:
    """sha256 of each ready layer device and snapshot; an inactive one is activated to be
    read and deactivated again (left as found)."""
    with sqlite3.connect(db_path) as db:
        ids = [row[0] for query in ("SELECT device_id FROM unpacked_images WHERE state='ready'",
                                    "SELECT device_id FROM snapshots WHERE state='ready'") for row in db.execute(query)]
    active = {device.device_id for device in pool.list_devices() if device.active}
    sums = {}
    for device_id in sorted(ids):
        path = pool.activate(device_id, DEVICE_BYTES)
        with open(path, "rb") as fh:
            sums[device_name(device_id)] = hashlib.file_digest(fh, "sha256").hexdigest()
        if device_id not in active:
            pool.deactivate(device_id)
    return sums


def main(state_dir: Path, layer: str) -> int:
    db_path = state_dir / "images.db"
    before = job_states(db_path)
    if layer == "--resume":
        argv = ["fsm", "resume"]
    else:
        argv = ["process-image", "--url", f"file://{layer}", "--backend", "devicemapper", "--device-size", DEVICE_SIZE]
    # A subprocess like an operator's run. Its log (stderr) goes straight to the console,
    # where the host watches for a transition to cut the power.
    done = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *argv], cwd=REPO,
                          env={**os.environ, "FLYIO_BACKEND": "devicemapper"},
                          stdout=subprocess.PIPE, text=True, timeout=1200)
    print(done.stdout, flush=True)
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    pool_ids = [d.device_id for d in pool.list_devices()]
    with sqlite3.connect(db_path) as db:
        names = [row[0] for query in ("SELECT device_name FROM unpacked_images", "SELECT device_name FROM snapshots",
                                      "SELECT device_name FROM orphaned_devices") for row in db.execute(query)]
    report = {"returncode": done.returncode, "states_before": before, "states": job_states(db_path),
              "pool_ids": pool_ids, "row_names": sorted(set(names)), "checksums": device_checksums(db_path, pool)}
    print("POWERCUT-RESULT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
