"""The typed views of a job's context (states/data.py): they read and write the stored dict
itself, so the JSON kept is what the steps wrote before; the result line is built once from
them; the steps and the CLI spell neither keys nor device names. Pure logic, no devices."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from cli.app import result_line
from states.data import ImageJobData, JobData, SnapshotJobData

REPO = Path(__file__).resolve().parents[1]


def stored(data: dict) -> str:
    return json.dumps(data, sort_keys=True)  # as fsm/store.py saves a context


def test_writes_through_the_image_view_store_the_same_json_as_writes_by_key() -> None:
    by_key = {"image": {"name": "fa", "source": "s3://b/fa/", "endpoint_url": None, "device_size_bytes": None},
              "objects": [{"url": "s3://b/fa/1.tar", "size": 10, "etag": "e"}]}
    viewed = json.loads(stored(by_key))
    by_key["blobs"] = [{"digest": "sha256:a"}]
    by_key["layers"] = [{"digest": "sha256:a", "chain_id": "sha256:a"}]
    by_key["layer_index"] = 0
    by_key["devices"] = {}
    by_key["devices"]["sha256:a"] = 3
    by_key["layer_index"] = 1
    by_key["image_id"] = 7
    by_key["snapshot_device_id"] = 4
    by_key["snapshot_device"] = "/dev/mapper/thin-4"

    view = ImageJobData(viewed)
    view.blobs = [{"digest": "sha256:a"}]
    view.layers = [{"digest": "sha256:a", "chain_id": "sha256:a"}]
    view.layer_index = 0
    view.devices = {}
    view.devices["sha256:a"] = 3
    view.layer_index = 1
    view.image_id = 7
    view.snapshot_device_id = 4
    view.snapshot_device = "/dev/mapper/thin-4"
    assert stored(viewed) == stored(by_key)
    assert (view.layer_index, view.devices, view.image_id, view.objects[0]["etag"]) == (1, {"sha256:a": 3}, 7, "e")


def test_the_image_result_names_the_top_layer_and_snapshot_devices() -> None:
    context = stored({"image": {"name": "fa"}, "layers": [{"chain_id": "c1"}, {"chain_id": "c2"}],
                      "devices": {"c1": 1, "c2": 2}, "snapshot_device_id": 3, "snapshot_device": "/dev/mapper/thin-3"})
    data = ImageJobData.of(context)
    assert (data.top_device_name, data.snapshot_name) == ("thin-2", "thin-3")
    assert result_line(data.result(5, "complete", None)) == \
        "job_id=5 state=complete image=fa device=thin-2 snapshot=thin-3 snapshot_device=/dev/mapper/thin-3"
    assert result_line(data.result(5, "complete", None, "asked-as")).split()[2] == "image=asked-as"
    unfinished = ImageJobData.of(stored({"image": {"name": "fa"}, "layers": [{"chain_id": "c1"}], "devices": {}}))
    assert result_line(unfinished.result(6, "aborted", "boom")) == "job_id=6 state=aborted image=fa error=boom"
    assert result_line(ImageJobData.of(None).result(7, "pending", None)) == "job_id=7 state=pending"


def test_the_snapshot_result_is_the_vms() -> None:
    context = stored({"image_id": 7, "image": {"name": "fa"}, "vm_id": "vm-1", "snapshot_size_bytes": 1024,
                      "snapshot_device_id": 9, "snapshot_device": "/dev/mapper/thin-9"})
    data = SnapshotJobData.of(context)
    assert (data.image_id, data.vm_id, data.snapshot_size_bytes) == (7, "vm-1", 1024)
    assert result_line(data.result(8, "complete", None)) == \
        "job_id=8 state=complete image=fa vm=vm-1 snapshot=thin-9 snapshot_device=/dev/mapper/thin-9 size=1024"
    assert JobData.of(stored({"image_id": 7})).vm_id is None  # the image job's first snapshot has no VM


def _python(folder: str) -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(REPO).as_posix(), ast.parse(p.read_text())) for p in sorted((REPO / folder).glob("*.py"))]


def test_no_step_reads_its_context_by_string_key() -> None:
    for name, tree in _python("states"):
        for node in ast.walk(tree):
            if isinstance(node, (ast.Subscript, ast.Call)):
                target = node.value if isinstance(node, ast.Subscript) else node.func
                if isinstance(node, ast.Call) and isinstance(target, ast.Attribute):
                    target = target.value  # ctx.data.get(...)
                assert ast.unparse(target) != "ctx.data", f"{name}:{node.lineno}: use states/data.py's view"


def test_no_command_module_imports_the_entry_point_back() -> None:
    """cli/main.py gathers each module's COMMANDS; none imports cli.main (no import loop)."""
    for name, tree in _python("cli"):
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "cli.main" not in imported or name == "cli/__main__.py", name


def test_the_cli_spells_no_device_name() -> None:
    for name, tree in _python("cli"):
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(part.value for part in node.values if isinstance(part, ast.Constant))
                assert "thin-" not in text, f"{name}:{node.lineno}: devices.base.device_name names devices"


def test_what_an_unfinished_job_uses_is_read_through_the_views() -> None:
    """Eviction keeps what unfinished jobs may still use; the catalog is handed that reading
    (states.data.job_uses) and spells none of the context's keys."""
    from states.data import job_uses

    image_job = {"image": {"name": "fa", "source": "s3://b/fa/"}, "image_id": 4,
                 "layers": [{"digest": "sha256:a", "chain_id": "sha256:a"},
                            {"digest": "sha256:b", "chain_id": "sha256:ab"},
                            {"source": "s3://b/fa/3.tar", "pending": True, "chain_id": None}]}
    uses = job_uses(image_job)
    assert (uses.image_id, uses.source, uses.chain_ids) == (4, "s3://b/fa/", ("sha256:a", "sha256:ab"))
    before_listing = job_uses({"image": {"name": "fb", "source": "s3://b/fb/"}})  # no image id, no layers yet
    assert (before_listing.image_id, before_listing.source, before_listing.chain_ids) == (None, "s3://b/fb/", ())
    vm = job_uses({"image_id": 4, "image": {"name": "fa"}, "vm_id": "vm-1"})
    assert (vm.image_id, vm.source, vm.chain_ids) == (4, None, ())


def test_the_catalog_never_imports_the_workflows() -> None:
    """states/ builds on catalog/, never the other way: what a workflow keeps in its
    context is handed to the catalog, not read by it."""
    for path in sorted((REPO / "catalog").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name == "states" or name.startswith("states.")}, path.name
