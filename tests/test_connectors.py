"""Connectors: defined under ``connectors:``, validated on both sides of the pipelines they join, run and drained in order."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tapio.builtin import default_registry
from tapio.component import ComponentID, Factory, Kind, PipelineID, Registry
from tapio.config import ConfigError, load_config
from tapio.connectors.forward import factory as forward_factory
from tapio.graph import build_graph, to_dot, to_mermaid
from tapio.pdata import Signal
from tapio.service import RuntimeOptions, Service
from tapio.telemetry import Telemetry
from tapio.testing.batches import log_batch, log_bodies, numbered

from .test_service import Empty, World, make_registry


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(path: str, registry: Registry | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config([path], registry or default_registry(), env={})
    return [str(p) for p in info.value.errors]


SHARED_TAIL = """\
receivers:
  otlp: {}
  otlp/2: {protocols: {http: {endpoint: "127.0.0.1:4319"}}}
processors:
  batch: {}
exporters:
  debug: {}
connectors:
  forward: {}
service:
  pipelines:
    logs/a: {receivers: [otlp], exporters: [forward]}
    logs/b: {receivers: [otlp/2], exporters: [forward, debug]}
    logs: {receivers: [forward], processors: [batch], exporters: [debug]}
"""


# ---------------------------------------------------------------- config


def test_a_connector_on_both_sides_loads_and_is_drawn(tmp_path):
    cfg = load_config([write(tmp_path, SHARED_TAIL)], default_registry(), env={})
    assert ComponentID("forward") in cfg.connectors
    g = build_graph(cfg.service.pipelines, cfg.connectors)
    assert list(g.connectors) == [ComponentID("forward")] and ComponentID("forward") not in g.receivers | g.exporters
    mermaid = to_mermaid(g)
    assert 'connector_forward{{"connector forward"}}' in mermaid
    assert "exporter_debug" in mermaid and "connector_forward -->|logs| processor_logs_batch" in mermaid
    assert "receiver_otlp -->|logs| connector_forward" in mermaid
    assert '"connector:forward" [label="connector\\nforward", shape=hexagon];' in to_dot(g)


def test_a_connector_used_on_one_side_only_is_an_error_at_its_listing(tmp_path):
    text = SHARED_TAIL.replace("    logs: {receivers: [forward], processors: [batch], exporters: [debug]}\n", "")
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:12:45: service.pipelines.logs/a.exporters[0]: connector 'forward' is used as an exporter but not listed "
        "under the receivers of any pipeline: a connector joins the end of one pipeline to the start of another"
    ]


def test_a_signal_pair_the_connector_does_not_join_is_an_error(tmp_path):
    text = SHARED_TAIL.replace("    logs: {receivers: [forward]", "    traces: {receivers: [forward]")
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:14:26: service.pipelines.traces.receivers[0]: connector 'forward' cannot connect logs (from pipeline logs/a) "
        "to traces (it connects: logs → logs, metrics → metrics, traces → traces)",
        f"{path}:14:26: service.pipelines.traces.receivers[0]: connector 'forward' cannot connect logs (from pipeline logs/b) "
        "to traces (it connects: logs → logs, metrics → metrics, traces → traces)",
    ]


def test_connectors_that_lead_a_pipeline_back_into_itself_are_an_error(tmp_path):
    path = write(tmp_path, """\
        receivers:
          otlp: {}
        exporters:
          debug: {}
        connectors:
          forward: {}
          forward/back: {}
        service:
          pipelines:
            logs/a: {receivers: [otlp, forward/back], exporters: [forward]}
            logs/b: {receivers: [forward], exporters: [forward/back, debug]}
        """)
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:10:")
    assert "connectors make a cycle of pipelines: logs/a → logs/b → logs/a; data would loop forever" in problem


def test_a_connector_id_that_is_also_a_receiver_id_is_ambiguous(tmp_path):
    text = SHARED_TAIL.replace("  otlp/2: {protocols", "  forward: {}\n  otlp/2: {protocols")
    path = write(tmp_path, text)
    assert f"{path}:10:3: connectors.forward: 'forward' is both a connector and a receiver: rename one, so pipelines can say which they mean" in problems(path)


def test_a_misspelled_connector_suggests_it(tmp_path):
    path = write(tmp_path, SHARED_TAIL.replace("logs: {receivers: [forward]", "logs: {receivers: [forwrd]"))
    assert any("receiver 'forwrd' is not defined in receivers; did you mean 'forward'?" in p for p in problems(path))


def _logs_to_metrics_registry() -> Registry:
    class Never:
        def __init__(self, *args):  # pragma: no cover - configs only
            pass

    count = Factory(type="count", kind=Kind.CONNECTOR, config_class=Empty, signals=frozenset({Signal.LOGS}),
                    connects=frozenset({(Signal.LOGS, Signal.METRICS)}), create=Never, description="test")
    return Registry([*default_registry().all(), count])


def test_a_connector_in_a_pipeline_of_a_signal_it_does_not_take_or_emit(tmp_path):
    path = write(tmp_path, """\
        receivers:
          otlp: {}
        exporters:
          debug: {}
        connectors:
          count: {}
        service:
          pipelines:
            traces: {receivers: [otlp], exporters: [count]}
            logs: {receivers: [count], exporters: [debug]}
        """)
    assert problems(path, _logs_to_metrics_registry())[:2] == [
        f"{path}:9:45: service.pipelines.traces.exporters[0]: connector 'count' does not take traces (it connects: logs → metrics)",
        f"{path}:10:24: service.pipelines.logs.receivers[0]: connector 'count' does not emit logs (it connects: logs → metrics)",
    ]


def test_a_connector_factory_declares_its_pairs():
    with pytest.raises(ValueError, match="declares the signal pairs"):
        Factory(type="x", kind=Kind.CONNECTOR, config_class=Empty, signals=frozenset({Signal.LOGS}), create=lambda *a: None, description="x")
    with pytest.raises(ValueError, match="'from' sides"):
        Factory(type="x", kind=Kind.CONNECTOR, config_class=Empty, signals=frozenset(Signal),
                connects=frozenset({(Signal.LOGS, Signal.METRICS)}), create=lambda *a: None, description="x")


# ---------------------------------------------------------------- running


@dataclass
class P:
    receivers: list
    processors: list
    exporters: list


def service_with_forward(world: World, pipelines: dict[str, tuple[list[str], list[str], list[str]]], connectors=("forward",)) -> Service:
    conn = {ComponentID.parse(c) for c in connectors}
    pl = {PipelineID.parse(k): P(*[[ComponentID.parse(x) for x in ids] for ids in v]) for k, v in pipelines.items()}
    comps: dict[Kind, dict] = {Kind.RECEIVER: {}, Kind.PROCESSOR: {}, Kind.EXPORTER: {}, Kind.CONNECTOR: {c: forward_factory.config_class() for c in conn}}
    for p in pl.values():
        for kind, ids in ((Kind.RECEIVER, p.receivers), (Kind.PROCESSOR, p.processors), (Kind.EXPORTER, p.exporters)):
            for i in ids:
                if i not in conn:
                    comps[kind][i] = Empty()
    registry = Registry([*make_registry(world).all(), forward_factory])
    return Service(pipelines=pl, components=comps, registry=registry, telemetry=Telemetry(), options=RuntimeOptions())


async def test_batches_cross_a_connector_and_end_of_stream_flows_through_it():
    world = World()
    svc = service_with_forward(world, {
        "logs/a": (["src"], ["pass"], ["forward"]),
        "logs/b": (["src/2"], [], ["forward", "rec/b"]),
        # hoard holds everything until end of stream: only a drained connector lets it flush
        "logs": (["forward"], ["hoard"], ["rec"]),
    })
    delivered: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        sent_a = numbered(20, "a")
        batch = log_batch(sent_a)
        batch.on_done.append(delivered.append)
        await world.sources["src"].send(batch)
        await world.sources["src/2"].send(log_batch(numbered(5, "b")))
        await world.wait_until(lambda: sum(b.count for b in world.exported.get("rec/b", [])) == 5)
        assert "rec" not in world.exported  # still held by hoard
        svc.shutdown()
    assert sorted(log_bodies(world.exported["rec"])) == sorted(sent_a + numbered(5, "b"))
    assert delivered == [True]  # the source heard back once the pipeline after the connector delivered
    assert svc.telemetry.value("tapio_connector_emitted_log_records_total", connector="forward") == 25
    assert world.flushed == ["hoard"]


async def test_a_pipeline_fed_by_a_receiver_and_a_connector_ends_after_both():
    world = World()
    svc = service_with_forward(world, {
        "logs/a": (["src"], ["hoard"], ["forward"]),
        "logs": (["src/2", "forward"], ["hoard"], ["rec"]),
    })
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await world.sources["src"].send(log_batch(numbered(7, "a")))
        await world.sources["src/2"].send(log_batch(numbered(3, "b")))
        await world.wait_until(lambda: len(world.runs) >= 2)
        svc.shutdown()
    # logs/a's hoard flushed into the connector after the receivers stopped; logs' hoard still took it
    assert sorted(log_bodies(world.exported["rec"])) == sorted(numbered(7, "a") + numbered(3, "b"))
    assert world.flushed == ["hoard", "hoard"]
