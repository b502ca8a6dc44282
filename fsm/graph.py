"""Draws a workflow from its own definition with transitions' GraphMachine."""

from __future__ import annotations

import io

from transitions.extensions import GraphMachine

from fsm.definition import Workflow
from fsm.machine import transition_table
from support.errors import ManagerError


class _Diagram:
    """The model GraphMachine draws for (an empty object: no job state is involved)."""


def render_graph(workflow: Workflow, fmt: str = "mermaid") -> bytes:
    """Mermaid text (no Graphviz needed), or PNG/SVG bytes through Graphviz."""
    engine = "mermaid" if fmt == "mermaid" else "graphviz"
    try:
        diagram = _Diagram()
        GraphMachine(
            model=diagram, states=workflow.state_names, transitions=transition_table(workflow),
            initial=workflow.initial, auto_transitions=False, graph_engine=engine,
            title=f"{workflow.name} workflow", show_conditions=True,
        )
        graph = diagram.get_graph()  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ManagerError(f"--format {fmt} needs Graphviz (pip install graphviz; apt-get install graphviz): {exc}") from None
    if fmt == "mermaid":
        return graph.source.encode()
    out = io.BytesIO()
    try:
        graph.draw(out, format=fmt, prog="dot")
    except Exception as exc:
        raise ManagerError(f"drawing the graph as {fmt} failed: {exc}") from None
    return out.getvalue()
