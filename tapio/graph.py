"""The pipeline graph: which component instances run, and how they connect.

Invariants (as the OpenTelemetry Collector):
- one running receiver per receiver id, whatever the number of pipelines
  naming it; its output fans out to every pipeline that names it;
- one processor instance per (pipeline, processor id), chained in the order
  the pipeline lists them;
- one running exporter per exporter id, fed by every pipeline naming it;
- one running connector per connector id: fed, like an exporter, by every
  pipeline listing it under exporters, and handing on, like a receiver, to
  every pipeline listing it under receivers (config validation has made
  sure no chain of connectors loops back to where it started).
Building the graph is pure: `tapio graph` renders it without starting
anything, and the runtime wires exactly this graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from tapio.component import ComponentID, Kind, PipelineID
from tapio.pdata import Signal


@dataclass(frozen=True)
class Node:
    kind: Kind
    id: ComponentID
    #: for processors: the pipeline owning this instance
    pipeline: PipelineID | None = None

    @property
    def key(self) -> str:
        """A unique, readable name: ``receiver:otlp``, ``processor:logs batch`` (pipeline, a space, the id).

        Ids and pipeline names never contain spaces, so the key is unambiguous
        (``logs/batch`` + ``x`` and ``logs`` + ``batch/x`` differ).
        """
        if self.pipeline is not None:
            return f"{self.kind.value}:{self.pipeline} {self.id}"
        return f"{self.kind.value}:{self.id}"


@dataclass
class PipelineGraph:
    id: PipelineID
    receivers: list[Node]
    processors: list[Node]
    exporters: list[Node]

    @property
    def signal(self) -> Signal:
        return self.id.signal


@dataclass
class Graph:
    receivers: dict[ComponentID, Node] = field(default_factory=dict)
    exporters: dict[ComponentID, Node] = field(default_factory=dict)
    connectors: dict[ComponentID, Node] = field(default_factory=dict)
    pipelines: dict[PipelineID, PipelineGraph] = field(default_factory=dict)

    def receiver_signals(self, rid: ComponentID) -> frozenset[Signal]:
        return frozenset(p.signal for p in self.pipelines.values() if any(n.id == rid for n in p.receivers))

    def exporter_signals(self, eid: ComponentID) -> frozenset[Signal]:
        return frozenset(p.signal for p in self.pipelines.values() if any(n.id == eid for n in p.exporters))

    def edges(self) -> list[tuple[Node, Node, str]]:
        """Every connection once, labelled with the signals of the pipelines that use it."""
        labels: dict[tuple[str, str], tuple[Node, Node, set[Signal]]] = {}

        def add(a: Node, b: Node, sig: Signal) -> None:
            labels.setdefault((a.key, b.key), (a, b, set()))[2].add(sig)

        for p in self.pipelines.values():
            stages = [p.receivers, *([n] for n in p.processors), p.exporters]
            for srcs, dsts in zip(stages, stages[1:]):
                for a in srcs:
                    for b in dsts:
                        add(a, b, p.signal)
        return [(a, b, ",".join(s.value for s in sorted(sigs))) for a, b, sigs in labels.values()]


def build_graph(pipelines: dict[PipelineID, Any], connectors: Iterable[ComponentID] = ()) -> Graph:
    """Build the graph from ``service.pipelines`` (values have receivers/processors/exporters id lists).

    ``connectors`` are the ids that name connectors (in a pipeline's
    receivers or exporters list); every other id there is a receiver or an
    exporter.
    """
    g = Graph()
    is_connector = set(connectors)

    def end(cid: ComponentID, kind: Kind, nodes: dict[ComponentID, Node]) -> Node:
        if cid in is_connector:
            return g.connectors.setdefault(cid, Node(Kind.CONNECTOR, cid))
        return nodes.setdefault(cid, Node(kind, cid))

    for pid, pcfg in pipelines.items():
        receivers = [end(rid, Kind.RECEIVER, g.receivers) for rid in pcfg.receivers]
        processors = [Node(Kind.PROCESSOR, prid, pid) for prid in pcfg.processors]
        exporters = [end(eid, Kind.EXPORTER, g.exporters) for eid in pcfg.exporters]
        g.pipelines[pid] = PipelineGraph(pid, receivers, processors, exporters)
    return g


class _MermaidIds:
    """Readable Mermaid node ids (non-alphanumerics become ``_``), made unique where two keys sanitize alike."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, key: str) -> str:
        if key not in self._ids:
            base = "".join(c if c.isalnum() else "_" for c in key)
            ident, n = base, 2
            while ident in self._taken:
                ident, n = f"{base}_{n}", n + 1
            self._ids[key] = ident
            self._taken.add(ident)
        return self._ids[key]


def _mermaid_text(text: object) -> str:
    return str(text).replace('"', "#quot;")


def to_mermaid(g: Graph) -> str:
    """The graph as a Mermaid flowchart (paste into any Markdown that renders Mermaid)."""
    mid = _MermaidIds()
    lines = ["flowchart LR"]
    for rid, node in sorted(g.receivers.items()):
        lines.append(f'  {mid(node.key)}[["receiver {_mermaid_text(rid)}"]]')
    for pid, p in sorted(g.pipelines.items()):
        if p.processors:
            lines.append(f'  subgraph {mid("pipeline:" + str(pid))}["pipeline {_mermaid_text(pid)}"]')
            for n in p.processors:
                lines.append(f'    {mid(n.key)}("{_mermaid_text(n.id)}")')
            lines.append("  end")
    for eid, node in sorted(g.exporters.items()):
        lines.append(f'  {mid(node.key)}[/"exporter {_mermaid_text(eid)}"/]')
    for cid, node in sorted(g.connectors.items()):
        lines.append(f'  {mid(node.key)}{{{{"connector {_mermaid_text(cid)}"}}}}')
    for a, b, label in g.edges():
        lines.append(f"  {mid(a.key)} -->|{label}| {mid(b.key)}")
    return "\n".join(lines) + "\n"


def _dot(text: object) -> str:
    """A DOT double-quoted string's content."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


def to_dot(g: Graph) -> str:
    """The graph in Graphviz DOT (``tapio graph --format dot | dot -Tsvg``)."""
    lines = ["digraph tapio {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for rid, node in sorted(g.receivers.items()):
        lines.append(f'  "{_dot(node.key)}" [label="receiver\\n{_dot(rid)}", shape=box, style=rounded];')
    for pid, p in sorted(g.pipelines.items()):
        if p.processors:
            lines.append(f'  subgraph "cluster_{_dot(pid)}" {{')
            lines.append(f'    label="pipeline {_dot(pid)}";')
            for n in p.processors:
                lines.append(f'    "{_dot(n.key)}" [label="{_dot(n.id)}", shape=ellipse];')
            lines.append("  }")
    for eid, node in sorted(g.exporters.items()):
        lines.append(f'  "{_dot(node.key)}" [label="exporter\\n{_dot(eid)}", shape=box];')
    for cid, node in sorted(g.connectors.items()):
        lines.append(f'  "{_dot(node.key)}" [label="connector\\n{_dot(cid)}", shape=hexagon];')
    for a, b, label in g.edges():
        lines.append(f'  "{_dot(a.key)}" -> "{_dot(b.key)}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
