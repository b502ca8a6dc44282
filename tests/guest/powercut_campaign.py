"""Guest side of the power-cut campaign (tests/test_vm.py::test_power_cut_campaign_on_dm_thin).

    python -m tests.guest.powercut_campaign STATE_DIR PLAN_JSON [IMAGE]     (in the checkout)

One boot of the campaign, on the share that outlives every guest: first the next start's
recovery (`fsm resume` on the devicemapper backend: the pool is re-attached from its files,
the catalog reconciled, unfinished jobs resumed), then the checks, printed as one line

    CAMPAIGN-CHECK {"recovery_seconds": ..., "thin_check": "ok" | "...", "states": {...},
                    "trees": {...}, "unnamed": [...], "named_twice": [...]}

then, with IMAGE, `process-image` of that image's docker-save archive, for the host to cut.
The host kills QEMU (the power cut) when a log line it waits for appears on the console,
in the recovery or in the job; the next boot recovers and checks again.

Checks: `thin_check` of the pool metadata through a reserved metadata snapshot (the pool
stays live); every complete image's snapshot mounted read-only and its tree compared with
demo.samples.expected_tree of the layers the plan names; every thin id in the pool named
by exactly one row (live layer, snapshot or uncleaned orphan).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from demo.samples import diff_trees, expected_tree, family_layers, snapshot_tree
from devices.base import PoolConfig
from devices.devicemapper import DevicemapperPool

REPO = Path(__file__).resolve().parents[2]
LAYERS = 3


def layers_of(seed: str, scale_mb: float) -> list:
    """The plan's images are golang's shared layers 1-3 built from their own seed."""
    return family_layers("golang", scale_mb, seed=seed)[:LAYERS]


def manager(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The log (stderr) goes straight to the console, where the host watches for its cut.
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), *args], cwd=REPO,
                          env={**os.environ, "FLYIO_BACKEND": "devicemapper"}, stdout=subprocess.PIPE, text=True,
                          timeout=1200)


def thin_check(pool: DevicemapperPool) -> str:
    """thin_check of the live pool's metadata through a reserved metadata snapshot."""
    found = subprocess.run(["losetup", "-j", str(pool.meta_file)], capture_output=True, text=True, timeout=30)
    meta = found.stdout.split(":", 1)[0].strip()
    if not meta:
        return f"no loop device backs {pool.meta_file}"
    subprocess.run(["dmsetup", "message", pool.pool_name, "0", "reserve_metadata_snap"], check=True, timeout=60)
    try:
        done = subprocess.run(["thin_check", "--metadata-snap", meta], capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["dmsetup", "message", pool.pool_name, "0", "release_metadata_snap"], check=True, timeout=60)
    return "ok" if done.returncode == 0 else f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"


def trees(db: sqlite3.Connection, plan: dict, work: Path) -> dict[str, str]:
    """Each complete image job's snapshot, mounted read-only: "ok" or the first differences."""
    result = {}
    for (context,) in db.execute("SELECT context FROM jobs WHERE workflow='image' AND state='complete'"):
        data = json.loads(context)
        name = Path(data["image"]["source"]).name.removesuffix(".tar")
        expected = expected_tree(layers_of(plan["images"][name], plan["scale_mb"]))
        target = work / f"mnt-{name}"
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "ro,nodev,nosuid,noload", data["snapshot_device"], str(target)],
                       check=True, timeout=120)
        try:
            differences = diff_trees(expected, snapshot_tree(target))
        finally:
            subprocess.run(["umount", str(target)], check=True, timeout=120)
        result[name] = "ok" if not differences else "; ".join(differences[:5])
    return result


def check(state_dir: Path, plan: dict, recovery_seconds: float) -> dict:
    pool = DevicemapperPool(PoolConfig(directory=str(state_dir)))
    with sqlite3.connect(state_dir / "images.db") as db:
        states = {str(i): s for i, s in db.execute("SELECT id, state FROM jobs ORDER BY id")}
        names = [r[0] for r in db.execute("SELECT device_id FROM unpacked_images UNION ALL SELECT device_id FROM "
                                          "snapshots UNION ALL SELECT device_id FROM orphaned_devices "
                                          "WHERE cleaned_at IS NULL")]
        image_trees = trees(db, plan, Path("/tmp"))
    in_pool = {d.device_id for d in pool.list_devices()}
    return {"recovery_seconds": round(recovery_seconds, 1), "thin_check": thin_check(pool), "states": states,
            "trees": image_trees, "pool_ids": sorted(in_pool), "unnamed": sorted(in_pool - set(names)),
            "named_twice": sorted({n for n in names if names.count(n) > 1})}


def main(state_dir: Path, plan_path: Path, image: str | None) -> int:
    plan = json.loads(plan_path.read_text())
    print("CAMPAIGN-PHASE recover", flush=True)
    started = time.monotonic()
    resumed = manager(state_dir, "fsm", "resume") if (state_dir / "images.db").exists() else None
    if resumed is not None and resumed.returncode != 0:
        print(f"CAMPAIGN-ERROR fsm resume exited {resumed.returncode}: {resumed.stdout[-500:]}", flush=True)
    report = check(state_dir, plan, time.monotonic() - started) if resumed is not None else {}
    print("CAMPAIGN-CHECK " + json.dumps(report), flush=True)
    if image is not None:
        print(f"CAMPAIGN-PHASE process {image}", flush=True)
        done = manager(state_dir, "process-image", "--url", f"file://{plan['archives'][image]}",
                       "--backend", "devicemapper", "--device-size", "64M")
        print(f"CAMPAIGN-PROCESSED {image} exit={done.returncode} {done.stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
