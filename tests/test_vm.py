"""Host-side tests that boot a QEMU guest with a real device-mapper kernel (tests/vm/).

TCG emulation is slow, so guests are few and their work is small: one guest runs the
whole in-guest suite (tests/guest/), one checks the basics, four more make two power cuts,
and seven make the power-cut campaign's six cuts (docs/faults.md), three the capacity test
(fill, evict and grow; a grow cut by a power cut; the check after it).
The read-only host root is mounted with cache=loose (Python imports over uncached 9p
take minutes under TCG); everything the guests write goes to the share.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.vm import RunningGuest, run_in_guest, start_guest
from tests.vm.ci import guest_suite_size, require_guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
ROOT_CACHE = "loose"


def tail(text: str, chars: int = 4000) -> str:
    return text[-chars:]


@pytest.fixture(scope="module")
def guest_ready() -> None:
    """Skip (under CI=true: fail) unless we are root and the guest's kernel/initramfs can be obtained."""
    require_guest()


def test_guest_has_thin_pool_target_and_a_writable_share(guest_ready: None, tmp_path: Path) -> None:
    """The guest boots, its kernel offers dm-thin, the share is writable and the root is not."""
    marker = tmp_path / "from-guest.txt"
    script = f"dmsetup targets && echo written-in-guest > {marker} && ! touch /usr/flyio-should-fail 2>/dev/null"
    result = run_in_guest(["sh", "-c", script], share_dir=tmp_path, timeout=240)
    assert not result.timed_out and result.returncode == 0, tail(result.output)
    targets = {line.split()[0] for line in result.output.splitlines() if re.match(r"^\S+\s+v\d", line)}
    assert {"thin-pool", "thin"} <= targets, tail(result.output)
    assert marker.read_text() == "written-in-guest\n"


def test_guest_suite_passes(guest_ready: None, tmp_path: Path) -> None:
    """tests/guest/ (devicemapper backend, process-image on dm-thin) in one guest: every
    test pytest collects there passes; none skips, fails or errors."""
    expected = guest_suite_size()
    result = run_in_guest(["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/guest/"],
                          share_dir=tmp_path, timeout=1800, cwd=str(REPO), root_cache=ROOT_CACHE,
                          env={"GUEST_SHARE": str(tmp_path)})
    assert not result.timed_out, tail(result.output)
    assert result.returncode == 0, tail(result.output)
    summary = [line for line in result.output.splitlines() if re.search(r"\d+ passed", line)]
    assert summary, tail(result.output)
    only_passes = re.search(r"^=*\s*\d+ passed(, \d+ warnings?)? in ", summary[-1])
    assert only_passes, f"not only passes (skips? no dm-thin?): {summary[-1]}"
    passed = int(re.search(r"(\d+) passed", summary[-1]).group(1))
    assert passed == expected, f"{passed} of the {expected} guest tests passed: {summary[-1]}"


def test_power_cuts_resume_and_keep_completed_images(guest_ready: None, tmp_path: Path) -> None:
    """Two power cuts on one pool: QEMU killed while image A unpacks, and (after A completed)
    while image B snapshots. Each fresh guest on the same share recreates the pool from the
    existing files and finishes the job (process-image the first time, `fsm resume` the
    second); A's devices read back bit for bit the same after B's cut; every thin device in
    the pool is named by a row of images.db."""
    from demo.samples import build_families

    layers = build_families(tmp_path / "samples", 20.0, families=("golang",))
    state = tmp_path / "state"
    image_a = ["python", "tests/guest/powercut.py", str(state), str(layers["golang"][0])]  # ~3 MB base layer
    image_b = ["python", "tests/guest/powercut.py", str(state), str(layers["golang"][3])]
    resume = ["python", "tests/guest/powercut.py", str(state), "--resume"]

    cut_while(image_a, "to_state=unpacking", tmp_path)
    assert (state / "pool_meta").exists() and (state / "pool_data").exists()
    after_a = run_to_report(image_a, tmp_path)
    assert after_a["returncode"] == 0 and after_a["states_before"] == {"1": "unpacking"}, after_a
    assert after_a["states"] == {"1": "complete"}, after_a
    checksums_a = after_a["checksums"]
    assert len(checksums_a) == 2, checksums_a  # A's layer device and its snapshot

    cut_while(image_b, "to_state=snapshotting", tmp_path)
    after_b = run_to_report(resume, tmp_path)
    assert after_b["states_before"] == {"1": "complete", "2": "snapshotting"}, after_b
    assert after_b["returncode"] == 0 and after_b["states"] == {"1": "complete", "2": "complete"}, after_b
    assert after_b["reactivated"], "A's snapshot (a VM's disk) was not re-activated after the cut"
    assert {name: after_b["checksums"][name] for name in checksums_a} == checksums_a, "image A changed"
    assert len(after_b["checksums"]) == 4, after_b["checksums"]


def cut_while(argv: list[str], transition: str, share: Path) -> None:
    """Start a guest running `argv` and kill QEMU (the power cut) once `transition` is logged."""
    with start_guest(argv, share_dir=share, cwd=str(REPO), root_cache=ROOT_CACHE) as guest:
        cut = _wait_for(guest, transition, timeout=900)
        guest.kill()
    assert cut, tail(guest.output)
    assert "POWERCUT-RESULT" not in guest.output, "the job finished before the cut; nothing was tested"


def run_to_report(argv: list[str], share: Path) -> dict:
    """A fresh guest on the same share: the pool comes back from its files; the report of powercut.py."""
    result = run_in_guest(argv, share_dir=share, timeout=1200, cwd=str(REPO), root_cache=ROOT_CACHE)
    assert result.returncode == 0, tail(result.output)
    found = re.findall(r"POWERCUT-RESULT (\{.*\})", result.output)
    assert found, tail(result.output)
    report = json.loads(found[-1])
    report["reactivated"] = re.findall(r"snapshot re-activated\s+device_name=(thin-\d+)", result.output)
    assert "catalog reconciled with the pool" in result.output
    assert "pool does not exist, attempting to create" in result.output
    assert "re-attaching existing pool files" in result.output, "the pool must come back from the old files"
    assert "creating new thin pool" not in result.output
    assert report["pool_ids"], "no thin devices in the pool after the resumed job"
    unnamed = [f"thin-{i}" for i in report["pool_ids"] if f"thin-{i}" not in report["row_names"]]
    assert unnamed == [], f"thin devices no row names: {unnamed}"
    return report


def _wait_for(guest: RunningGuest, text: str, timeout: float) -> bool:
    """Until `text` appears on the guest's console (False if the guest ended or time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in guest.output:
            return True
        if not guest.running:
            return text in guest.output
        time.sleep(0.05)
    return False


# The power-cut campaign: (cut point, image the boot processes or None, console marker after
# which to look, the log lines to see in order before the cut).
CAMPAIGN_CUTS: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("create_thin (base layer)", "A", (r"operation started.*operation=create-device",)),
    ("mkfs.ext4", "B", (r"operation started.*operation=make-filesystem",)),
    ("unpack write-back (layer 2)", "C", (r"operation started.*operation=unpack-image",) * 2),
    ("create_snap (layer 3)", "D", (r"operation started.*operation=create-device",) * 3),
    # On dm-thin no line falls between create_snap and the activation: cut as the Operation
    # Guard starts the snapshot operation (create_snap + activate take seconds under TCG).
    ("activation snapshot (create_snap + activate)", "E", (r"operation started.*operation=snapshot",)),
    ("reconciliation at the next start", None, (r"snapshot re-activated",)),
)
CAMPAIGN_SCALE_MB = 1.0  # each image: golang's layers 1-3 of demo.samples, ~0.4 MB of tar


def test_power_cut_campaign_on_dm_thin(guest_ready: None, tmp_path: Path) -> None:
    """Six power cuts on one dm-thin pool (tests/guest/powercut_campaign.py): during
    create_thin, mkfs, an upper layer's unpack, create_snap, the activation snapshot, and the
    next start's reconciliation (as it re-activates the snapshots). Each cut is QEMU killed
    the moment its log line reaches the console. Each boot on the same share first recovers (`fsm resume`:
    pool re-attached from its files, catalog reconciled, the cut job resumed) and checks:
    thin_check of the metadata (reserved metadata snapshot) is clean, every job complete,
    every complete image's snapshot mounted with the expected tree, every thin id named by
    exactly one row, and every image completed before still there.

    Share caches as configured: the host root is 9p cache=loose (read-only), the share
    cache=mmap (writes go straight to the host file; shared mmap for SQLite's WAL)."""
    from demo.samples import write_layer
    from tests.guest.powercut_campaign import layers_of
    from tests.test_formats import _docker_archive

    state, plan_path = tmp_path / "state", tmp_path / "plan.json"
    names = [image for _, image, _ in CAMPAIGN_CUTS if image]
    plan = {"scale_mb": CAMPAIGN_SCALE_MB, "images": {n: f"powercut-{n}" for n in names}, "archives": {}}
    for name in names:
        layers = [write_layer(spec, tmp_path / "layers" / name / f"{i}.tar").read_bytes()
                  for i, spec in enumerate(layers_of(plan["images"][name], CAMPAIGN_SCALE_MB), start=1)]
        archive = tmp_path / "archives" / f"{name}.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(_docker_archive(layers, new_style=True))
        plan["archives"][name] = str(archive)
    plan_path.write_text(json.dumps(plan))
    argv = ["python", "-m", "tests.guest.powercut_campaign", str(state), str(plan_path)]

    rows, completed, started = [], [], time.monotonic()
    for number, (point, image, patterns) in enumerate(CAMPAIGN_CUTS):
        marker = f"CAMPAIGN-PHASE process {image}" if image else "CAMPAIGN-PHASE recover"
        boot = time.monotonic()
        with start_guest(argv + ([image] if image else []), share_dir=tmp_path, cwd=str(REPO),
                         root_cache=ROOT_CACHE, share_cache="mmap") as guest:
            cut = _wait_for_lines(guest, marker, patterns, timeout=900)
            guest.kill()
        assert cut, f"cut {point!r} never reached: " + tail(guest.output)
        if number > 0 and image:  # what this boot's recovery found after the previous cut
            rows.append((CAMPAIGN_CUTS[number - 1][0], _campaign_check(guest.output, completed)))
        elif number > 0:  # this boot's recovery was itself cut: the next boot checks both
            rows.append((CAMPAIGN_CUTS[number - 1][0], {"recovery_seconds": "cut by the next point",
                                                        "thin_check": "(checked after the next cut)"}))
        assert ("CAMPAIGN-PROCESSED" if image else "CAMPAIGN-CHECK") not in guest.output, f"{point}: finished first"
        completed += [image] if image else []
        print(f"cut {number + 1} ({point}) after {time.monotonic() - boot:.0f}s of guest", flush=True)
    final = run_in_guest(argv, share_dir=tmp_path, timeout=1200, cwd=str(REPO), root_cache=ROOT_CACHE,
                         share_cache="mmap")
    assert final.returncode == 0, tail(final.output)
    rows.append((CAMPAIGN_CUTS[-1][0], _campaign_check(final.output, completed)))
    print("\n| cut point | recovery (fsm resume in the guest) | thin_check |\n|---|---|---|")
    for point, report in rows:
        seconds = report["recovery_seconds"]
        print(f"| {point} | {f'{seconds} s' if isinstance(seconds, float) else seconds} | {report['thin_check']} |")
    print(f"campaign wall: {time.monotonic() - started:.0f}s")


def _campaign_check(output: str, completed: list[str]) -> dict:
    """The boot's CAMPAIGN-CHECK report, asserted: clean metadata, every job complete, every
    image done so far there with its expected tree, one row per thin id."""
    found = re.findall(r"CAMPAIGN-CHECK (\{.*\})", output)
    assert found, tail(output)
    report = json.loads(found[-1])
    assert "CAMPAIGN-ERROR" not in output, tail(output)
    assert report["thin_check"] == "ok", report
    assert set(report["states"].values()) == {"complete"}, report
    assert set(completed) <= set(report["trees"]) and set(report["trees"].values()) == {"ok"}, report
    assert report["unnamed"] == [] and report["named_twice"] == [], report
    assert "re-attaching existing pool files" in output and "creating new thin pool" not in output
    return report


def _wait_for_lines(guest: RunningGuest, marker: str, patterns: tuple[str, ...], timeout: float) -> bool:
    """Until the console, after `marker`, has lines matching `patterns` in order (each a later line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = guest.output
        if marker in text:
            lines, wanted = text.split(marker, 1)[1].splitlines(), list(patterns)
            for line in lines:
                if wanted and re.search(wanted[0], line):
                    wanted.pop(0)
            if not wanted:
                return True
        if not guest.running:
            return False
        time.sleep(0.05)
    return False


def test_capacity_on_dm_thin(guest_ready: None, tmp_path: Path) -> None:
    """Issue 12 on a real dm-thin pool, three boots on one share (tests/guest/capacity.py):
    fill a small pool past the high watermark, `gc --images` (dry run: nothing changes;
    --force: below the low watermark, the pinned image, the shared base chain and the image
    with a live, written VM snapshot all survive and read back), grow the pool while that
    snapshot is written; then a grow cut by a power cut (QEMU killed as "pool file extended"
    is logged), and the next boot's `setup-pool` re-attaches the pool at the file's size with
    every device reading back as before."""
    state = tmp_path / "state"
    argv = ["python", "-m", "tests.guest.capacity", str(state)]

    def report_of(output: str) -> dict:
        assert "CAPACITY-ERROR" not in output, tail(output)
        found = re.findall(r"CAPACITY-REPORT (\{.*\})", output)
        assert found, tail(output)
        return json.loads(found[-1])

    started = time.monotonic()
    filled = run_in_guest(argv + ["fill"], share_dir=tmp_path, timeout=1800, cwd=str(REPO), root_cache=ROOT_CACHE)
    assert filled.returncode == 0, tail(filled.output)
    report = report_of(filled.output)
    assert report["usage_filled"] > 0.85 and report["usage_after_eviction"] < 0.75, report
    print(f"fill, evict, grow: {report} after {time.monotonic() - started:.0f}s", flush=True)

    with start_guest(argv + ["grow"], share_dir=tmp_path, cwd=str(REPO), root_cache=ROOT_CACHE) as guest:
        cut = _wait_for(guest, "pool file extended", timeout=900)
        guest.kill()
    assert cut, tail(guest.output)
    assert "CAPACITY-REPORT" not in guest.output and "pool grown" not in guest.output, "the grow finished first"

    checked = run_in_guest(argv + ["check"], share_dir=tmp_path, timeout=1200, cwd=str(REPO), root_cache=ROOT_CACHE)
    assert checked.returncode == 0, tail(checked.output)
    after = report_of(checked.output)
    assert after["devices_read_back"] == report["devices_checksummed"], (after, report)
    print(f"after the cut grow: {after}; capacity wall {time.monotonic() - started:.0f}s", flush=True)


def test_rebuild_db_after_a_power_cut_on_dm_thin(guest_ready: None, tmp_path: Path) -> None:
    """Issue 18 on a real dm-thin pool, two boots on one share (tests/guest/rebuild.py): two
    images and a VM's disk; a power cut right after a third image's first device record is
    written (before or while its thin message runs); the next boot loses images.db and runs
    `rebuild-db`, which re-attaches the pool from its files. The catalog's view is what it was,
    every device in the pool is named once (by a row, or left for gc when its record is an
    unfinished intent), gc deletes nothing whose record says ready, a repeat process-image
    makes no device and a new VM gets its snapshot."""
    state = tmp_path / "state"
    argv = ["python", "-m", "tests.guest.rebuild", str(state)]
    with start_guest(argv + ["make"], share_dir=tmp_path, cwd=str(REPO), root_cache=ROOT_CACHE) as guest:
        cut = _wait_for_lines(guest, "REBUILD-CUT-TARGET", (r"device record written.*state=creating",), timeout=900)
        guest.kill()
    assert cut, tail(guest.output)
    assert "REBUILD-REPORT" not in guest.output and "REBUILD-ERROR" not in guest.output, tail(guest.output)

    result = run_in_guest(argv + ["rebuild"], share_dir=tmp_path, timeout=1200, cwd=str(REPO), root_cache=ROOT_CACHE)
    assert result.returncode == 0 and "REBUILD-ERROR" not in result.output, tail(result.output)
    report = json.loads(re.findall(r"REBUILD-REPORT (\{.*\})", result.output)[-1])
    assert report["view"] == report["view_before"], report
    assert len(report["view"]["snapshots"]) == 3 and len(report["view"]["images"]) == 2, report["view"]
    named, left = report["named"], set(report["left_for_gc"])
    assert len(named) == len(set(named)) and not set(named) & left, report
    assert set(report["pool_ids"]) == set(named) | left, report
    assert set(report["ready_records"]) <= set(named), report
    # The cut image's device, if its thin message ran, is an unfinished intent: gc's, and only it.
    assert len(left) <= 1, report
    assert report["gc_dry_run"][-1].startswith(f"cleaned=0 failed=0 orphaned={len(left)} "), report
    assert set(report["pool_ids_after_gc"]) == set(named), report
    assert report["repeat"]["state"] == "complete" and report["pool_ids_after_repeat"] == report["pool_ids_after_gc"]
    assert report["new_vm"]["state"] == "complete", report
    # The VMs' disks are active again after the reboot, as the reconciliation leaves them.
    assert {row[0] for row in report["view"]["snapshots"]} <= set(report["active"]), report
    print(f"rebuild after a power cut: {len(named)} devices named, {len(left)} left for gc "
          f"({'the thin message ran' if left else 'cut before the thin message'})", flush=True)
