"""The batch processor: size and timeout triggers, max-size splitting, flushing, on_done accounting."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2

from tapio.component import ComponentID, Kind, Ports, Settings, config_problems
from tapio.pdata import Batch, DoneCountdown, Signal, count_items
from tapio.processors.batch import (
    SIZE_TRIGGER_METRIC,
    TIMEOUT_TRIGGER_METRIC,
    BatchConfig,
    factory,
    split_batch,
    split_request,
)
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer
from tapio.units import Duration

# ---------------------------------------------------------------- building records


class Items:
    """Hands out item numbers, so every item made in a test is unique and its order known."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def make_request(signal: Signal, items: Items, shape: list[list[int]]) -> Any:
    """A request with one resource per entry of ``shape`` and one scope per number (its item count).

    Every item carries its number (log body, span name, data point value); a
    resource carries attribute ``res`` and a scope is named ``scope-N`` with
    N its position in the request, so a test can check each item kept them.
    """
    if signal is Signal.LOGS:
        req = ExportLogsServiceRequest()
        for r, scopes in enumerate(shape):
            rl = req.resource_logs.add(schema_url=f"https://schema/{r}")
            rl.resource.attributes.add(key="res", value={"int_value": r})
            for s, n in enumerate(scopes):
                sl = rl.scope_logs.add(schema_url="https://scope")
                sl.scope.name = f"scope-{r}.{s}"
                for _ in range(n):
                    sl.log_records.add(body={"int_value": items.take()}, severity_text="INFO")
        return req
    if signal is Signal.TRACES:
        req = ExportTraceServiceRequest()
        for r, scopes in enumerate(shape):
            rs = req.resource_spans.add()
            rs.resource.attributes.add(key="res", value={"int_value": r})
            for s, n in enumerate(scopes):
                ss = rs.scope_spans.add()
                ss.scope.name = f"scope-{r}.{s}"
                ss.scope.version = "1.0"
                for _ in range(n):
                    ss.spans.add(name=str(items.take()), kind=2)
        return req
    req = ExportMetricsServiceRequest()
    for r, scopes in enumerate(shape):
        rm = req.resource_metrics.add()
        rm.resource.attributes.add(key="res", value={"int_value": r})
        for s, n in enumerate(scopes):
            sm = rm.scope_metrics.add()
            sm.scope.name = f"scope-{r}.{s}"
            # Spread the points over a sum, a gauge and a histogram metric.
            kinds = ["sum", "gauge", "histogram"]
            per = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
            for kind, k in zip(kinds, per):
                if not k:
                    continue
                m = sm.metrics.add(name=f"m.{kind}", description=f"a {kind}", unit="By")
                if kind == "sum":
                    m.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
                    m.sum.is_monotonic = True
                    for _ in range(k):
                        m.sum.data_points.add(as_int=items.take())
                elif kind == "gauge":
                    for _ in range(k):
                        m.gauge.data_points.add(as_double=float(items.take()))
                else:
                    m.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
                    for _ in range(k):
                        m.histogram.data_points.add(count=items.take(), explicit_bounds=[1.0, 2.0])
    return req


def make_batch(signal: Signal, items: Items, n: int, *, requests: int = 1) -> Batch:
    """A batch of ``n`` items spread over ``requests`` requests of two resources with two scopes each."""
    reqs = []
    for i in range(requests):
        share = n // requests + (1 if i < n % requests else 0)
        a, b = share // 2, share - share // 2
        reqs.append(make_request(signal, items, [[a // 2, a - a // 2], [b // 2, b - b // 2]]))
    batch = Batch.of(signal, *reqs)
    assert batch.count == n
    return batch


def flatten(signal: Signal, requests) -> list[tuple]:
    """Every item of ``requests`` in order, each with the envelope it sits in (resource, scope, metric)."""
    out = []
    for req in requests:
        if signal is Signal.LOGS:
            for rl in req.resource_logs:
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        out.append((rl.resource.SerializeToString(), rl.schema_url, sl.scope.SerializeToString(), sl.schema_url, rec.SerializeToString()))
        elif signal is Signal.TRACES:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append((rs.resource.SerializeToString(), ss.scope.SerializeToString(), span.SerializeToString()))
        else:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        data = getattr(m, kind)
                        envelope = (m.name, m.description, m.unit, kind, getattr(data, "aggregation_temporality", None), getattr(data, "is_monotonic", None))
                        for p in data.data_points:
                            out.append((rm.resource.SerializeToString(), sm.scope.SerializeToString(), envelope, p.SerializeToString()))
    return out


def item_ids(signal: Signal, requests) -> list[int]:
    """The item numbers of ``requests``, in order."""
    ids = []
    for req in requests:
        if signal is Signal.LOGS:
            ids += [r.body.int_value for rl in req.resource_logs for sl in rl.scope_logs for r in sl.log_records]
        elif signal is Signal.TRACES:
            ids += [int(s.name) for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
        else:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            ids.append(int(p.as_int if kind == "sum" else p.as_double if kind == "gauge" else p.count))
    return ids


# ---------------------------------------------------------------- running the processor


class Harness:
    """One batch processor between a memory channel (its input) and a recording consumer."""

    def __init__(self, config: BatchConfig, *, capacity: int = 16, grace: float = 5.0, ack: bool | None = True) -> None:
        assert config_problems(config) == []
        self.telemetry = Telemetry()
        self.sink = RecordingConsumer(ack=ack)
        self.send, receive = trio.open_memory_channel[Batch](capacity)
        settings = Settings(
            id=ComponentID("batch"),
            kind=Kind.PROCESSOR,
            telemetry=self.telemetry.for_component("processor", "batch"),
            logger=logging.getLogger("test.batch"),
            shutdown_grace=grace,
        )
        self.processor = factory.create(settings, config, Ports(input=receive, output=self.sink))

    def counter(self, name: str, **labels: str) -> float:
        return self.telemetry.value(name, processor="batch", **labels)


def config(**kw: Any) -> BatchConfig:
    if "timeout" in kw:
        kw["timeout"] = Duration(kw["timeout"])
    return BatchConfig(**kw)


# ---------------------------------------------------------------- config


def test_default_config_is_valid_and_matches_the_collector():
    c = BatchConfig()
    assert config_problems(c) == []
    assert (c.send_batch_size, c.send_batch_max_size, float(c.timeout)) == (8192, 0, 0.2)


def test_validate_reports_every_problem_with_its_key():
    problems = BatchConfig(send_batch_size=-1, send_batch_max_size=-5, timeout=Duration(-1.0)).validate()
    assert [p.split(":")[0] for p in problems] == ["send_batch_size", "send_batch_max_size", "timeout"]
    problems = BatchConfig(send_batch_size=100, send_batch_max_size=50).validate()
    assert problems == ["send_batch_max_size: must be 0 or >= send_batch_size (100), got 50"]
    assert BatchConfig(send_batch_size=100, send_batch_max_size=100).validate() == []


def test_factory_record():
    assert factory.type == "batch"
    assert factory.kind is Kind.PROCESSOR
    assert factory.signals == frozenset(Signal)
    assert factory.mutates_data is False
    assert factory.summary(BatchConfig()) == "size 8192, max unlimited, timeout 200ms"


def test_doc_page_lists_exactly_the_config_fields_with_their_defaults():
    page = Path(__file__).parent.parent / "docs" / "components" / "batch.md"
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", page.read_text(), flags=re.M)
    defaults = BatchConfig()
    assert {key: default for key, default in rows} == {f.name: str(getattr(defaults, f.name)) for f in fields(BatchConfig)}


# ---------------------------------------------------------------- triggers


async def test_size_trigger_sends_as_soon_as_enough_items_are_buffered(autojump_clock):
    h = Harness(config(send_batch_size=10, timeout=1.0))
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        start = trio.current_time()
        for _ in range(3):
            await h.send.send(make_batch(Signal.LOGS, items, 4))
        with trio.fail_after(10):
            await h.sink.wait_for_count(12)
        # Sent without waiting for the timeout; all 12 in one batch (no max size).
        assert h.sink.received_at == [start]
        assert [b.count for b in h.sink.batches] == [12]
        assert h.counter(SIZE_TRIGGER_METRIC) == 1
        assert h.counter(TIMEOUT_TRIGGER_METRIC) == 0
        await h.send.aclose()
    assert item_ids(Signal.LOGS, h.sink.requests()) == list(range(12))


async def test_timeout_trigger_sends_a_small_batch_after_timeout(autojump_clock):
    h = Harness(config(send_batch_size=100, timeout=0.2))
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        start = trio.current_time()
        await h.send.send(make_batch(Signal.TRACES, items, 2))
        await trio.sleep(0.1)
        await h.send.send(make_batch(Signal.TRACES, items, 3))
        with trio.fail_after(10):
            await h.sink.wait_for_count(5)
        # The deadline runs from the oldest buffered item, not from the last.
        assert h.sink.received_at == [pytest.approx(start + 0.2)]
        assert [b.count for b in h.sink.batches] == [5]
        assert h.counter(TIMEOUT_TRIGGER_METRIC) == 1

        # An idle processor sends nothing; the next item starts a new timeout.
        await trio.sleep(5)
        assert len(h.sink.batches) == 1
        second = trio.current_time()
        await h.send.send(make_batch(Signal.TRACES, items, 1))
        with trio.fail_after(10):
            await h.sink.wait_for_count(6)
        assert h.sink.received_at[1] == pytest.approx(second + 0.2)
        await h.send.aclose()
    assert h.counter(TIMEOUT_TRIGGER_METRIC) == 2
    assert h.counter(SIZE_TRIGGER_METRIC) == 0


async def test_leftover_after_a_size_send_waits_for_its_own_timeout(autojump_clock):
    h = Harness(config(send_batch_size=4, send_batch_max_size=4, timeout=0.5))
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        start = trio.current_time()
        await h.send.send(make_batch(Signal.LOGS, items, 3))
        await trio.sleep(0.3)
        await h.send.send(make_batch(Signal.LOGS, items, 6))  # 9 buffered: 4 + 4 go, 1 waits
        with trio.fail_after(10):
            await h.sink.wait_for_count(9)
        assert [b.count for b in h.sink.batches] == [4, 4, 1]
        assert h.sink.received_at == [start + 0.3, start + 0.3, pytest.approx(start + 0.8)]
        await h.send.aclose()
    assert h.counter(SIZE_TRIGGER_METRIC) == 2
    assert h.counter(TIMEOUT_TRIGGER_METRIC) == 1
    assert item_ids(Signal.LOGS, h.sink.requests()) == list(range(9))


@pytest.mark.parametrize("cfg", [dict(timeout=0), dict(send_batch_size=0, timeout=10)])
async def test_immediate_mode_passes_each_batch_straight_on(autojump_clock, cfg):
    h = Harness(config(**cfg))
    items = Items()
    sent = [make_batch(Signal.METRICS, items, n) for n in (1, 7, 3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        start = trio.current_time()
        for b in sent:
            await h.send.send(b)
        with trio.fail_after(10):
            await h.sink.wait_for_count(11)
        assert h.sink.received_at == [start] * 3
        await h.send.aclose()
    # The very same batches, not copies.
    assert [id(b) for b in h.sink.batches] == [id(b) for b in sent]


async def test_timeout_zero_still_splits_by_max_size(autojump_clock):
    h = Harness(config(timeout=0, send_batch_size=5, send_batch_max_size=5))
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        await h.send.send(make_batch(Signal.LOGS, items, 12))
        with trio.fail_after(10):
            await h.sink.wait_for_count(12)
        await h.send.aclose()
    assert [b.count for b in h.sink.batches] == [5, 5, 2]
    assert item_ids(Signal.LOGS, h.sink.requests()) == list(range(12))


async def test_empty_batch_is_done_at_once_and_not_forwarded(autojump_clock):
    h = Harness(config(send_batch_size=10, timeout=0.2))
    reports = []
    empty = Batch.of(Signal.LOGS, ExportLogsServiceRequest())
    empty.on_done.append(reports.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        await h.send.send(empty)
        await trio.testing.wait_all_tasks_blocked()
        assert reports == [True]
        await h.send.aclose()
    assert h.sink.batches == []


# ---------------------------------------------------------------- splitting


@pytest.mark.parametrize("signal", list(Signal))
async def test_max_size_splits_at_item_granularity_keeping_envelopes(autojump_clock, signal):
    h = Harness(config(send_batch_size=3, send_batch_max_size=4, timeout=1.0))
    items = Items()
    # One request with 10 items over two resources with two scopes each (3+2, 2+3).
    request = make_request(signal, items, [[3, 2], [2, 3]])
    incoming = Batch.of(signal, request)
    original = request.SerializeToString()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        start = trio.current_time()
        await h.send.send(incoming)
        with trio.fail_after(10):
            await h.sink.wait_for_count(10)
        await h.send.aclose()
    assert [b.count for b in h.sink.batches] == [4, 4, 2]
    assert h.sink.received_at == [start, start, pytest.approx(start + 1.0)]
    # Same items, same order, each still under its own resource, scope (and metric).
    assert flatten(signal, h.sink.requests()) == flatten(signal, [request])
    for b in h.sink.batches:
        assert b.count == sum(count_items(signal, r) for r in b.requests)
    # The incoming request was not changed.
    assert request.SerializeToString() == original


@pytest.mark.parametrize("signal", list(Signal))
def test_split_request_cuts_inside_scopes_and_metrics(signal):
    items = Items()
    request = make_request(signal, items, [[7, 0, 5], [], [9]])
    parts = split_request(signal, request, [1, 6, 4, 10])
    assert [count_items(signal, p) for p in parts] == [1, 6, 4, 10]
    assert flatten(signal, parts) == flatten(signal, [request])
    assert item_ids(signal, parts) == list(range(21))


def test_split_request_rejects_sizes_that_do_not_add_up():
    request = make_request(Signal.LOGS, Items(), [[5]])
    with pytest.raises(ValueError, match="add up to 4"):
        split_request(Signal.LOGS, request, [2, 2])
    with pytest.raises(ValueError, match="positive"):
        split_request(Signal.LOGS, request, [5, 0])


def test_split_metrics_keeps_temporality_and_monotonicity():
    request = make_request(Signal.METRICS, Items(), [[9]])
    parts = split_request(Signal.METRICS, request, [2, 2, 5])
    sums = [m for p in parts for rm in p.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.WhichOneof("data") == "sum"]
    assert len(sums) == 2  # the 3 sum points were cut 2 + 1
    for m in sums:
        assert (m.name, m.description, m.unit) == ("m.sum", "a sum", "By")
        assert m.sum.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
        assert m.sum.is_monotonic


def test_split_batch_shares_whole_requests_and_cuts_the_straddling_one():
    items = Items()
    reqs = [make_request(Signal.LOGS, items, [[n]]) for n in (3, 5, 2)]
    batch = Batch.of(Signal.LOGS, *reqs)
    parts = split_batch(batch, [3, 4, 3])
    assert [p.count for p in parts] == [3, 4, 3]
    assert parts[0].requests[0] is reqs[0]  # not copied
    assert parts[2].requests[-1] is reqs[2]
    assert item_ids(Signal.LOGS, [r for p in parts for r in p.requests]) == list(range(10))
    assert split_batch(batch, [10]) == [batch]


@settings(max_examples=150, deadline=None)
@given(
    signal=st.sampled_from(list(Signal)),
    shape=st.lists(st.lists(st.integers(0, 6), max_size=4), min_size=1, max_size=4),
    data=st.data(),
)
def test_split_request_preserves_items_and_envelopes(signal, shape, data):
    request = make_request(signal, Items(), shape)
    total = count_items(signal, request)
    sizes = []
    left = total
    while left:
        s = data.draw(st.integers(1, left))
        sizes.append(s)
        left -= s
    if not sizes:
        return
    parts = split_request(signal, request, sizes)
    assert [count_items(signal, p) for p in parts] == sizes
    assert flatten(signal, parts) == flatten(signal, [request])


# ---------------------------------------------------------------- end of stream and shutdown


async def test_input_close_flushes_without_waiting_for_the_timeout(autojump_clock):
    h = Harness(config(send_batch_size=100, timeout=60))
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        start = trio.current_time()
        await h.send.send(make_batch(Signal.LOGS, items, 5))
        await h.send.send(make_batch(Signal.LOGS, items, 5))
        await h.send.aclose()
    # run() returned on its own, right away, after sending what it held.
    assert trio.current_time() == start
    assert [b.count for b in h.sink.batches] == [10]
    assert item_ids(Signal.LOGS, h.sink.requests()) == list(range(10))


async def test_cancel_flushes_what_is_buffered(autojump_clock):
    h = Harness(config(send_batch_size=100, timeout=60))
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        await h.send.send(make_batch(Signal.TRACES, items, 7))
        await trio.testing.wait_all_tasks_blocked()
        assert h.sink.batches == []
        nursery.cancel_scope.cancel()
    assert [b.count for b in h.sink.batches] == [7]
    assert h.counter("tapio_processor_dropped_items_total") == 0


async def test_cancel_with_a_stuck_consumer_gives_up_after_grace_and_reports_not_delivered(autojump_clock):
    h = Harness(config(send_batch_size=100, timeout=60), grace=2.0)
    h.sink.pause()
    reports = []
    items = Items()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        b = make_batch(Signal.LOGS, items, 7)
        b.on_done.append(reports.append)
        await h.send.send(b)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    # The flush waited the grace period, not forever, then gave the items up.
    assert trio.current_time() == pytest.approx(start + 2.0)
    assert h.sink.batches == []
    assert reports == [False]
    assert h.counter("tapio_processor_dropped_items_total", reason="shutdown") == 7


async def test_cancel_during_backpressure_loses_nothing_when_consumer_recovers(autojump_clock):
    h = Harness(config(send_batch_size=4, send_batch_max_size=4, timeout=60), grace=5.0)
    items = Items()
    h.sink.pause()

    async def recover_later():
        await trio.sleep(1)
        h.sink.resume()

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as inner:
            await inner.start(h.processor.run)
            await h.send.send(make_batch(Signal.LOGS, items, 10))  # the processor blocks sending the first 4
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(recover_later)
            inner.cancel_scope.cancel()
    assert [b.count for b in h.sink.batches] == [4, 4, 2]
    assert item_ids(Signal.LOGS, h.sink.requests()) == list(range(10))
    assert h.counter("tapio_processor_dropped_items_total") == 0


async def test_backpressure_reaches_the_input_channel(autojump_clock):
    h = Harness(config(send_batch_size=2, timeout=1), capacity=2)
    items = Items()
    h.sink.pause()
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        # One batch is held by the processor (blocked sending), two wait in the channel.
        for _ in range(3):
            await h.send.send(make_batch(Signal.LOGS, items, 2))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            h.send.send_nowait(make_batch(Signal.LOGS, Items(), 2))
        h.sink.resume()
        with trio.fail_after(10):
            await h.sink.wait_for_count(6)
        await h.send.aclose()
    assert item_ids(Signal.LOGS, h.sink.requests()) == list(range(6))


# ---------------------------------------------------------------- on_done accounting


def test_countdown_calls_once_after_every_part():
    reports = []
    cd = DoneCountdown([reports.append, reports.append], 3)
    cd.part_done(True)
    cd.part_done(False)
    assert reports == []
    cd.part_done(True)
    assert reports == [False, False]
    with pytest.raises(RuntimeError):
        cd.part_done(True)
    with pytest.raises(ValueError):
        DoneCountdown([], 0)


async def test_on_done_is_called_once_per_incoming_batch_across_splits(autojump_clock):
    h = Harness(config(send_batch_size=3, send_batch_max_size=3, timeout=0.2), ack=None)
    items = Items()
    reports: dict[int, list[bool]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(h.processor.run)
        for i, n in enumerate([2, 5, 1, 4]):
            b = make_batch(Signal.LOGS, items, n, requests=2 if n > 1 else 1)
            reports[i] = []
            b.on_done.append(reports[i].append)
            await h.send.send(b)
        with trio.fail_after(10):
            await h.sink.wait_for_count(12)
        await h.send.aclose()
    out = h.sink.batches
    assert [b.count for b in out] == [3, 3, 3, 3]
    # Items 0-1 | 2-6 | 7 | 8-11 over outputs 0-2 | 3-5 | 6-8 | 9-11.
    out[0].done(True)
    assert reports == {0: [True], 1: [], 2: [], 3: []}  # batch 1 also has items in outputs 1 and 2
    out[2].done(False)
    assert reports == {0: [True], 1: [], 2: [False], 3: []}  # batch 2 lies wholly in output 2
    out[1].done(True)
    assert reports[1] == [False]  # one of its parts (in output 2) was not delivered
    assert reports[3] == []
    out[3].done(True)
    assert reports == {0: [True], 1: [False], 2: [False], 3: [False]}


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    send_batch_size=st.integers(0, 30),
    extra=st.integers(0, 20),
    unlimited=st.booleans(),
    timeout=st.sampled_from([0.0, 0.05, 0.2]),
    gaps=st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.3]), min_size=12, max_size=12),
    signal=st.sampled_from(list(Signal)),
)
def test_output_keeps_every_item_in_order_and_within_max(sizes, send_batch_size, extra, unlimited, timeout, gaps, signal):
    max_size = 0 if unlimited else send_batch_size + extra
    if max_size == 0 and not unlimited:
        max_size = 1
    cfg = config(send_batch_size=send_batch_size, send_batch_max_size=max_size, timeout=timeout)
    reports: list[list[bool]] = []

    async def scenario():
        h = Harness(cfg, ack=True)
        items = Items()
        async with trio.open_nursery() as nursery:
            await nursery.start(h.processor.run)
            for n, gap in zip(sizes, gaps):
                b = make_batch(signal, items, n, requests=1 + n % 3)
                r: list[bool] = []
                reports.append(r)
                b.on_done.append(r.append)
                await h.send.send(b)
                await trio.sleep(gap)
            await h.send.aclose()
        return h, items.next

    h, total = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert item_ids(signal, h.sink.requests()) == list(range(total))
    for b in h.sink.batches:
        assert b.count == sum(count_items(signal, r) for r in b.requests) > 0
        if max_size:
            assert b.count <= max_size
    assert reports == [[True]] * len(sizes)


# ---------------------------------------------------------------- in the real runtime


async def test_in_a_running_service_batches_counts_and_drains_on_shutdown(autojump_clock):
    """A test source → the real batch processor → a test exporter, wired and run by tapio.service."""
    from tapio.component import Factory, PipelineID, Registry
    from tapio.service import RuntimeOptions, Service

    @dataclass(frozen=True, kw_only=True)
    class NoConfig:
        def validate(self) -> list[str]:
            return []

    feed_send, feed_receive = trio.open_memory_channel[Batch](0)
    exported = RecordingConsumer(ack=True)

    class Source:
        def __init__(self, settings, config, ports):
            self.output = ports.output

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            async for b in feed_receive:
                await self.output.send(b)

    class Exporter:
        def __init__(self, settings, config, ports):
            self.input, self.tel = ports.input, settings.telemetry

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            async for b in self.input:
                self.tel.signal_add("exporter_sent", b.signal, b.count)
                await exported.send(b)

    def test_factory(kind, type_, create):
        return Factory(type=type_, kind=kind, config_class=NoConfig, signals=frozenset(Signal), create=create, description=type_)

    @dataclass
    class Pipeline:
        receivers: list
        processors: list
        exporters: list

    registry = Registry([test_factory(Kind.RECEIVER, "feed", Source), factory, test_factory(Kind.EXPORTER, "record", Exporter)])
    pipelines = {PipelineID.parse("logs"): Pipeline([ComponentID("feed")], [ComponentID("batch")], [ComponentID("record")])}
    components = {
        Kind.RECEIVER: {ComponentID("feed"): NoConfig()},
        Kind.PROCESSOR: {ComponentID("batch"): config(send_batch_size=10, send_batch_max_size=10, timeout=0.2)},
        Kind.EXPORTER: {ComponentID("record"): NoConfig()},
    }
    telemetry = Telemetry()
    service = Service(pipelines=pipelines, components=components, registry=registry, telemetry=telemetry, options=RuntimeOptions())
    items = Items()
    reports: list[list[bool]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        start = trio.current_time()
        for _ in range(5):
            b = make_batch(Signal.LOGS, items, 3)
            reports.append([])
            b.on_done.append(reports[-1].append)
            await feed_send.send(b)
        with trio.fail_after(10):
            await exported.wait_for_count(10)
        assert exported.received_at == [start]
        # 5 items left buffered (timeout 0.2 s); shutdown drains them through.
        service.shutdown()
    assert [b.count for b in exported.batches] == [10, 5]
    assert trio.current_time() - start < 0.2  # the drain did not wait for the timeout
    assert item_ids(Signal.LOGS, exported.requests()) == list(range(15))
    assert reports == [[True]] * 5
    assert telemetry.value("tapio_processor_incoming_items_total", processor="batch") == 15
    assert telemetry.value("tapio_processor_outgoing_items_total", processor="batch") == 15
    assert telemetry.value(SIZE_TRIGGER_METRIC, processor="batch") == 1
    assert telemetry.value(TIMEOUT_TRIGGER_METRIC, processor="batch") == 1
