"""The otlp receiver against real clients: the OpenTelemetry SDK's OTLP exporters, httpx and grpcio."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import re
import typing
import zlib
from pathlib import Path

import grpc
import httpx
import pytest
import trio
import trio.testing
from google.rpc import code_pb2, status_pb2
from hypothesis import given, settings as hsettings, strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tapio.component import ComponentID, Kind, Ports, Refused, Settings, config_problems
from tapio.pdata import Batch, Signal
from tapio.receivers.otlp import factory
from tapio.receivers.otlp._config import Config, GrpcConfig, HttpConfig, Protocols, parse_endpoint
from tapio.receivers.otlp._grpc import SERVICES
from tapio.receivers.otlp._http import TooLarge, decompress
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


def make_settings() -> Settings:
    return Settings(
        id=ComponentID("otlp"),
        kind=Kind.RECEIVER,
        telemetry=Telemetry().for_component("receiver", "otlp"),
        logger=logging.getLogger("test"),
        shutdown_grace=2.0,
    )


def local_config(*, grpc_on: bool = True, http_on: bool = True, **http_kw) -> Config:
    return Config(
        protocols=Protocols(
            grpc=GrpcConfig(endpoint="127.0.0.1:0", max_recv_msg_size_mib=1) if grpc_on else None,
            http=HttpConfig(endpoint="127.0.0.1:0", **http_kw) if http_on else None,
        )
    )


class Receiver:
    def __init__(self, component, settings: Settings, consumer) -> None:
        self.component = component
        self.settings = settings
        self.consumer = consumer

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.component.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.component.grpc_port}"

    def bad_input(self, reason: str) -> float:
        return self.settings.telemetry.telemetry.value("tapio_bad_input_total", reason=reason)


async def start(nursery: trio.Nursery, consumer=None, config: Config | None = None) -> Receiver:
    settings = make_settings()
    consumer = consumer if consumer is not None else RecordingConsumer()
    component = factory.create(settings, config or local_config(), Ports(output=consumer))
    await nursery.start(component.run)
    return Receiver(component, settings, consumer)


class GatedConsumer(RecordingConsumer):
    """A RecordingConsumer that says when a sender is waiting on it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered = trio.Event()
        self.left = trio.Event()

    async def send(self, batch: Batch) -> None:
        self.entered.set()
        try:
            await super().send(batch)
        finally:
            self.left.set()


class ClosedConsumer(RecordingConsumer):
    """A pipeline that has shut down."""

    async def send(self, batch: Batch) -> None:
        raise trio.ClosedResourceError("pipeline closed")


class RefusingConsumer(RecordingConsumer):
    """A pipeline over its memory limit."""

    async def send(self, batch: Batch) -> None:
        raise Refused("memory limit")


def attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


def sdk_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests.otlp")
    with tracer.start_as_current_span("GET /cart", attributes={"http.request.method": "GET", "cart.items": 3}):
        with tracer.start_as_current_span("SELECT carts"):
            pass
    provider.shutdown()
    return exporter.get_finished_spans()


def sdk_logs():
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("tests.otlp")
    logger.emit(body="payment declined", severity_text="WARN", attributes={"order.id": "o-17", "amount": 12.5})
    logger.emit(body="payment retried", attributes={"order.id": "o-17"})
    provider.shutdown()
    return exporter.get_finished_logs()


def sdk_metrics():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "checkout"}))
    meter = provider.get_meter("tests.otlp")
    counter = meter.create_counter("orders", unit="1")
    counter.add(5, {"region": "eu"})
    counter.add(2, {"region": "us"})
    meter.create_histogram("latency", unit="ms").record(42.0, {"route": "/cart"})
    data = reader.get_metrics_data()
    provider.shutdown()
    return data


def check_traces(consumer: RecordingConsumer) -> None:
    (request,) = consumer.requests()
    (rs,) = request.resource_spans
    assert attrs(rs.resource.attributes)["service.name"] == "checkout"
    spans = {s.name: s for ss in rs.scope_spans for s in ss.spans}
    assert set(spans) == {"GET /cart", "SELECT carts"}
    assert attrs(spans["GET /cart"].attributes) == {"http.request.method": "GET", "cart.items": 3}
    assert spans["SELECT carts"].parent_span_id == spans["GET /cart"].span_id
    assert rs.scope_spans[0].scope.name == "tests.otlp"
    assert consumer.batches[0].signal is Signal.TRACES and consumer.batches[0].count == 2


def check_logs(consumer: RecordingConsumer) -> None:
    (request,) = consumer.requests()
    records = [r for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    assert [r.body.string_value for r in records] == ["payment declined", "payment retried"]
    assert attrs(records[0].attributes) == {"order.id": "o-17", "amount": 12.5}
    assert records[0].severity_text == "WARN"
    assert attrs(request.resource_logs[0].resource.attributes)["service.name"] == "checkout"
    assert consumer.batches[0].count == 2


def check_metrics(consumer: RecordingConsumer) -> None:
    (request,) = consumer.requests()
    metrics = {m.name: m for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    orders = {attrs(p.attributes)["region"]: p.as_int for p in metrics["orders"].sum.data_points}
    assert orders == {"eu": 5, "us": 2}
    assert metrics["orders"].sum.is_monotonic
    (hist,) = metrics["latency"].histogram.data_points
    assert (hist.count, hist.sum, attrs(hist.attributes)) == (1, 42.0, {"route": "/cart"})
    assert consumer.batches[0].count == 3


async def wait_count(consumer: RecordingConsumer, n: int) -> None:
    with trio.fail_after(10):
        await consumer.wait_for_count(n)


def raw_grpc_call(target: str, signal: Signal, payload: bytes, **kwargs) -> grpc.RpcError | bytes:
    """One unary Export call with raw bytes; returns the response bytes or the error."""
    service = {Signal.TRACES: "trace.v1.TraceService", Signal.METRICS: "metrics.v1.MetricsService", Signal.LOGS: "logs.v1.LogsService"}[signal]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/opentelemetry.proto.collector.{service}/Export")
        try:
            return call(payload, timeout=kwargs.pop("timeout", 10), **kwargs)
        except grpc.RpcError as exc:
            return exc


def log_request(body: str = "hello", n: int = 1) -> ExportLogsServiceRequest:
    records = [LogRecord(body=AnyValue(string_value=f"{body} {i}"), attributes=[KeyValue(key="i", value=AnyValue(int_value=i))]) for i in range(n)]
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(log_records=records)])])


# ---------------------------------------------------------------- official SDK exporters


async def test_grpc_sdk_exporters_deliver_traces_logs_and_metrics(nursery):
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import MetricExportResult
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk._logs.export import LogRecordExportResult
    from grpc import Compression

    spans, logs, metrics = sdk_spans(), sdk_logs(), sdk_metrics()
    for signal, make, items, check, ok in [
        (Signal.TRACES, lambda t: OTLPSpanExporter(endpoint=t, insecure=True, timeout=10), spans, check_traces, SpanExportResult.SUCCESS),
        (Signal.LOGS, lambda t: OTLPLogExporter(endpoint=t, insecure=True, timeout=10, compression=Compression.Gzip), logs, check_logs, LogRecordExportResult.SUCCESS),
        (Signal.METRICS, lambda t: OTLPMetricExporter(endpoint=t, insecure=True, timeout=10), metrics, check_metrics, MetricExportResult.SUCCESS),
    ]:
        receiver = await start(nursery, config=local_config(http_on=False))
        exporter = make(receiver.grpc)
        try:
            result = await trio.to_thread.run_sync(exporter.export, items)
        finally:
            await trio.to_thread.run_sync(exporter.shutdown)
        assert result == ok, signal
        check(receiver.consumer)


async def test_http_sdk_exporters_deliver_traces_logs_and_metrics(nursery):
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import MetricExportResult
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk._logs.export import LogRecordExportResult

    spans, logs, metrics = sdk_spans(), sdk_logs(), sdk_metrics()
    for make, path, items, check, ok in [
        (lambda u: OTLPSpanExporter(endpoint=u, timeout=10, compression=Compression.Gzip), "/v1/traces", spans, check_traces, SpanExportResult.SUCCESS),
        (lambda u: OTLPLogExporter(endpoint=u, timeout=10), "/v1/logs", logs, check_logs, LogRecordExportResult.SUCCESS),
        (lambda u: OTLPMetricExporter(endpoint=u, timeout=10, compression=Compression.Deflate), "/v1/metrics", metrics, check_metrics, MetricExportResult.SUCCESS),
    ]:
        receiver = await start(nursery, config=local_config(grpc_on=False))
        exporter = make(receiver.http + path)
        try:
            result = await trio.to_thread.run_sync(exporter.export, items)
        finally:
            await trio.to_thread.run_sync(exporter.shutdown)
        assert result == ok, path
        check(receiver.consumer)


# ---------------------------------------------------------------- OTLP/HTTP details


async def test_http_json_request_and_response(nursery):
    receiver = await start(nursery)
    body = {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "cart"}}]},
            "scopeSpans": [{"spans": [{
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174",
                "name": "checkout",
                "kind": 2,
                "startTimeUnixNano": "1544712660000000000",
                "endTimeUnixNano": "1544712661000000000",
                "attributes": [{"key": "items", "value": {"intValue": "3"}}],
            }]}],
        }]
    }
    async with httpx.AsyncClient() as client:
        r = await client.post(receiver.http + "/v1/traces", json=body)
        bad = await client.post(receiver.http + "/v1/traces", content=b'{"resourceSpans": 7}', headers={"content-type": "application/json"})
    assert (r.status_code, r.headers["content-type"], r.json()) == (200, "application/json", {})
    (span,) = receiver.consumer.requests()[0].resource_spans[0].scope_spans[0].spans
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert (span.name, span.kind, span.end_time_unix_nano) == ("checkout", 2, 1544712661000000000)
    assert attrs(span.attributes) == {"items": 3}
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/json"
    assert bad.json()["code"] == 3 and "resourceSpans" in bad.json()["message"]
    assert receiver.bad_input("http_undecodable") == 1


async def test_http_gzip_and_deflate_bodies(nursery):
    receiver = await start(nursery)
    payload = log_request(n=3).SerializeToString()
    async with httpx.AsyncClient() as client:
        for encoding, data in [
            ("gzip", gzip.compress(payload)),
            ("gzip", gzip.compress(payload[:10]) + gzip.compress(payload[10:])),  # two gzip members
            ("deflate", zlib.compress(payload)),
            ("deflate", zlib.compress(payload)[2:-4]),  # raw deflate, as some senders do
        ]:
            r = await client.post(
                receiver.http + "/v1/logs",
                content=data,
                headers={"content-type": "application/x-protobuf", "content-encoding": encoding},
            )
            assert (r.status_code, r.headers["content-type"], r.content) == (200, "application/x-protobuf", b"")
        corrupt = await client.post(receiver.http + "/v1/logs", content=b"\x1f\x8b not gzip", headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"})
        brotli = await client.post(receiver.http + "/v1/logs", content=payload, headers={"content-type": "application/x-protobuf", "content-encoding": "br"})
    assert [len(b.requests[0].resource_logs[0].scope_logs[0].log_records) for b in receiver.consumer.batches] == [3, 3, 3, 3]
    assert all(r == log_request(n=3) for r in receiver.consumer.requests())
    assert corrupt.status_code == 400
    assert brotli.status_code == 415
    assert receiver.bad_input("http_bad_encoding") == 2


async def test_http_oversize_body_and_zip_bomb_get_413(nursery):
    receiver = await start(nursery, config=local_config(max_request_body_size=64 * 1024))
    async with httpx.AsyncClient() as client:
        big = await client.post(receiver.http + "/v1/logs", content=b"\0" * (64 * 1024 + 1), headers={"content-type": "application/x-protobuf"})
        bomb = await client.post(
            receiver.http + "/v1/logs",
            content=gzip.compress(b"\0" * (10 * 1024 * 1024)),  # ~10 KiB on the wire
            headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"},
        )
    assert big.status_code == 413
    assert bomb.status_code == 413
    status = status_pb2.Status.FromString(bomb.content)
    assert status.code == 8 and "decompressed" in status.message
    assert receiver.bad_input("http_body_too_large") == 2  # one from the server (wire), one after decompression
    assert receiver.consumer.batches == []


async def test_http_bad_protobuf_gets_400_with_status(nursery):
    receiver = await start(nursery)
    async with httpx.AsyncClient() as client:
        r = await client.post(receiver.http + "/v1/traces", content=b"\x0a\xff\xff\xff\xff\x0f", headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/x-protobuf"
    status = status_pb2.Status.FromString(r.content)
    assert status.code == 3
    assert "ExportTraceServiceRequest" in status.message
    assert receiver.bad_input("http_undecodable") == 1
    assert receiver.consumer.batches == []


async def test_http_status_codes_for_wrong_requests(nursery):
    receiver = await start(nursery, RecordingConsumer({Signal.LOGS}))
    payload = log_request().SerializeToString()
    proto = {"content-type": "application/x-protobuf"}
    async with httpx.AsyncClient() as client:
        text = await client.post(receiver.http + "/v1/logs", content=payload, headers={"content-type": "text/plain"})
        unwired = await client.post(receiver.http + "/v1/traces", content=ExportTraceServiceRequest().SerializeToString(), headers=proto)
        unknown = await client.post(receiver.http + "/v1/profiles", content=payload, headers=proto)
        get = await client.get(receiver.http + "/v1/logs")
        ok = await client.post(receiver.http + "/v1/logs", content=payload, headers={"content-type": "application/x-protobuf; charset=binary"})
    assert text.status_code == 415
    assert unwired.status_code == 404 and "no pipeline takes traces" in status_pb2.Status.FromString(unwired.content).message
    assert unknown.status_code == 404
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    assert ok.status_code == 200
    assert receiver.bad_input("http_unsupported_media_type") == 1
    assert len(receiver.consumer.batches) == 1


async def test_http_custom_paths(nursery):
    receiver = await start(nursery, config=local_config(grpc_on=False, logs_url_path="/otlp/logs"))
    async with httpx.AsyncClient() as client:
        moved = await client.post(receiver.http + "/v1/logs", content=b"", headers={"content-type": "application/x-protobuf"})
        r = await client.post(receiver.http + "/otlp/logs", content=log_request().SerializeToString(), headers={"content-type": "application/x-protobuf"})
    assert (moved.status_code, r.status_code) == (404, 200)
    assert receiver.consumer.item_count == 1


async def test_http_malformed_http_is_counted(nursery):
    receiver = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", receiver.component.http_port)
        async with stream:
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            reply = await stream.receive_some(1024)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert receiver.bad_input("http_malformed") == 1


def spy_on_decoding(monkeypatch) -> list[bool]:
    """Record, for each body decoded, whether it was decoded on the event loop's thread."""
    import threading

    from tapio.receivers.otlp import _http

    on_loop: list[bool] = []
    real = _http.decode_body

    def recording(*args):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(_http, "decode_body", recording)
    return on_loop


async def test_http_decodes_small_bodies_on_the_loop_and_others_in_a_thread(nursery, monkeypatch):
    from tapio import otlpjson
    from tapio.receivers.otlp._http import INLINE_JSON_BYTES, INLINE_PROTOBUF_BYTES

    on_loop = spy_on_decoding(monkeypatch)
    receiver = await start(nursery)
    small, large = log_request(n=2), log_request(n=2000)
    assert len(small.SerializeToString()) <= INLINE_PROTOBUF_BYTES < len(large.SerializeToString())
    assert len(otlpjson.encode(small)) <= INLINE_JSON_BYTES < len(otlpjson.encode(large))
    proto, js = {"content-type": "application/x-protobuf"}, {"content-type": "application/json"}
    async with httpx.AsyncClient() as client:
        for content, headers in [
            (small.SerializeToString(), proto),
            (large.SerializeToString(), proto),
            (otlpjson.encode(small), js),
            (otlpjson.encode(large), js),
            (gzip.compress(small.SerializeToString()), {**proto, "content-encoding": "gzip"}),  # may inflate to anything
        ]:
            r = await client.post(receiver.http + "/v1/logs", content=content, headers=headers)
            assert r.status_code == 200, r.content
    assert on_loop == [True, False, True, False, False]
    assert receiver.consumer.requests() == [small, large, small, large, small]


async def test_http_json_body_of_40k_records_does_not_stall_the_event_loop(nursery):
    """A task ticking on the loop sees no gap above 100 ms while a 30 MiB OTLP/JSON body is received and decoded.

    Decoded on the loop (or with one json.loads in a thread, which holds the
    GIL throughout) the body stalls the loop for ~2.5 s.
    """
    import gc

    from tapio import otlpjson

    request = log_request(n=40_000)
    for i, record in enumerate(request.resource_logs[0].scope_logs[0].log_records):
        record.body.string_value = f"{i:06d} " + "the quick brown fox jumps over the lazy dog " * 14
        record.attributes.add(key="service.instance.id", value=AnyValue(string_value=f"instance-{i % 97}"))
    body = otlpjson.encode(request)
    assert 28 * 2**20 < len(body) < 40 * 2**20
    receiver = await start(nursery, config=local_config(grpc_on=False, max_request_body_size=64 * 2**20))
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    def post() -> int:
        return httpx.post(receiver.http + "/v1/logs", content=body, headers={"content-type": "application/json"}, timeout=60).status_code

    # the test process holds the whole suite's objects: a full collection over them would be a pause of its own
    gc.collect()
    gc.freeze()
    try:
        nursery.start_soon(ticker)
        status = await trio.to_thread.run_sync(post)
        done.set()
    finally:
        gc.unfreeze()
    assert status == 200
    assert receiver.consumer.requests() == [request]
    assert len(gaps) > 10 and max(gaps) < 0.1, f"longest gap between ticks {max(gaps) * 1000:.0f} ms ({len(gaps)} ticks)"


async def test_http_decode_that_does_not_get_its_turn_in_time_is_retried(nursery, monkeypatch):
    import threading

    from tapio.receivers.otlp import _http

    release = threading.Event()
    real = _http.decode_body

    def slow(*args):
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(_http, "decode_body", slow)
    monkeypatch.setattr(_http, "DECODE_DEADLINE_SECONDS", 0.5)
    receiver = await start(nursery)
    body = log_request(n=2000).SerializeToString()
    try:
        async with httpx.AsyncClient() as client:
            r = await client.post(receiver.http + "/v1/logs", content=body, headers={"content-type": "application/x-protobuf"})
    finally:
        release.set()
    assert (r.status_code, r.headers["retry-after"]) == (503, "1")
    status = status_pb2.Status.FromString(r.content)
    assert status.code == code_pb2.UNAVAILABLE and "busy decoding" in status.message
    assert receiver.consumer.batches == []  # the late decode is dropped: the client sends it again


async def test_http_waits_for_the_pipeline_before_answering(nursery):
    consumer = GatedConsumer()
    consumer.pause()
    receiver = await start(nursery, consumer)
    responses = []
    answered = trio.Event()

    async def post():
        async with httpx.AsyncClient() as client:
            responses.append(await client.post(receiver.http + "/v1/logs", content=log_request().SerializeToString(), headers={"content-type": "application/x-protobuf"}))
        answered.set()

    nursery.start_soon(post)
    with trio.fail_after(10):
        await consumer.entered.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert responses == [] and consumer.batches == []  # not acknowledged while the pipeline is full
    consumer.resume()
    with trio.fail_after(10):
        await answered.wait()
    assert responses[0].status_code == 200
    assert consumer.item_count == 1


async def test_http_refused_by_closed_pipeline_gets_503(nursery):
    receiver = await start(nursery, ClosedConsumer())
    async with httpx.AsyncClient() as client:
        r = await client.post(receiver.http + "/v1/logs", content=log_request().SerializeToString(), headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert status_pb2.Status.FromString(r.content).code == 14


async def test_refused_by_memory_limit_asks_the_client_to_retry(nursery):
    receiver = await start(nursery, RefusingConsumer())
    async with httpx.AsyncClient() as client:
        r = await client.post(receiver.http + "/v1/logs", content=log_request().SerializeToString(), headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "memory limit" in status_pb2.Status.FromString(r.content).message
    result = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request().SerializeToString())
    assert result.code() == grpc.StatusCode.UNAVAILABLE
    assert "refused" in result.details()


async def test_http_request_in_flight_at_shutdown_gets_503():
    consumer = GatedConsumer()
    consumer.pause()
    responses = []
    async with trio.open_nursery() as outer:
        receiver_scope = trio.CancelScope()

        async def run_receiver(task_status):
            with receiver_scope:
                async with trio.open_nursery() as inner:
                    task_status.started(await start(inner, consumer))

        receiver = await outer.start(run_receiver)

        async def post():
            async with httpx.AsyncClient() as client:
                responses.append(await client.post(receiver.http + "/v1/logs", content=log_request().SerializeToString(), headers={"content-type": "application/x-protobuf"}))

        outer.start_soon(post)
        with trio.fail_after(10):
            await consumer.entered.wait()
        receiver_scope.cancel()
    assert responses[0].status_code == 503
    assert consumer.batches == []


# ---------------------------------------------------------------- OTLP/gRPC details


async def test_grpc_status_codes(nursery):
    receiver = await start(nursery, RecordingConsumer({Signal.LOGS}))
    undecodable = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, b"\x0a\xff\xff\xff\xff\x0f")
    unwired = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.TRACES, b"")
    too_big = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request("x" * 1024, n=1100).SerializeToString())
    ok = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request(n=2).SerializeToString())
    assert undecodable.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ExportLogsServiceRequest" in undecodable.details()
    assert unwired.code() == grpc.StatusCode.UNIMPLEMENTED
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ok == b""
    assert receiver.bad_input("grpc_undecodable") == 1
    assert receiver.consumer.item_count == 2


async def test_grpc_waits_for_the_pipeline_before_answering(nursery):
    consumer = GatedConsumer()
    consumer.pause()
    receiver = await start(nursery, consumer)
    results = []
    answered = trio.Event()

    async def call():
        results.append(await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request().SerializeToString()))
        answered.set()

    nursery.start_soon(call)
    with trio.fail_after(10):
        await consumer.entered.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert results == [] and consumer.batches == []  # not acknowledged while the pipeline is full
    consumer.resume()
    with trio.fail_after(10):
        await answered.wait()
    assert results == [b""]
    assert consumer.item_count == 1


async def test_grpc_refused_by_closed_pipeline_is_unavailable(nursery):
    receiver = await start(nursery, ClosedConsumer())
    result = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request().SerializeToString())
    assert result.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_call_in_flight_at_shutdown_is_unavailable():
    consumer = GatedConsumer()
    consumer.pause()
    results = []
    async with trio.open_nursery() as outer:
        receiver_scope = trio.CancelScope()

        async def run_receiver(task_status):
            with receiver_scope:
                async with trio.open_nursery() as inner:
                    task_status.started(await start(inner, consumer))

        receiver = await outer.start(run_receiver)

        async def call():
            results.append(await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request().SerializeToString()))

        outer.start_soon(call)
        with trio.fail_after(10):
            await consumer.entered.wait()
        with trio.fail_after(10):
            receiver_scope.cancel()
    assert results[0].code() == grpc.StatusCode.UNAVAILABLE
    assert consumer.batches == []


async def test_grpc_deadline_passing_on_a_full_pipeline(nursery):
    consumer = GatedConsumer()
    consumer.pause()
    receiver = await start(nursery, consumer)
    result = await trio.to_thread.run_sync(lambda: raw_grpc_call(receiver.grpc, Signal.LOGS, log_request().SerializeToString(), timeout=0.3))
    assert result.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(10):
        await consumer.left.wait()  # the receiver gave up waiting too
    consumer.resume()
    await trio.testing.wait_all_tasks_blocked()
    assert consumer.batches == []  # the abandoned call never entered the pipeline


# ---------------------------------------------------------------- gRPC against slow clients
# The clients here are raw sockets and the h2 library: grpcio's own client cannot leave a call half sent.


def grpc_config(**kw) -> Config:
    return Config(protocols=Protocols(grpc=GrpcConfig(endpoint="127.0.0.1:0", **kw)))


class Http2Client:
    """A bare HTTP/2 connection (h2), to start gRPC calls and leave them unfinished."""

    def __init__(self, stream: trio.SocketStream) -> None:
        import h2.config
        import h2.connection
        import h2.exceptions

        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.events: list = []

    @classmethod
    async def connect(cls, port: int) -> "Http2Client":
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.h2.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def start_unfinished_export(self, signal: Signal = Signal.LOGS) -> None:
        """Send a call's headers and the first bytes of a 1000-byte message, never the rest."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":authority", "tapio"),
            (":path", f"/{SERVICES[signal]}/Export"), ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        self.h2.send_data(stream_id, b"\x00" + (1000).to_bytes(4, "big") + b"\x0a" * 10)
        await self.flush()

    async def wait_closed(self) -> None:
        """Read (acknowledging settings and pings) until the server closes the connection."""
        import h2.connection

        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            if self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
                continue  # after GOAWAY: only waiting for the end of the stream
            try:
                self.events += self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                continue  # frames the server sent along with its GOAWAY
            try:
                await self.flush()
            except trio.BrokenResourceError:
                return


async def test_grpc_closes_connections_that_do_not_start_http2(nursery):
    receiver = await start(nursery, config=grpc_config(handshake_timeout=0.5))
    silent = await trio.open_tcp_stream("127.0.0.1", receiver.component.grpc_port)
    partial = await trio.open_tcp_stream("127.0.0.1", receiver.component.grpc_port)
    await partial.send_all(b"PRI * HTTP/2.0\r\n")
    began = trio.current_time()
    async with silent, partial:
        with trio.fail_after(10):
            for stream in (silent, partial):
                while True:
                    try:
                        if not await stream.receive_some(65536):
                            break
                    except trio.BrokenResourceError:
                        break
    assert trio.current_time() - began >= 0.4


async def test_grpc_closes_idle_connections_and_clients_come_back(nursery):
    receiver = await start(nursery, config=grpc_config(max_connection_idle=0.5))
    client = await Http2Client.connect(receiver.component.grpc_port)
    async with client.stream:
        with trio.fail_after(10):
            await client.wait_closed()
    import h2.events

    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)  # GOAWAY first
    result = await trio.to_thread.run_sync(lambda: raw_grpc_call(receiver.grpc, Signal.LOGS, log_request().SerializeToString()))
    assert result == b""


async def test_grpc_calls_whose_message_never_completes_hold_no_worker_and_end_with_the_connection(nursery):
    receiver = await start(nursery, config=grpc_config(workers=1, max_connection_age=1.0, max_connection_age_grace=0.5))
    slow = [await Http2Client.connect(receiver.component.grpc_port) for _ in range(3)]
    for client in slow:
        await client.start_unfinished_export()
    began = trio.current_time()
    # the only worker thread is free for a real call
    result = await trio.to_thread.run_sync(lambda: raw_grpc_call(receiver.grpc, Signal.LOGS, log_request().SerializeToString(), timeout=5))
    assert result == b""
    with trio.fail_after(10):
        for client in slow:
            async with client.stream:
                await client.wait_closed()
    assert trio.current_time() - began >= 1.0  # at max_connection_age (less grpcio's jitter of up to 10%) plus grace
    assert receiver.consumer.item_count == 1  # the unfinished calls never reached the pipeline


# ---------------------------------------------------------------- startup


async def test_port_in_use_is_a_clear_startup_error(nursery):
    first = await start(nursery)
    grpc_taken = Config(protocols=Protocols(grpc=GrpcConfig(endpoint=f"127.0.0.1:{first.component.grpc_port}")))
    http_taken = Config(protocols=Protocols(http=HttpConfig(endpoint=f"127.0.0.1:{first.component.http_port}")))
    for config, proto, port in [(grpc_taken, "gRPC", first.component.grpc_port), (http_taken, "HTTP", first.component.http_port)]:
        component = factory.create(make_settings(), config, Ports(output=RecordingConsumer()))
        with pytest.raises(OSError, match=rf"^otlp: cannot listen on 127\.0\.0\.1:{port} for {proto}: address already in use$"):
            await nursery.start(component.run)


async def test_http_bind_failure_stops_the_grpc_server(nursery):
    first = await start(nursery, config=local_config(grpc_on=False))
    config = Config(protocols=Protocols(grpc=GrpcConfig(endpoint="127.0.0.1:0"), http=HttpConfig(endpoint=f"127.0.0.1:{first.component.http_port}")))
    component = factory.create(make_settings(), config, Ports(output=RecordingConsumer()))
    with pytest.raises(OSError, match="for HTTP"):
        await nursery.start(component.run)
    result = await trio.to_thread.run_sync(lambda: raw_grpc_call(f"127.0.0.1:{component.grpc_port}", Signal.LOGS, b"", timeout=2))
    assert result.code() == grpc.StatusCode.UNAVAILABLE  # nobody listens any more


async def test_cancelled_right_after_start_exits_cleanly():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            receiver = await start(nursery)
            nursery.cancel_scope.cancel()
    assert receiver.consumer.batches == []


# ---------------------------------------------------------------- config


def test_default_config_validates_and_enables_both_protocols():
    config = Config()
    assert config_problems(config) == []
    assert config.protocols.grpc.endpoint == "127.0.0.1:4317"
    assert config.protocols.http.endpoint == "127.0.0.1:4318"
    assert config.protocols.http.max_request_body_size == 20 * 1024 * 1024
    assert factory.summary(config) == "grpc 127.0.0.1:4317, http 127.0.0.1:4318"


def test_config_problems_are_all_reported():
    config = Config(
        protocols=Protocols(
            grpc=GrpcConfig(endpoint="127.0.0.1:70000", max_recv_msg_size_mib=0),
            http=HttpConfig(endpoint="localhost", traces_url_path="v1/traces", logs_url_path="/v1/metrics"),
        )
    )
    assert config.validate() == [
        "protocols.grpc.endpoint: port 70000 is out of range (0-65535; 0 picks a free port)",
        "protocols.grpc.max_recv_msg_size_mib: must be at least 1 (got 0)",
        "protocols.http.endpoint: 'localhost' has no port: write host:port, e.g. 127.0.0.1:4317",
        "protocols.http.traces_url_path: must start with '/' (got 'v1/traces')",
        "protocols.http.logs_url_path: '/v1/metrics' is already used by metrics_url_path",
    ]
    assert Config(protocols=Protocols()).validate() == ["protocols: must enable at least one of grpc, http"]
    same = Config(protocols=Protocols(grpc=GrpcConfig(endpoint="127.0.0.1:4000"), http=HttpConfig(endpoint="127.0.0.1:4000")))
    assert same.validate() == ["protocols.http.endpoint: 127.0.0.1:4000 is also the grpc endpoint"]


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:4317", ("127.0.0.1", 4317)), ("[::1]:4318", ("::1", 4318)), (":4317", ("", 4317)), ("localhost:0", ("localhost", 0))],
)
def test_parse_endpoint(text, expected):
    assert parse_endpoint(text) == expected


@hsettings(max_examples=300)
@given(st.text(max_size=40))
def test_parse_endpoint_fuzz(text):
    try:
        host, port = parse_endpoint(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 0 <= port <= 65535
        assert not any(c.isspace() for c in host)


@hsettings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(["gzip", "deflate", "identity", "br"]), st.integers(0, 500))
def test_decompress_fuzz_never_exceeds_limit(data, encoding, limit):
    try:
        out = decompress(data, encoding, limit)
    except TooLarge:
        return
    except ValueError:
        return
    if encoding != "identity":
        assert len(out) <= limit


@hsettings(max_examples=100)
@given(st.binary(max_size=2000), st.integers(1, 3000))
def test_decompress_round_trips_within_limit(data, limit):
    for compressed, encoding in [(gzip.compress(data), "gzip"), (zlib.compress(data), "deflate")]:
        if len(data) <= limit:
            assert decompress(compressed, encoding, limit) == data
        else:
            with pytest.raises(TooLarge):
                decompress(compressed, encoding, limit)


def _dotted_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        for t in typing.get_args(hints[f.name]) or (hints[f.name],):
            if dataclasses.is_dataclass(t):
                out += _dotted_fields(t, key + ".")
    return out


def test_doc_page_lists_exactly_the_config_keys():
    page = (ROOT / "docs" / "components" / "otlp-receiver.md").read_text()
    page = page.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\|\s*`([^`]+)`\s*\|", page, flags=re.M)
    assert sorted(documented) == sorted(_dotted_fields(Config))


def test_collector_shaped_yaml_decodes_as_documented():
    import yaml

    from tapio.config import ConfigError, decode_dataclass

    only_grpc = decode_dataclass(Config, yaml.safe_load("protocols:\n  grpc:\n"))
    assert only_grpc.protocols.grpc == GrpcConfig() and only_grpc.protocols.http is None
    only_http = decode_dataclass(Config, yaml.safe_load("protocols:\n  http:\n    max_request_body_size: 8MiB\n"))
    assert only_http.protocols.grpc is None and only_http.protocols.http.max_request_body_size == 8 * 1024 * 1024
    assert decode_dataclass(Config, yaml.safe_load("{}")) == Config()
    with pytest.raises(ConfigError, match=r"protocols\.grpc\.endpoint: port 70000 is out of range \(0-65535; 0 picks a free port\)"):
        decode_dataclass(Config, yaml.safe_load("protocols:\n  grpc:\n    endpoint: 127.0.0.1:70000\n"))


async def test_acknowledge_delivered_answers_only_after_the_pipeline_reports_delivery(nursery):
    """With `acknowledge: delivered` success means every exporter delivered (or durably queued) the data."""
    import dataclasses

    consumer = RecordingConsumer(ack=None)  # the test plays the exporters: it calls batch.done itself
    config = dataclasses.replace(local_config(), acknowledge="delivered")
    receiver = await start(nursery, consumer, config)
    results: dict[str, object] = {}

    async def post(name: str) -> None:
        async with httpx.AsyncClient() as client:
            results[name] = await client.post(receiver.http + "/v1/logs", content=log_request(name).SerializeToString(), headers={"content-type": "application/x-protobuf"})

    async def call(name: str) -> None:
        results[name] = await trio.to_thread.run_sync(raw_grpc_call, receiver.grpc, Signal.LOGS, log_request(name).SerializeToString())

    nursery.start_soon(post, "http-ok")
    nursery.start_soon(call, "grpc-ok")
    await consumer.wait_for_batches(2)
    await trio.testing.wait_all_tasks_blocked()
    assert results == {}  # in the pipeline, but not delivered yet: nobody has been answered
    for b in consumer.batches:
        b.done(True)
    with trio.fail_after(10):
        while len(results) < 2:
            await trio.sleep(0.01)
    assert results["http-ok"].status_code == 200
    assert not isinstance(results["grpc-ok"], grpc.RpcError)

    nursery.start_soon(post, "http-lost")
    nursery.start_soon(call, "grpc-lost")
    await consumer.wait_for_batches(4)
    for b in consumer.batches[2:]:
        b.done(False)  # e.g. the exporter's queue was full: the client must retry
    with trio.fail_after(10):
        while len(results) < 4:
            await trio.sleep(0.01)
    assert results["http-lost"].status_code == 503 and results["http-lost"].headers["retry-after"] == "1"
    assert "could not be delivered" in status_pb2.Status.FromString(results["http-lost"].content).message
    assert results["grpc-lost"].code() == grpc.StatusCode.UNAVAILABLE


async def test_acknowledge_delivered_gives_up_after_delivery_timeout(autojump_clock):
    from tapio.receivers.otlp._delivery import Delivery

    consumer = RecordingConsumer(ack=None)  # takes batches, never reports them delivered
    delivery = Delivery(consumer, wait_for_delivery=True, delivery_timeout=5.0)
    start_time = trio.current_time()
    assert await delivery.deliver(Batch.of(Signal.LOGS, log_request())) == "timeout"
    assert trio.current_time() - start_time == pytest.approx(5.0)
    # a client deadline shorter than delivery_timeout wins
    assert await delivery.deliver(Batch.of(Signal.LOGS, log_request()), timeout=1.0) == "timeout"
    # without waiting for delivery, being in the pipeline is enough
    assert await Delivery(consumer).deliver(Batch.of(Signal.LOGS, log_request())) is None
