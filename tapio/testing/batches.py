"""Small batches of each signal for tests: records whose bodies or names say where they came from.

Every builder returns a fresh `Batch` holding one request with one resource
and one scope, so tests can compare what arrived with what was sent by
body (`log_bodies`) without caring how a stage regrouped the records.
"""

from __future__ import annotations

from typing import Any, Iterable

from tapio.pdata import Batch, Signal

__all__ = ["attributes", "log_batch", "log_bodies", "log_records", "metric_batch", "numbered", "span_batch", "spans"]


def numbered(n: int, prefix: str = "record ", start: int = 0) -> list[str]:
    """``[prefix+start, …, prefix+(start+n-1)]``: distinct bodies to find again downstream."""
    return [f"{prefix}{i}" for i in range(start, start + n)]


def log_batch(records: int | Iterable[str] = 1) -> Batch:
    """A logs batch of ``records`` log records: a count (bodies from `numbered`) or the bodies themselves."""
    bodies = numbered(records) if isinstance(records, int) else records
    req = Signal.LOGS.request_class()
    sl = req.resource_logs.add().scope_logs.add()
    for body in bodies:
        sl.log_records.add().body.string_value = body
    return Batch.of(Signal.LOGS, req)


def span_batch(n: int) -> Batch:
    """A traces batch of ``n`` spans named ``span0`` … with fixed trace and span ids."""
    req = Signal.TRACES.request_class()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(name=f"span{i}", trace_id=bytes(range(16)), span_id=bytes(range(8)))
    return Batch.of(Signal.TRACES, req)


def metric_batch(n: int) -> Batch:
    """A metrics batch of one gauge ``m`` with ``n`` data points (values 0 … n-1)."""
    req = Signal.METRICS.request_class()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    for i in range(n):
        m.gauge.data_points.add(as_int=i)
    return Batch.of(Signal.METRICS, req)


def log_bodies(batches: Iterable[Batch]) -> list[str]:
    """The string bodies of every log record in ``batches``, in order."""
    return [
        lr.body.string_value
        for batch in batches
        for req in batch.requests
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for lr in sl.log_records
    ]


def attributes(item: Any) -> dict[str, Any]:
    """A log record's, span's or data point's attributes as a dict (arrays as lists of their string values)."""
    out: dict[str, Any] = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = [v.string_value for v in kv.value.array_value.values] if kind == "array_value" else getattr(kv.value, kind)
    return out


def log_records(batches: Iterable[Batch]) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, record) for every log record in ``batches`` (other signals skipped), in order."""
    return [
        (attributes(lr), lr)
        for batch in batches
        if batch.signal is Signal.LOGS
        for req in batch.requests
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for lr in sl.log_records
    ]


def spans(batches: Iterable[Batch]) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, span) for every span in ``batches`` (other signals skipped), in order."""
    return [
        (attributes(span), span)
        for batch in batches
        if batch.signal is Signal.TRACES
        for req in batch.requests
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
