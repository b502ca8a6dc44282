"""Guest side of the rebuild test on a real dm-thin pool (issue 18), two boots on one share
(tests/test_vm.py::test_rebuild_db_after_a_power_cut_on_dm_thin):

    python -m tests.guest.rebuild STATE_DIR make      # two images, a VM's disk, then a third image cut
    python -m tests.guest.rebuild STATE_DIR rebuild   # the database lost: rebuild-db after the reboot

make: images `a` and `b` (one layer each, file://), a VM snapshot of `a` larger than its
origin; the catalog's view (`images --json`, `snapshots --json`) goes to the share; then
image `c` is processed with debug logs and the host kills QEMU (the power cut) when its first
device's record is written (`device record written ... state=creating`), before or while the
thin message runs.

rebuild: a new boot (the pool is gone with the kernel); images.db deleted; `rebuild-db`
re-attaches the pool from its files and rebuilds the catalog. The report has the view after,
the pool's ids, the ids rows name, the ready records, what rebuild-db left for gc, and gc's
dry run and force; then a repeat process-image of `a` (no device made) and a new VM's
snapshot of `b`.

Each boot prints REBUILD-REPORT {json} when it passes, REBUILD-ERROR and exits 1 when not.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import traceback
from contextlib import closing
from pathlib import Path
from typing import Any

from catalog.device_records import DeviceRecord, RecordStore
from tests.guest.capacity import ENV, REPO, cli, ok, pool, result_fields

CUT_MARKER = "REBUILD-CUT-TARGET"


def layer(state_dir: Path, name: str) -> Path:
    """The image's one layer, on the share: a repeat process-image names the same file."""
    path = state_dir.parent / "rebuild-layers" / f"{name}.tar"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        body = f"image {name}\n".encode() * 1000
        info = tarfile.TarInfo(f"srv/{name}.txt")
        info.size, info.mtime = len(body), 1_700_000_000
        tar.addfile(info, io.BytesIO(body))
    return path


def process(state_dir: Path, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(state_dir, "process-image", "--url", f"file://{path}", "--device-size", "64M", *extra)


def view(state_dir: Path) -> dict[str, Any]:
    images = json.loads(ok(cli(state_dir, "images", "--json")).stdout)
    snapshots = json.loads(ok(cli(state_dir, "snapshots", "--json")).stdout)
    return {"images": sorted([i["name"], i["source"], i["layer_count"], i["activation_status"], i["top_device"],
                              i["pinned"]] for i in images),
            "snapshots": sorted([s["device_name"], s["state"], s["image"], s["vm_id"], s["size_bytes"]]
                                for s in snapshots)}


def make(state_dir: Path, work: Path) -> dict[str, Any]:
    for name in ("a", "b"):
        ok(process(state_dir, layer(state_dir, name)))
    ok(cli(state_dir, "snapshot", "a.tar", "--vm", "vm-1", "--size", "96M"))
    (state_dir.parent / "rebuild-view.json").write_text(json.dumps(view(state_dir)))
    target = layer(state_dir, "c")
    print(CUT_MARKER, flush=True)
    # The log goes straight to the console (not captured): the host cuts at its line.
    subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "--verbose", "process-image", "--url",
                    f"file://{target}", "--device-size", "64M"], cwd=REPO, timeout=900, env={**os.environ, **ENV})
    return {"note": "image c finished before the cut: nothing was tested"}


def rebuild(state_dir: Path, work: Path) -> dict[str, Any]:
    for suffix in ("", "-wal", "-shm"):
        (state_dir / f"images.db{suffix}").unlink(missing_ok=True)
    rebuilt = ok(cli(state_dir, "rebuild-db"))
    assert "re-attaching existing pool files" in rebuilt.stderr and "creating new thin pool" not in rebuilt.stderr
    records = RecordStore(state_dir)
    ready = sorted(i for i, r in records.devices().items() if isinstance(r, DeviceRecord) and r.ready)
    in_pool = sorted(d.device_id for d in pool(state_dir).list_devices())
    with closing(sqlite3.connect(state_dir / "images.db")) as db:
        named = [row[0] for row in db.execute("SELECT device_id FROM unpacked_images UNION ALL "
                                              "SELECT device_id FROM snapshots")]
    report: dict[str, Any] = {
        "view": view(state_dir), "pool_ids": in_pool, "named": named, "ready_records": ready,
        "left_for_gc": [int(n) for n in re.findall(r"^not named: thin-(\d+) ", rebuilt.stdout, re.MULTILINE)],
        "rebuilt": rebuilt.stdout.strip().splitlines(),
        "active": sorted(d.name for d in pool(state_dir).list_devices() if d.active)}
    dry = ok(cli(state_dir, "gc", "--dry-run"))
    report["gc_dry_run"] = re.findall(r"Summary\s+(.*)$", dry.stdout + dry.stderr, re.MULTILINE)
    ok(cli(state_dir, "gc", "--force"))
    report["pool_ids_after_gc"] = sorted(d.device_id for d in pool(state_dir).list_devices())
    again = ok(process(state_dir, layer(state_dir, "a")))
    report["repeat"] = result_fields(again.stdout)
    report["pool_ids_after_repeat"] = sorted(d.device_id for d in pool(state_dir).list_devices())
    report["new_vm"] = result_fields(ok(cli(state_dir, "snapshot", "b.tar", "--vm", "vm-2")).stdout)
    report["view_before"] = json.loads((state_dir.parent / "rebuild-view.json").read_text())
    return report


def main(state_dir: Path, phase: str) -> int:
    with tempfile.TemporaryDirectory(prefix=f"rebuild-{phase}-") as scratch:
        try:
            report = make(state_dir, Path(scratch)) if phase == "make" else rebuild(state_dir, Path(scratch))
        except Exception:  # noqa: BLE001 (the host reads the console: the whole traceback goes there)
            print("REBUILD-ERROR\n" + traceback.format_exc(), flush=True)
            return 1
    print("REBUILD-REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
