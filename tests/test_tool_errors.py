"""One owner per kernel tool: each tool is run by one module, whose one ErrorTable maps
the tool's error output to an errno (ToolFailed.errno); callers test the errno.

The texts in tests/tool_errors.json are the tools' own, each with its `source`: captured
on this host (util-linux 2.38, e2fsprogs 1.47, xfsprogs, dmsetup without a device-mapper
driver) and, for dmsetup on a dm-thin kernel, in the QEMU guest (tests/guest/
test_dm_errors.py makes each failure for real); two dmsetup ones that no test machine
can make (a missing control node, a full pool's metadata) are marked constructed. Where a failure is cheap and safe to make on any host, it is made here too; not
dmsetup's: without a driver, libdevmapper creates /dev/mapper/control, and the host would
then look like one with device-mapper to `--backend auto`.
"""

from __future__ import annotations

import ast
import errno
import json
import tomllib
from pathlib import Path

import pytest

from devices import filesystem, loop
from devices.dmsetup import DMSETUP_ERRORS
from devices.filesystem import FILESYSTEM_ERRORS
from devices.loop import LOSETUP_ERRORS
from support.errors import HazardError
from support.proc import CommandFailed, CommandResult, ErrorTable, ToolFailed

REPO = Path(__file__).resolve().parents[1]

# {"dmsetup": [{"output": "<the tool's stderr>", "errno": "EEXIST" | null, "source": "..."}, ...], ...}
TEXTS = json.loads((Path(__file__).with_name("tool_errors.json")).read_text())
TABLES = [
    pytest.param(DMSETUP_ERRORS, "dmsetup", id="dmsetup"),
    pytest.param(LOSETUP_ERRORS, "losetup", id="losetup"),
    pytest.param(FILESYSTEM_ERRORS, "filesystem", id="filesystem"),
]


def texts(owner: str) -> list[tuple[str, int | None]]:
    """The owner's captured outputs with the errno each must map to."""
    return [(case["output"], getattr(errno, case["errno"]) if case["errno"] else None) for case in TEXTS[owner]]


def first_row(table: ErrorTable, output: str) -> int | None:
    """The index of the row that decides `output`, or None."""
    return next((i for i, (text, _) in enumerate(table.rows) if text in output), None)


@pytest.mark.parametrize(("table", "owner"), TABLES)
def test_each_real_text_maps_to_its_errno(table: ErrorTable, owner: str) -> None:
    for output, expected in texts(owner):
        assert table.errno_of(output) == expected, output


@pytest.mark.parametrize(("table", "owner"), TABLES)
def test_every_row_of_a_table_decides_a_real_text(table: ErrorTable, owner: str) -> None:
    """No row is there on a guess: each one is the row that decides some real text."""
    decided = {first_row(table, output) for output, _ in texts(owner)}
    assert decided >= set(range(len(table.rows))), [table.rows[i] for i in range(len(table.rows)) if i not in decided]


def test_a_text_that_contains_a_shorter_one_is_read_first() -> None:
    """ENXIO's text contains ENODEV's: the table must try the longer one first."""
    for table in (DMSETUP_ERRORS, LOSETUP_ERRORS, FILESYSTEM_ERRORS):
        rows = [text for text, _ in table.rows]
        for i, text in enumerate(rows):
            assert not any(text in longer for longer in rows[i + 1:]), text


def test_tool_failed_says_what_command_failed_said() -> None:
    """The operator's message is unchanged; the errno rides along."""
    busy = next(output for output, code in texts("dmsetup") if "remove ioctl" in output and code == errno.EBUSY)
    result = CommandResult(argv=("dmsetup", "remove", "thin-1"), returncode=1,
                           stdout="", stderr=busy, seconds=0.01)
    failed = DMSETUP_ERRORS.failure(result)
    assert isinstance(failed, CommandFailed)
    assert str(failed) == str(CommandFailed(result)) == (
        "dmsetup remove thin-1 exited 1: device-mapper: remove ioctl on thin-1  failed: "
        "Device or resource busy; Command failed.")
    assert (failed.errno, failed.reason) == (errno.EBUSY, "EBUSY")
    assert DMSETUP_ERRORS.failure(CommandResult(("dmsetup",), 1, "", "Command failed.\n", 0.0)).reason == "unknown"


# -- failures made for real on this host ------------------------------------------------------


def test_losetup_on_what_is_not_a_loop_device() -> None:
    with pytest.raises(ToolFailed) as raised:
        loop.refresh_capacity("/dev/null")
    assert raised.value.errno == errno.ENODEV, raised.value
    assert str(raised.value) == "losetup -c /dev/null exited 1: losetup: /dev/null: failed to use device: No such device"


def test_filesystem_tools_on_what_they_cannot_use(tmp_path: Path) -> None:
    """The errno reaches the caller (flush_filesystem's HazardError keeps it as its cause)."""
    cases = [
        (lambda: filesystem.flush_buffers("/dev/null", timeout=10), errno.ENOTTY),
        (lambda: filesystem.grow_xfs(tmp_path, timeout=30), errno.EINVAL),
        (lambda: filesystem.make_xfs(tmp_path / "missing" / "pool_data", timeout=30), errno.ENOENT),
        (lambda: filesystem.flush_filesystem(tmp_path / "missing", timeout=10), errno.ENOENT),
    ]
    for call, expected in cases:
        with pytest.raises((CommandFailed, HazardError)) as raised:
            call()
        failed = raised.value if isinstance(raised.value, ToolFailed) else raised.value.__cause__
        assert isinstance(failed, ToolFailed) and failed.errno == expected, raised.value


def test_blkid_probe_tells_nothing_found_from_a_signature(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 20))
    assert filesystem.probe(blank, timeout=30) == filesystem.Probe(fields={}, nothing_found=True)
    formatted = tmp_path / "xfs"
    with open(formatted, "wb") as fh:
        fh.truncate(300 << 20)
    filesystem.make_xfs(formatted, timeout=120)
    found = filesystem.probe(formatted, timeout=30)
    assert found.fields["TYPE"] == "xfs" and not found.nothing_found


# -- one owner per tool ---------------------------------------------------------------------------

OWNERS = {
    "dmsetup": "devices/dmsetup.py",
    "thin_ls": "devices/dmsetup.py",
    "losetup": "devices/loop.py",
    "mkfs.ext4": "devices/filesystem.py",
    "mkfs.xfs": "devices/filesystem.py",
    "tune2fs": "devices/filesystem.py",
    "e2fsck": "devices/filesystem.py",
    "resize2fs": "devices/filesystem.py",
    "xfs_growfs": "devices/filesystem.py",
    "blkid": "devices/filesystem.py",
    "blockdev": "devices/filesystem.py",
    "blkdiscard": "devices/filesystem.py",
    "sync": "devices/filesystem.py",
    "mount": "devices/mount.py",
    "umount": "devices/mount.py",
    "dmesg": "safeguards/health.py",
}
NOT_KERNEL_TOOLS = {"dot"}  # fsm graph's renderer


def product_files() -> list[Path]:
    """The shipped packages' modules (pyproject's package list; tests, bench and demo set
    up their own scratch devices and are not the product)."""
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*") for pattern in include})
    return sorted(path for package in packages for path in (REPO / package).rglob("*.py"))


def is_argv(node: ast.AST) -> bool:
    """A list literal whose first element is a string: the shape of every argv here."""
    return (isinstance(node, ast.List) and bool(node.elts) and isinstance(node.elts[0], ast.Constant)
            and isinstance(node.elts[0].value, str))


def argv_literals(tree: ast.AST) -> list[ast.List]:
    return [node for node in ast.walk(tree) if is_argv(node)]  # type: ignore[misc]


def test_each_kernel_tool_is_run_by_its_owner_only() -> None:
    files = product_files()
    assert REPO / "devices" / "dmsetup.py" in files and len(files) > 50
    strays = []
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        for node in argv_literals(ast.parse(path.read_text(), relative)):
            tool = node.elts[0].value  # type: ignore[attr-defined]
            if tool in OWNERS and OWNERS[tool] != relative:
                strays.append(f"{relative}:{node.lineno} runs {tool} (owner: {OWNERS[tool]})")
    assert strays == []


def test_every_command_the_product_runs_has_an_owner() -> None:
    """A new tool gets an owner (and an error table) before it gets a caller."""
    unowned = []
    for path in product_files():
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0]
            if name in ("run_command", "run") and is_argv(first):
                tool = first.elts[0].value  # type: ignore[attr-defined]
                if tool not in OWNERS and tool not in NOT_KERNEL_TOOLS:
                    unowned.append(f"{relative}:{node.lineno} runs {tool}")
    assert unowned == []


def test_the_scan_sees_a_stray_caller() -> None:
    """The scan itself: a dmsetup argv outside devices/dmsetup.py is found."""
    stray = ast.parse('from support.proc import run_command\nrun_command(["dmsetup", "remove", name], timeout=5)\n')
    assert [node.elts[0].value for node in argv_literals(stray)] == ["dmsetup"]  # type: ignore[attr-defined]
