"""Draws a workflow from its own definition with transitions' GraphMachine."""

from __future__ import annotations

import tempfile
from pathlib import Path

from transitions.extensions import GraphMachine

from fsm.definition import Workflow
from fsm.machine import transition_table
from support.errors import ManagerError
from support.proc import run_command

DOT_TIMEOUT = 60.0


class _Diagram:
    """The model GraphMachine draws for (an empty object: no job state is involved)."""


def render_graph(workflow: Workflow, fmt: str = "mermaid") -> bytes:
    """Mermaid text (no Graphviz needed), or PNG/SVG bytes: GraphMachine writes the DOT
    source (pip `graphviz`) and Graphviz's `dot` (Debian `graphviz`) draws it."""
    engine = "mermaid" if fmt == "mermaid" else "graphviz"
    try:
        diagram = _Diagram()
        GraphMachine(
            model=diagram, states=workflow.state_names, transitions=transition_table(workflow),
            initial=workflow.initial, auto_transitions=False, graph_engine=engine,
            title=f"{workflow.name} workflow", show_conditions=True,
        )
        source: str = diagram.get_graph().source  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ManagerError(f"--format {fmt} needs Graphviz (pip install graphviz; apt-get install graphviz): {exc}") from None
    if fmt == "mermaid":
        return source.encode()
    return draw_dot(source, fmt)


def draw_dot(source: str, fmt: str) -> bytes:
    """`dot -T<fmt>` on DOT `source`; the drawing goes through a file since it may be binary."""
    with tempfile.TemporaryDirectory(prefix="fsm-graph-") as tmp:
        out = Path(tmp) / f"graph.{fmt}"
        try:
            run_command(["dot", f"-T{fmt}", "-o", str(out)], input_text=source, timeout=DOT_TIMEOUT)
        except ManagerError as exc:
            raise ManagerError(f"drawing the graph as {fmt} failed (apt-get install graphviz): {exc}") from None
        return out.read_bytes()
