"""One vocabulary: the states and events of every workflow are named once (fsm/definition.py
for the engine's, states/names.py for the product's) and taken from there everywhere else.
Pure: reads the product's source with ast, and the workflows' definitions."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from fsm.definition import FinalState, OperatorEvent
from fsm.machine import transition_table
from states.names import IMAGE_WORKFLOW, REBUILT_EVENT, ImageEvent, ImageState, SnapshotEvent, SnapshotState
from states.vm_snapshot import build_snapshot_workflow
from states.workflow import build_image_workflow

REPO = Path(__file__).resolve().parents[1]
DEFINITIONS = {"fsm/definition.py", "states/names.py"}
NAMES = {str(member) for vocabulary in (FinalState, OperatorEvent, ImageState, ImageEvent, SnapshotState, SnapshotEvent)
         for member in vocabulary} | {REBUILT_EVENT}

# Where a bare literal equal to a name is not that name: (path or folder/, scope, literal), why beside it.
# `scope` is the enclosing function, or the module-level name assigned; None: anywhere there.
NOT_A_NAME = {
    ("devices/", None, "resume"),                      # `dmsetup resume`: the kernel tool's word
    ("states/workflow.py", "describe", "pending"),     # display text of a layer whose digest is not known yet
    ("states/workflow.py", "LAYER_OUTCOMES", "aborted"),  # display text: `layer 3/5 sha256:8297… aborted`
    ("cli/db_cmds.py", "rebuild_db_cmd", "rebuilt"),   # the result line's first word, `rebuilt: images=...`
}
DATA_KEY_METHODS = {"get", "pop", "setdefault"}


def product_files() -> list[Path]:
    """Every .py file of the packages pyproject.toml ships."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    return sorted(path for package in packages for path in (REPO / package).rglob("*.py"))


class _Literals(ast.NodeVisitor):
    """Collects (line, scope, literal) for every string constant equal to a name, except
    where the literal is plainly something else: a data key (`d["pending"]`,
    `d.get("pending")`, `{"pending": True}`), a member of another enum (DeviceState.UNPACKING
    = "unpacking"), or the name of a click command (`fsm abort`)."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str | None, str]] = []
        self._scopes: list[str] = []
        self._skip: set[int] = set()

    def _scope(self) -> str | None:
        return self._scopes[-1] if self._scopes else None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._scopes.append(node.name)
        self.generic_visit(node)
        self._scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if any((base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")).endswith("Enum")
               for base in node.bases):
            return  # another vocabulary's definition
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        named = [t.id for t in node.targets if isinstance(t, ast.Name)]
        if not self._scopes and named:
            self._scopes.append(named[0])
            self.generic_visit(node)
            self._scopes.pop()
        else:
            self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        self._skip.update(id(key) for key in node.keys if key is not None)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self._skip.add(id(node.slice))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        if node.args and method in DATA_KEY_METHODS | {"command"}:
            self._skip.add(id(node.args[0]))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in NAMES and id(node) not in self._skip:
            self.found.append((node.lineno, self._scope(), node.value))


def _allowed(path: str, scope: str | None, literal: str) -> bool:
    return any((path == where or (where.endswith("/") and path.startswith(where)))
               and (within is None or within == scope) and literal == name
               for where, within, name in NOT_A_NAME)


def test_no_state_or_event_name_is_a_bare_literal_outside_the_definitions() -> None:
    offenders = []
    for path in product_files():
        relative = path.relative_to(REPO).as_posix()
        if relative in DEFINITIONS:
            continue
        visitor = _Literals()
        visitor.visit(ast.parse(path.read_text(), filename=relative))
        offenders += [f"{relative}:{line}: {literal!r} (in {scope})" for line, scope, literal in visitor.found
                      if not _allowed(relative, scope, literal)]
    assert offenders == [], "take these names from states/names.py or fsm/definition.py:\n" + "\n".join(offenders)


def test_the_scan_sees_a_bare_name() -> None:
    visitor = _Literals()
    visitor.visit(ast.parse('def f(job):\n    return job.state == "complete" and d.get("pending") and {"start": 1}\n'))
    assert visitor.found == [(2, "f", "complete")]


def test_each_workflow_uses_exactly_its_vocabulary() -> None:
    for workflow, states, events in ((build_image_workflow(None), ImageState, ImageEvent),
                                     (build_snapshot_workflow(None), SnapshotState, SnapshotEvent)):
        assert workflow.state_names == [str(s) for s in states], workflow.name
        assert set(workflow.triggers) == {str(e) for e in events}, workflow.name
        drawn = {edge["trigger"] for edge in transition_table(workflow)}
        assert drawn == {str(e) for e in events} | {str(e) for e in OperatorEvent} - (
            set() if workflow.name == IMAGE_WORKFLOW else {OperatorEvent.RESUME.value}), workflow.name


def test_names_are_stored_as_plain_strings() -> None:
    workflow = build_image_workflow(None)
    assert all(type(name) is str for name in workflow.state_names)
    assert all(type(t.trigger) is str and type(t.dest) is str for t in workflow.transitions)
    assert type(workflow.initial) is str
