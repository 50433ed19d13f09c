"""The pipeline graph: which component instances run, and how they connect.

Invariants (as the OpenTelemetry Collector):
- one running receiver per receiver id, whatever the number of pipelines
  naming it; its output fans out to every pipeline that names it;
- one processor instance per (pipeline, processor id), chained in the order
  the pipeline lists them;
- one running exporter per exporter id, fed by every pipeline naming it.
Building the graph is pure: `tapio graph` renders it without starting
anything, and the runtime wires exactly this graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        """A unique, readable name: ``receiver:otlp``, ``processor:logs/batch``."""
        if self.pipeline is not None:
            return f"{self.kind.value}:{self.pipeline}/{self.id}"
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
    pipelines: dict[PipelineID, PipelineGraph] = field(default_factory=dict)

    def receiver_signals(self, rid: ComponentID) -> frozenset[Signal]:
        return frozenset(p.signal for p in self.pipelines.values() if any(n.id == rid for n in p.receivers))

    def exporter_signals(self, eid: ComponentID) -> frozenset[Signal]:
        return frozenset(p.signal for p in self.pipelines.values() if any(n.id == eid for n in p.exporters))

    def edges(self) -> list[tuple[Node, Node]]:
        out: list[tuple[Node, Node]] = []
        seen: set[tuple[str, str]] = set()
        for p in self.pipelines.values():
            chain_heads = p.processors[:1] or p.exporters
            for r in p.receivers:
                for h in chain_heads:
                    _add_edge(out, seen, r, h)
            for a, b in zip(p.processors, p.processors[1:]):
                _add_edge(out, seen, a, b)
            if p.processors:
                for e in p.exporters:
                    _add_edge(out, seen, p.processors[-1], e)
        return out


def _add_edge(out: list, seen: set, a: Node, b: Node) -> None:
    if (a.key, b.key) not in seen:
        seen.add((a.key, b.key))
        out.append((a, b))


def build_graph(pipelines: dict[PipelineID, object]) -> Graph:
    """Build the graph from ``service.pipelines`` (values have receivers/processors/exporters id lists)."""
    g = Graph()
    for pid, pcfg in pipelines.items():
        receivers = [g.receivers.setdefault(rid, Node(Kind.RECEIVER, rid)) for rid in pcfg.receivers]
        processors = [Node(Kind.PROCESSOR, prid, pid) for prid in pcfg.processors]
        exporters = [g.exporters.setdefault(eid, Node(Kind.EXPORTER, eid)) for eid in pcfg.exporters]
        g.pipelines[pid] = PipelineGraph(pid, receivers, processors, exporters)
    return g


def _mermaid_id(node: Node) -> str:
    return "".join(c if c.isalnum() else "_" for c in node.key)


def to_mermaid(g: Graph) -> str:
    """The graph as a Mermaid flowchart (paste into any Markdown that renders Mermaid)."""
    lines = ["flowchart LR"]
    for rid, node in sorted(g.receivers.items()):
        lines.append(f'  {_mermaid_id(node)}[["receiver {rid}"]]')
    for pid, p in sorted(g.pipelines.items()):
        if p.processors:
            lines.append(f'  subgraph {_mermaid_id(Node(Kind.PROCESSOR, ComponentID("pipeline"), pid))}["pipeline {pid}"]')
            for n in p.processors:
                lines.append(f'    {_mermaid_id(n)}("{n.id}")')
            lines.append("  end")
    for eid, node in sorted(g.exporters.items()):
        lines.append(f'  {_mermaid_id(node)}[/"exporter {eid}"/]')
    for a, b in g.edges():
        label = _edge_label(g, a, b)
        lines.append(f"  {_mermaid_id(a)} -->|{label}| {_mermaid_id(b)}")
    return "\n".join(lines) + "\n"


def to_dot(g: Graph) -> str:
    """The graph in Graphviz DOT (``tapio graph --format dot | dot -Tsvg``)."""
    lines = ["digraph tapio {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for rid, node in sorted(g.receivers.items()):
        lines.append(f'  "{node.key}" [label="receiver\\n{rid}", shape=box, style=rounded];')
    for pid, p in sorted(g.pipelines.items()):
        if p.processors:
            cluster = "".join(c if c.isalnum() else "_" for c in str(pid))
            lines.append(f'  subgraph "cluster_{cluster}" {{')
            lines.append(f'    label="pipeline {pid}";')
            for n in p.processors:
                lines.append(f'    "{n.key}" [label="{n.id}", shape=ellipse];')
            lines.append("  }")
    for eid, node in sorted(g.exporters.items()):
        lines.append(f'  "{node.key}" [label="exporter\\n{eid}", shape=box];')
    for a, b in g.edges():
        lines.append(f'  "{a.key}" -> "{b.key}" [label="{_edge_label(g, a, b)}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edge_label(g: Graph, a: Node, b: Node) -> str:
    if b.pipeline is not None:
        return b.pipeline.signal.value
    if a.pipeline is not None:
        return a.pipeline.signal.value
    sigs = g.receiver_signals(a.id) & g.exporter_signals(b.id)
    return ",".join(s.value for s in sorted(sigs, key=lambda s: list(Signal).index(s)))
