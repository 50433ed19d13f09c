"""The otlp and otlphttp exporters against the reference OTLP sink: codes, retries, partial success, queues.

Retry schedules are shortened (milliseconds) so real gRPC/HTTP round trips
stay fast; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import email.utils
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
import trio
from hypothesis import given, strategies as st

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.exporters.otlp import grpc_factory, http_factory
from tapio.exporters.otlp._config import GrpcExporterConfig, HttpExporterConfig, grpc_target
from tapio.exporters.otlp._queue import CorruptItem, decode_item, encode_item
from tapio.exporters.otlp._retry import (
    MAX_SERVER_DELAY,
    RETRYABLE_GRPC,
    Backoff,
    Verdict,
    classify_grpc,
    classify_http,
    parse_retry_after,
    retry_info_delay,
)
from tapio.pdata import Batch, Signal
from tapio.storage import Storage
from tapio.testing.batches import log_batch, metric_batch, numbered, span_batch
from tapio.telemetry import Telemetry
from tapio.testing.otlpsink import OtlpSink, Reply, open_otlp_sink

TRANSPORTS = ["grpc", "http"]
FAST_RETRY = {"initial_interval": "10ms", "max_interval": "50ms", "randomization_factor": 0}

# ---------------------------------------------------------------- records


def bodies(sink: OtlpSink) -> list[str]:
    return [
        lr.body.string_value
        for req in sink.requests(Signal.LOGS)
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for lr in sl.log_records
    ]


# ---------------------------------------------------------------- harness


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def endpoint_for(transport: str, sink: OtlpSink) -> dict:
    if transport == "grpc":
        return {"endpoint": sink.grpc_endpoint, "tls": {"insecure": True}}
    return {"endpoint": sink.http_url()}


class Exporter:
    """One exporter instance on a channel, with its own telemetry."""

    def __init__(self, transport: str, config: dict, storage: Storage | None = None, grace: float = 1.0) -> None:
        self.factory = grpc_factory if transport == "grpc" else http_factory
        self.config = decode_dataclass(self.factory.config_class, config)
        assert self.config.validate() == [], self.config.validate()
        self.telemetry = Telemetry()
        self.settings = Settings(
            id=ComponentID(self.factory.type, "test"),
            kind=Kind.EXPORTER,
            telemetry=self.telemetry.for_component("exporter", f"{self.factory.type}/test"),
            logger=logging.getLogger("test.otlp_exporter"),
            extensions={ComponentID("storage"): storage} if storage is not None else {},
            shutdown_grace=grace,
        )
        self.send, recv = trio.open_memory_channel[Batch](4)
        self.component = self.factory.create(self.settings, self.config, Ports(input=recv))

    def value(self, name: str, **labels: str) -> float:
        return self.telemetry.value(name, **labels)

    def sent(self, signal: Signal = Signal.LOGS) -> float:
        return self.value(f"tapio_exporter_sent_{signal.item_name}_total")

    def failed(self, signal: Signal = Signal.LOGS, **labels: str) -> float:
        return self.value(f"tapio_exporter_send_failed_{signal.item_name}_total", **labels)


@asynccontextmanager
async def running(transport: str, sink: OtlpSink, overrides: dict | None = None, **kwargs: Any) -> AsyncIterator[Exporter]:
    """Run an exporter pointed at ``sink``; on exit close its input and wait for it to drain and return."""
    config = merge({**endpoint_for(transport, sink), "retry_on_failure": FAST_RETRY}, overrides or {})
    ex = Exporter(transport, config, **kwargs)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(ex.component.run)
            yield ex
            await ex.send.aclose()


class Done:
    """Collects ``Batch.done`` reports."""

    def __init__(self) -> None:
        self.reports: list[bool] = []

    def watch(self, batch: Batch) -> Batch:
        batch.on_done.append(self.reports.append)
        return batch


# ---------------------------------------------------------------- config


def test_config_defaults_are_the_collectors():
    g, h = GrpcExporterConfig(), HttpExporterConfig()
    assert (g.compression, float(g.timeout), float(h.timeout)) == ("gzip", 5.0, 30.0)
    r = g.retry_on_failure
    assert (r.enabled, float(r.initial_interval), float(r.max_interval), float(r.max_elapsed_time), r.multiplier, r.randomization_factor) == (
        True, 5.0, 30.0, 300.0, 1.5, 0.5,
    )
    q = g.sending_queue
    assert (q.enabled, q.num_consumers, q.queue_size, q.storage) == (True, 10, 1000, None)
    assert h.encoding == "proto" and h.tls.min_version == "1.2"


def test_validate_reports_every_problem_with_its_key():
    cfg = decode_dataclass(
        GrpcExporterConfig,
        {
            "endpoint": "nohost",
            "timeout": 0,
            "headers": {"Authorization": "x"},
            "tls": {"cert_file": "c.pem", "insecure_skip_verify": True},
            "retry_on_failure": {"multiplier": 0.5, "max_interval": "1s"},
            "sending_queue": {"num_consumers": 0, "queue_size": 0},
        },
        validate=False,
    )
    keys = [p.split(":")[0] for p in cfg.validate()]
    assert keys == [
        "endpoint",
        "headers.Authorization",
        "timeout",
        "tls.cert_file",  # c.pem does not exist
        "tls.key_file",
        "tls.insecure_skip_verify",
        "retry_on_failure.max_interval",
        "retry_on_failure.multiplier",
        "sending_queue.num_consumers",
        "sending_queue.queue_size",
    ]
    http = decode_dataclass(HttpExporterConfig, {"logs_endpoint": "ftp://x/v1/logs", "tls": {"insecure": True}}, validate=False)
    assert [p.split(":")[0] for p in http.validate()] == ["traces_endpoint", "metrics_endpoint", "logs_endpoint", "tls.insecure"]


def test_endpoints():
    assert grpc_target("otel:4317") == "otel:4317"
    assert grpc_target("https://otel:4317/") == "otel:4317"
    assert grpc_target("[::1]:4317") == "[::1]:4317"
    for bad in ("otel", "otel:x", "otel:0", "ftp://otel:1", "http://otel:4317/v1", "::1:4317", ""):
        with pytest.raises(ValueError):
            grpc_target(bad)
    assert GrpcExporterConfig(endpoint="http://h:1").plaintext()
    insecure = decode_dataclass(GrpcExporterConfig, {"tls": {"insecure": True}}, validate=False).tls
    assert not GrpcExporterConfig(endpoint="https://h:1", tls=insecure).plaintext()
    assert GrpcExporterConfig(endpoint="h:1", tls=insecure).plaintext()
    assert GrpcExporterConfig(endpoint="h:1").plaintext() is False
    h = HttpExporterConfig(endpoint="http://c:4318/base/", logs_endpoint="http://l:1/custom")
    assert [h.signal_url(s) for s in ("traces", "metrics", "logs")] == [
        "http://c:4318/base/v1/traces", "http://c:4318/base/v1/metrics", "http://l:1/custom",
    ]


@given(st.text(max_size=40))
def test_endpoint_parsing_fuzz(text):
    try:
        target = grpc_target(text)
    except ValueError:
        pass
    else:
        assert target.rpartition(":")[2].isdigit()
    # validation of any endpoint text reports problems instead of raising
    assert isinstance(GrpcExporterConfig(endpoint=text).validate(), list)
    assert isinstance(HttpExporterConfig(endpoint=text, logs_endpoint=text).validate(), list)


# ---------------------------------------------------------------- classification (pure)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_grpc_code_is_classified(code):
    outcome = classify_grpc(code, "why")
    if code is grpc.StatusCode.OK:
        assert outcome.verdict is Verdict.SENT
    elif code in RETRYABLE_GRPC:
        assert outcome.verdict is Verdict.RETRY and outcome.reason == code.name.lower()
    else:
        assert outcome.verdict is Verdict.PERMANENT and outcome.message == "why"


def test_resource_exhausted_is_retryable_only_with_retry_info():
    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status(code=8, message="slow down")
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)))
    with_info = classify_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "", status.SerializeToString())
    assert (with_info.verdict, with_info.delay) == (Verdict.RETRY, 2.5)
    assert classify_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED).verdict is Verdict.PERMANENT
    other_detail = status_pb2.Status(code=8)
    other_detail.details.add().Pack(error_details_pb2.ErrorInfo(reason="quota"))
    assert classify_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "", other_detail.SerializeToString()).verdict is Verdict.PERMANENT
    # a retryable code keeps the server's delay too
    assert classify_grpc(grpc.StatusCode.UNAVAILABLE, "", status.SerializeToString()).delay == 2.5


@pytest.mark.parametrize("status", [200, 202, 204, 400, 401, 403, 404, 405, 413, 415, 429, 500, 501, 502, 503, 504, 505])
def test_http_statuses(status):
    verdict = classify_http(status).verdict
    if 200 <= status < 300:
        assert verdict is Verdict.SENT
    elif status in (429, 502, 503, 504):
        assert verdict is Verdict.RETRY
    else:
        assert verdict is Verdict.PERMANENT


def test_retry_after_seconds_and_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("99999999", now) == MAX_SERVER_DELAY
    for bad in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2023 00:00:00 GMT"):
        assert parse_retry_after(bad, now) is None
    assert classify_http(503, "12", now=now).delay == 12.0


@given(st.text(max_size=60), st.floats(min_value=0, max_value=4e9))
def test_retry_after_never_raises(value, now):
    delay = parse_retry_after(value, now)
    assert delay is None or 0.0 <= delay <= MAX_SERVER_DELAY


@given(st.binary(max_size=200))
def test_status_details_fuzz(data):
    delay = retry_info_delay(data)
    assert delay is None or 0.0 <= delay <= MAX_SERVER_DELAY


def test_backoff_schedule_caps_and_gives_up():
    b = Backoff(initial=5, maximum=30, multiplier=1.5, randomization=0, max_elapsed=60, start=0)
    waits, now = [], 0.0
    while (d := b.next_delay(now)) is not None:
        waits.append(d)
        now += d
    assert waits == [5, 7.5, 11.25, 16.875, 16.875 * 1.5 if 16.875 * 1.5 < 30 else 30][: len(waits)]
    assert sum(waits) <= 60 and sum(waits) + min(30, waits[-1] * 1.5) > 60
    # the server's delay wins when longer; never retried past max_elapsed
    b = Backoff(initial=1, maximum=2, multiplier=2, randomization=0, max_elapsed=100, start=0)
    assert b.next_delay(0, server_delay=40) == 40
    assert b.next_delay(70, server_delay=40) is None
    # 0 = forever
    b = Backoff(initial=1, maximum=1, multiplier=1, randomization=0, max_elapsed=0, start=0)
    assert b.next_delay(1e9) == 1


@given(st.floats(0.01, 10), st.floats(0, 1), st.integers(0, 2**32))
def test_backoff_jitter_stays_in_bounds(initial, factor, seed):
    import random

    b = Backoff(initial=initial, maximum=initial, multiplier=1, randomization=factor, max_elapsed=0, start=0, rng=random.Random(seed))
    for _ in range(5):
        d = b.next_delay(0)
        assert initial * (1 - factor) - 1e-9 <= d <= initial * (1 + factor) + 1e-9


def test_queue_item_round_trip_and_corruption():
    payload = log_batch(numbered(3, "s:")).to_bytes()
    item = decode_item(7, encode_item(Signal.TRACES, 3, payload))
    assert (item.signal, item.count, item.payload, item.id) == (Signal.TRACES, 3, payload, 7)
    with pytest.raises(CorruptItem):
        decode_item(1, b"X\x00")
    with pytest.raises(CorruptItem):
        decode_item(1, b"Q" + b"\x00" * 8)


@given(st.binary(max_size=40))
def test_queue_item_decode_fuzz(data):
    try:
        decode_item(1, data)
    except CorruptItem:
        pass


# ---------------------------------------------------------------- against the sink


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_all_signals_arrive_with_headers_and_are_counted(transport):
    async with open_otlp_sink() as sink:
        done = Done()
        async with running(transport, sink, {"headers": {"x-tenant": "acme"}}) as ex:
            await ex.send.send(done.watch(log_batch(numbered(5, "s:"))))
            await ex.send.send(done.watch(span_batch(3)))
            await ex.send.send(done.watch(metric_batch(4)))
        assert [sink.items(s) for s in (Signal.LOGS, Signal.TRACES, Signal.METRICS)] == [5, 3, 4]
        assert [ex.sent(s) for s in (Signal.LOGS, Signal.TRACES, Signal.METRICS)] == [5, 3, 4]
        assert done.reports == [True, True, True]
        assert all(r.headers.get("x-tenant") == "acme" for r in sink.received)
        assert sink.requests(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[2].name == "span2"
        if transport == "http":
            assert all(r.compressed and r.encoding == "proto" for r in sink.received)


async def test_http_json_encoding_without_compression():
    async with open_otlp_sink() as sink:
        async with running("http", sink, {"encoding": "json", "compression": "none"}) as ex:
            await ex.send.send(log_batch(numbered(3, "s:")))
            await ex.send.send(span_batch(2))
        assert [(r.encoding, r.compressed) for r in sink.received] == [("json", False)] * 2
        assert bodies(sink) == ["s:0", "s:1", "s:2"]
        assert sink.requests(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0].trace_id == bytes(range(16))
        assert ex.sent(Signal.TRACES) == 2


GRPC_RETRYABLE = sorted(RETRYABLE_GRPC, key=lambda c: c.name)
GRPC_PERMANENT = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK and c not in RETRYABLE_GRPC]


@pytest.mark.parametrize("code", GRPC_RETRYABLE, ids=lambda c: c.name)
async def test_grpc_retryable_codes_are_retried(code):
    async with open_otlp_sink(http_server=False) as sink:
        sink.script(Reply(code=code, message="try again"), Reply(code=code))
        done = Done()
        async with running("grpc", sink) as ex:
            await ex.send.send(done.watch(log_batch(numbered(4, "s:"))))
        assert len(sink.attempts) == 3 and sink.items() == 4
        assert ex.value("tapio_exporter_retries_total", reason=code.name.lower()) == 2
        assert (ex.sent(), ex.failed(), done.reports) == (4, 0, [True])


@pytest.mark.parametrize("code", GRPC_PERMANENT, ids=lambda c: c.name)
async def test_grpc_permanent_codes_drop_and_count(code):
    async with open_otlp_sink(http_server=False) as sink:
        sink.script(Reply(code=code, message="no"))
        done = Done()
        async with running("grpc", sink, {"sending_queue": {"num_consumers": 1}}) as ex:
            await ex.send.send(done.watch(log_batch(numbered(4, "s:"))))
            await ex.send.send(done.watch(log_batch(numbered(1, "s:", 4))))
        assert len(sink.attempts) == 2 and bodies(sink) == ["s:4"]
        assert ex.failed(reason=code.name.lower()) == 4
        assert ex.value("tapio_exporter_retries_total") == 0
        assert sorted(done.reports) == [False, True]


async def test_grpc_resource_exhausted_with_retry_info_waits_the_servers_delay():
    async with open_otlp_sink(http_server=False) as sink:
        sink.script(Reply(code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.6))
        async with running("grpc", sink) as ex:
            await ex.send.send(log_batch(numbered(2, "s:")))
        first, second = sink.attempts
        assert second.at - first.at >= 0.6  # not the 10ms of the local schedule
        assert ex.value("tapio_exporter_retries_total", reason="resource_exhausted") == 1 and sink.items() == 2


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_http_retryable_statuses_are_retried(status):
    async with open_otlp_sink(grpc_server=False) as sink:
        sink.script(Reply(http_status=status, code=grpc.StatusCode.UNAVAILABLE))
        async with running("http", sink) as ex:
            await ex.send.send(log_batch(numbered(3, "s:")))
        assert len(sink.attempts) == 2 and sink.items() == 3
        assert ex.value("tapio_exporter_retries_total", reason=f"http_{status}") == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415, 500, 501])
async def test_http_permanent_statuses_drop_and_count(status):
    async with open_otlp_sink(grpc_server=False) as sink:
        sink.script(Reply(http_status=status, code=grpc.StatusCode.INVALID_ARGUMENT, message="bad"))
        done = Done()
        async with running("http", sink) as ex:
            await ex.send.send(done.watch(log_batch(numbered(3, "s:"))))
        assert len(sink.attempts) == 1 and sink.items() == 0
        assert ex.failed(reason=f"http_{status}") == 3 and done.reports == [False]


@pytest.mark.parametrize("header", ["seconds", "date"])
async def test_http_retry_after_is_honoured(header):
    async with open_otlp_sink(grpc_server=False) as sink:
        if header == "seconds":
            reply, least = Reply(http_status=503, code=grpc.StatusCode.UNAVAILABLE, retry_after="1"), 0.95
        else:
            # an HTTP date has whole seconds: 3 s ahead is more than 2 s from now, at least
            # 1.5 s once the reply has been read on a busy machine
            when = email.utils.formatdate(time.time() + 3, usegmt=True)
            reply, least = Reply(http_status=429, code=grpc.StatusCode.UNAVAILABLE, retry_after=when), 1.5
        sink.script(reply)
        async with running("http", sink) as ex:
            await ex.send.send(log_batch(numbered(1, "s:")))
        first, second = sink.attempts
        assert second.at - first.at >= least and sink.items() == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_partial_success_counts_the_rejected_items(transport, caplog):
    async with open_otlp_sink() as sink:
        sink.script(Reply(rejected=3, partial_message="3 records too old"))
        done = Done()
        with caplog.at_level(logging.WARNING, logger="test.otlp_exporter"):
            async with running(transport, sink) as ex:
                await ex.send.send(done.watch(log_batch(numbered(10, "s:"))))
        assert ex.sent() == 7 and ex.failed(reason="partial_success") == 3
        assert done.reports == [True] and len(sink.attempts) == 1
        assert any("3 records too old" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_gives_up_after_max_elapsed_time(transport):
    async with open_otlp_sink() as sink:
        sink.default = Reply(code=grpc.StatusCode.UNAVAILABLE)
        done = Done()
        async with running(transport, sink, {"retry_on_failure": {"max_elapsed_time": "200ms"}}) as ex:
            await ex.send.send(done.watch(log_batch(numbered(2, "s:"))))
        assert ex.failed(reason="retries_exhausted") == 2 and done.reports == [False]
        assert 3 <= len(sink.attempts) <= 25


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_retry_disabled_drops_on_the_first_retryable_failure(transport):
    async with open_otlp_sink() as sink:
        sink.script(Reply(code=grpc.StatusCode.UNAVAILABLE))
        async with running(transport, sink, {"retry_on_failure": {"enabled": False}}) as ex:
            await ex.send.send(log_batch(numbered(2, "s:")))
        assert ex.failed(reason="unavailable" if transport == "grpc" else "http_503") == 2
        assert len(sink.attempts) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_timeout_is_retried(transport):
    async with open_otlp_sink() as sink:
        sink.script(Reply(delay=0.5))  # accepted, but too late: the exporter has given up on it
        async with running(transport, sink, {"timeout": "150ms"}) as ex:
            await ex.send.send(log_batch(numbered(1, "s:")))
            with trio.fail_after(10):
                await sink.wait_for_items(2)
        assert ex.value("tapio_exporter_retries_total") == 1
        assert ex.sent() == 1  # the late acceptance was a duplicate, which at-least-once allows


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_connection_refused_is_retried_until_the_backend_appears(transport):
    async with open_otlp_sink() as sink:
        await sink.stop()
        async with running(transport, sink) as ex:
            await ex.send.send(log_batch(numbered(3, "s:")))
            with trio.fail_after(10):
                while ex.value("tapio_exporter_retries_total") < 2:
                    await trio.sleep(0.01)
            await sink.start()
            with trio.fail_after(15):
                await sink.wait_for_items(3)
        assert ex.sent() == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_full_queue_refuses_and_counts(transport):
    async with open_otlp_sink() as sink:
        sink.default = Reply(delay=0.3)
        done = Done()
        async with running(transport, sink, {"sending_queue": {"queue_size": 1, "num_consumers": 1}}) as ex:
            for i in range(4):  # one in flight, one queued, two refused
                await ex.send.send(done.watch(log_batch(numbered(1, "s:", i))))
            with trio.fail_after(10):
                while len(done.reports) < 2:
                    await trio.sleep(0.01)
            assert done.reports == [False, False]
            assert ex.value("tapio_exporter_enqueue_failed_log_records_total", reason="queue_full") == 2
        assert sink.items() == 2 and sorted(done.reports) == [False, False, True, True]


async def test_block_on_overflow_waits_instead_of_dropping():
    async with open_otlp_sink(http_server=False) as sink:
        sink.default = Reply(delay=0.05)
        async with running("grpc", sink, {"sending_queue": {"queue_size": 1, "num_consumers": 1, "block_on_overflow": True}}) as ex:
            for i in range(5):
                await ex.send.send(log_batch(numbered(1, "s:", i)))
        assert bodies(sink) == [f"s:{i}" for i in range(5)]
        assert ex.value("tapio_exporter_enqueue_failed_log_records_total") == 0


async def test_unqueued_mode_sends_in_order_and_reports_done_after_sending():
    async with open_otlp_sink(http_server=False) as sink:
        done = Done()
        async with running("grpc", sink, {"sending_queue": {"enabled": False}}) as ex:
            for i in range(3):
                await ex.send.send(done.watch(log_batch(numbered(1, "s:", i))))
        assert bodies(sink) == ["s:0", "s:1", "s:2"] and done.reports == [True] * 3


async def test_in_memory_leftovers_are_dropped_and_counted_on_cancellation():
    async with open_otlp_sink(http_server=False) as sink:
        sink.default = Reply(code=grpc.StatusCode.UNAVAILABLE)
        done = Done()
        ex = Exporter("grpc", {**endpoint_for("grpc", sink), "retry_on_failure": FAST_RETRY}, grace=0.3)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(ex.component.run)
                for i in range(3):
                    await ex.send.send(done.watch(log_batch(numbered(2, "s:", i))))
                await sink.wait_for_attempts(6)
                nursery.cancel_scope.cancel()
        assert sorted(done.reports) == [False] * 3
        assert ex.failed(reason="shutdown") == 6


async def test_unqueued_batch_in_hand_gets_a_last_attempt_within_the_grace_on_cancellation():
    async with open_otlp_sink(http_server=False) as sink:
        sink.default = Reply(code=grpc.StatusCode.UNAVAILABLE)
        done = Done()
        slow_retry = {**FAST_RETRY, "initial_interval": "60s", "max_interval": "60s"}
        config = {**endpoint_for("grpc", sink), "retry_on_failure": slow_retry, "sending_queue": {"enabled": False}}
        ex = Exporter("grpc", config, grace=5.0)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(ex.component.run)
                await ex.send.send(done.watch(log_batch(numbered(2, "s:"))))
                await sink.wait_for_attempts(1)  # failed; the exporter now waits 60 s to retry
                sink.default = Reply()  # the backend is back
                nursery.cancel_scope.cancel()
        assert done.reports == [True]
        assert ex.sent() == 2 and ex.failed(reason="shutdown") == 0
        assert bodies(sink) == ["s:0", "s:1"]


# ---------------------------------------------------------------- storage-backed queue


async def test_storage_queue_needs_the_storage_extension():
    async with open_otlp_sink(http_server=False) as sink:
        ex = Exporter("grpc", {**endpoint_for("grpc", sink), "sending_queue": {"storage": "storage"}})
        with pytest.raises(LookupError, match="storage extension 'storage' is not running.*service.extensions"):
            await ex.component.run()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_storage_queue_reports_done_once_on_disk_and_survives_a_restart(transport, tmp_path: Path):
    storage = Storage.open(tmp_path / "tapio.db")
    try:
        async with open_otlp_sink() as sink:
            await sink.stop()  # backend down: nothing can be sent
            done = Done()
            cfg = {"sending_queue": {"storage": "storage", "num_consumers": 2}}
            async with running(transport, sink, cfg, storage=storage) as ex:
                for i in range(5):
                    await ex.send.send(done.watch(log_batch(numbered(10, "s:", i * 10))))
                with trio.fail_after(10):
                    while len(done.reports) < 5:
                        await trio.sleep(0.01)
                assert done.reports == [True] * 5  # durable: sources may forget them
                assert ex.value("tapio_exporter_sending_queue_size") == 5
            # the input ended while the backend was down: everything stays on disk
            assert storage.queue_sizes()[f"exporter/{ex.factory.type}/test"][0] == 5
            assert sink.items() == 0

            await sink.start()
            async with running(transport, sink, cfg, storage=storage) as ex2:
                with trio.fail_after(15):
                    await sink.wait_for_items(50)
            assert sorted(bodies(sink), key=lambda b: int(b[2:])) == [f"s:{i}" for i in range(50)]
            assert ex2.sent() == 50 and storage.queue_sizes() == {}
    finally:
        storage.close()


async def test_storage_queue_full_refuses_and_counts(tmp_path: Path):
    storage = Storage.open(tmp_path / "tapio.db")
    try:
        async with open_otlp_sink(http_server=False) as sink:
            await sink.stop()
            done = Done()
            async with running("grpc", sink, {"sending_queue": {"storage": "storage", "queue_size": 2}}, storage=storage) as ex:
                for i in range(4):
                    await ex.send.send(done.watch(log_batch(numbered(1, "s:", i))))
                with trio.fail_after(10):
                    while len(done.reports) < 4:
                        await trio.sleep(0.01)
            assert done.reports == [True, True, False, False]
            assert ex.value("tapio_exporter_enqueue_failed_log_records_total", reason="queue_full") == 2
    finally:
        storage.close()


async def test_corrupt_storage_item_is_counted_and_removed(tmp_path: Path):
    storage = Storage.open(tmp_path / "tapio.db")
    try:
        storage.queue("exporter/otlp/test").put(b"garbage!")
        storage.queue("exporter/otlp/test").put(encode_item(Signal.LOGS, 1, log_batch(numbered(1, "s:", 7)).to_bytes()))
        async with open_otlp_sink(http_server=False) as sink:
            async with running("grpc", sink, {"sending_queue": {"storage": "storage"}}, storage=storage) as ex:
                with trio.fail_after(10):
                    await sink.wait_for_items(1)
            assert bodies(sink) == ["s:7"] and ex.value("tapio_bad_input_total", reason="corrupt_queue_item") == 1
            assert storage.queue_sizes() == {}
    finally:
        storage.close()


# ---------------------------------------------------------------- docs


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, dict):
        return "{}"
    return '""' if default is None or default == "" else str(default)


@pytest.mark.parametrize("factory", [grpc_factory, http_factory], ids=lambda f: f.type)
def test_doc_page_lists_exactly_the_config_keys_with_their_defaults(factory):
    import re

    from tapio.config import config_fields

    page = Path(__file__).resolve().parent.parent / "docs" / "components" / f"{factory.type}.md"
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", page.read_text(), flags=re.M)
    assert dict(rows) == {key: _shown(default) for key, _, default, _ in config_fields(factory.config_class)}
    assert len(rows) == len(dict(rows))
