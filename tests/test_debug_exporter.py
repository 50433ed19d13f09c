"""The debug exporter: its three verbosities, sampling, counting, and its output streams."""

from __future__ import annotations

import io
import logging
import re

import trio
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tapio.component import ComponentID, Kind, Ports, Settings, config_problems
from tapio.exporters.debug import (
    DebugConfig,
    DebugExporter,
    Sampler,
    factory,
    format_basic,
    format_detailed,
    format_normal,
    format_time,
)
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tests.test_file_exporter import logs_request, metrics_request, traces_request


def make_settings(telemetry: Telemetry) -> Settings:
    return Settings(
        id=ComponentID("debug"),
        kind=Kind.EXPORTER,
        telemetry=telemetry.for_component("exporter", "debug"),
        logger=logging.getLogger("tapio.test.debug"),
    )


async def run_debug(config: DebugConfig, batches: list[Batch], telemetry: Telemetry | None = None) -> str:
    telemetry = telemetry or Telemetry()
    out = io.StringIO()
    send, receive = trio.open_memory_channel[Batch](len(batches) + 1)
    exporter = DebugExporter(make_settings(telemetry), config, Ports(input=receive), stream=out)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            async with send:
                for b in batches:
                    await send.send(b)
    return out.getvalue()


def span_with_everything():
    request = traces_request(1)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.parent_span_id = b"\x09" * 8
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_000_250_000_000
    span.attributes.add(key="http.method").value.string_value = "GET"
    link = span.links.add(trace_id=b"\x02" * 16, span_id=b"\x03" * 8)
    link.attributes.add(key="l").value.int_value = 1
    span.status.message = "fine"
    return request


async def test_basic_prints_one_line_per_batch():
    telemetry = Telemetry()
    batches = [Batch.of(Signal.LOGS, logs_request(3)), Batch.of(Signal.TRACES, traces_request(2)), Batch.of(Signal.METRICS, metrics_request(4))]
    text = await run_debug(DebugConfig(sampling_initial=100), batches, telemetry)
    assert text.splitlines() == [
        "logs: 3 log records from 1 resource",
        "traces: 2 spans from 1 resource",
        "metrics: 5 metric points from 1 resource",
    ]
    assert telemetry.value("tapio_exporter_sent_log_records_total", exporter="debug") == 3
    assert telemetry.value("tapio_exporter_sent_spans_total", exporter="debug") == 2
    assert telemetry.value("tapio_exporter_sent_metric_points_total", exporter="debug") == 5


async def test_normal_prints_one_line_per_item():
    logs = logs_request(2)
    logs.resource_logs[0].scope_logs[0].log_records[1].severity_text = "warning"
    text = await run_debug(
        DebugConfig(verbosity="normal"),
        [Batch.of(Signal.LOGS, logs), Batch.of(Signal.TRACES, span_with_everything()), Batch.of(Signal.METRICS, metrics_request(2))],
    )
    lines = text.splitlines()
    assert lines[0] == "2023-11-14 22:13:20 +0000 UTC INFO record 0 i=0"
    assert lines[1] == "2023-11-14 22:13:20.000000001 +0000 UTC warning record 1 i=1"
    assert lines[2] == "span 0 " + "01" * 16 + " " + "01" * 8 + " 250ms Ok http.method=GET"
    assert lines[3:] == ["g {} 0.0", "g {} 1.0", "h {} count=2"]


async def test_detailed_prints_every_field():
    text = await run_debug(
        DebugConfig(verbosity="detailed"),
        [Batch.of(Signal.LOGS, logs_request(1)), Batch.of(Signal.TRACES, span_with_everything()), Batch.of(Signal.METRICS, metrics_request(1))],
    )
    for expected in [
        "ResourceLog #0",
        "     -> service.name: Str(tapio-test)",
        "LogRecord #0",
        "Timestamp: 2023-11-14 22:13:20 +0000 UTC",
        "SeverityNumber: INFO(9)",
        "Body: Str(record 0)",
        "     -> i: Int(0)",
        "Trace ID: " + "00" * 16,
        "Span #0",
        "    Parent ID      : " + "09" * 8,
        "    Kind           : Server",
        "    End time       : 2023-11-14 22:13:20.250000000 +0000 UTC",
        "    Status message : fine",
        "SpanEvent #0",
        "     -> Name: e",
        "SpanLink #0",
        "     -> Trace ID: " + "02" * 16,
        "          -> l: Int(1)",
        "     -> DataType: Gauge",
        "Value: 0.0",
        "     -> DataType: Histogram",
        "     -> AggregationTemporality: Unspecified",
        "ExplicitBounds #0: 1.0",
        "Buckets #1, Count: 1",
    ]:
        assert expected in text.splitlines(), expected


def test_value_formats():
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    from tapio.exporters.debug import format_value

    assert format_value(AnyValue(bool_value=True)) == "Bool(true)"
    assert format_value(AnyValue(double_value=1.5)) == "Double(1.5)"
    assert format_value(AnyValue(bytes_value=b"\xff")) == "Bytes(/w==)"
    assert format_value(AnyValue()) == "Empty()"
    nested = AnyValue(kvlist_value={"values": [{"key": "a", "value": {"array_value": {"values": [{"int_value": 1}, {"string_value": "x"}]}}}]})
    assert format_value(nested) == 'Map({"a":[1,"x"]})'
    assert format_time(0) == "1970-01-01 00:00:00 +0000 UTC"
    assert format_time(2**64 - 1).endswith("ns") or format_time(2**64 - 1).startswith("2554")


def test_sampler_is_per_second():
    s = Sampler(initial=2, thereafter=3)
    assert [s.allow(10.0 + i / 100) for i in range(10)] == [True, True, False, False, True, False, False, True, False, False]
    assert s.allow(11.0) and s.allow(11.5) and not s.allow(11.6)  # a new second starts over
    none_after = Sampler(initial=1, thereafter=0)
    assert [none_after.allow(5.0) for _ in range(4)] == [True, False, False, False]


async def test_sampling_limits_output_but_not_counting(mock_clock):
    # virtual time stands still (rate 0, no autojump): all ten batches fall in one second
    telemetry = Telemetry()
    batches = [Batch.of(Signal.LOGS, logs_request(1)) for _ in range(10)]
    done = []
    for b in batches:
        b.on_done.append(done.append)
    text = await run_debug(DebugConfig(sampling_initial=2, sampling_thereafter=4), batches, telemetry)
    assert len(text.splitlines()) == 4  # batches 1, 2, 6, 10 of the same second
    assert telemetry.value("tapio_exporter_sent_log_records_total", exporter="debug") == 10
    assert done == [True] * 10


async def test_output_defaults_to_stderr_or_stdout(capsys):
    for output in ("stderr", "stdout"):
        send, receive = trio.open_memory_channel[Batch](1)
        exporter = factory.create(make_settings(Telemetry()), DebugConfig(output=output), Ports(input=receive))
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            async with send:
                await send.send(Batch.of(Signal.LOGS, logs_request(1)))
        captured = capsys.readouterr()
        assert getattr(captured, "err" if output == "stderr" else "out") == "logs: 1 log records from 1 resource\n"
        assert getattr(captured, "out" if output == "stderr" else "err") == ""


async def test_broken_output_is_logged_once_and_survived(caplog):
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    telemetry = Telemetry()
    send, receive = trio.open_memory_channel[Batch](3)
    exporter = DebugExporter(make_settings(telemetry), DebugConfig(), Ports(input=receive), stream=Broken())
    with caplog.at_level(logging.WARNING, logger="tapio.test.debug"), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            async with send:
                for _ in range(3):
                    await send.send(Batch.of(Signal.LOGS, logs_request(1)))
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1
    assert telemetry.value("tapio_exporter_sent_log_records_total", exporter="debug") == 3


def test_config_validation():
    assert config_problems(DebugConfig()) == []
    problems = config_problems(DebugConfig(verbosity="loud", sampling_initial=-1, sampling_thereafter=-2, output="file"))  # type: ignore[arg-type]
    assert problems == [
        "verbosity: must be basic, normal or detailed, got 'loud'",
        "sampling_initial: must be 0 or more, got -1",
        "sampling_thereafter: must be 0 or more, got -2",
        "output: must be stderr or stdout, got 'file'",
    ]
    assert factory.type == "debug" and factory.signals == frozenset(Signal)
    assert factory.summary(DebugConfig()) == "basic to stderr"
    assert re.match(r"Prints", factory.description)


@given(kind=st.integers(-(2**31), 2**31 - 1), code=st.integers(-(2**31), 2**31 - 1), temporality=st.integers(-(2**31), 2**31 - 1))
def test_every_formatter_survives_enum_values_out_of_range(kind, code, temporality):
    # open enums: a peer can send any int32 (negative too) for span kind, status code and temporality
    span = ExportTraceServiceRequest(resource_spans=[{"scope_spans": [{"spans": [{"name": "s", "kind": kind, "status": {"code": code}}]}]}])
    metric = ExportMetricsServiceRequest(
        resource_metrics=[{"scope_metrics": [{"metrics": [{"name": "m", "sum": {"aggregation_temporality": temporality, "data_points": [{"as_int": 1}]}}]}]}]
    )
    for batch in (Batch.of(Signal.TRACES, span), Batch.of(Signal.METRICS, metric)):
        for render in (format_basic, format_normal, format_detailed):
            assert render(batch).endswith("\n")
