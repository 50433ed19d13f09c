"""The ``debug`` exporter: prints what reaches it, for people looking at a pipeline.

Invariants:
- Every batch is counted ``exporter_sent`` and finished as delivered, whether
  or not sampling printed it: printing is a view, not a destination.
- Sampling is per exporter and per second, as the OpenTelemetry Collector's
  debug exporter: the first ``sampling_initial`` batches of each second are
  printed, then every ``sampling_thereafter``-th (0: none).
- Output for one batch is written with one ``write`` call, from a worker
  thread (a stalled stderr pipe must not stall trio), one batch at a time.

Formatting functions (`format_basic`, `format_normal`, `format_detailed`)
are pure and take a `Batch`; they return text ending in a newline.
"""

from __future__ import annotations

import base64
import datetime
import json
import sys
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import trio

from tapio.component import Factory, Kind, Ports, Settings, setting
from tapio.pdata import Batch, Signal

_SEVERITY_NAMES = ["", "TRACE", "TRACE2", "TRACE3", "TRACE4", "DEBUG", "DEBUG2", "DEBUG3", "DEBUG4", "INFO", "INFO2", "INFO3", "INFO4",
                   "WARN", "WARN2", "WARN3", "WARN4", "ERROR", "ERROR2", "ERROR3", "ERROR4", "FATAL", "FATAL2", "FATAL3", "FATAL4"]  # fmt: skip
_SPAN_KINDS = ["Unspecified", "Internal", "Server", "Client", "Producer", "Consumer"]
_STATUS_CODES = ["Unset", "Ok", "Error"]
_TEMPORALITY = ["Unspecified", "Delta", "Cumulative"]
_INDENT = "     -> "


@dataclass(frozen=True, kw_only=True)
class DebugConfig:
    verbosity: Literal["basic", "normal", "detailed"] = setting("basic", doc="`basic`: one line per batch (signal and item counts). `normal`: one line per log record, span or data point. `detailed`: every field, several lines per item.")
    sampling_initial: int = setting(2, doc="Number of batches printed in full each second before sampling starts. 0: sampling applies from the first batch.")
    sampling_thereafter: int = setting(1, doc="After `sampling_initial` batches in a second, print every this-many-th batch. 1 prints all of them; 0 prints none.")
    output: Literal["stderr", "stdout"] = setting("stderr", doc="Where the text goes.")

    def validate(self) -> list[str]:
        problems = []
        if self.verbosity not in ("basic", "normal", "detailed"):
            problems.append(f"verbosity: must be basic, normal or detailed, got {self.verbosity!r}")
        if self.sampling_initial < 0:
            problems.append(f"sampling_initial: must be 0 or more, got {self.sampling_initial}")
        if self.sampling_thereafter < 0:
            problems.append(f"sampling_thereafter: must be 0 or more, got {self.sampling_thereafter}")
        if self.output not in ("stderr", "stdout"):
            problems.append(f"output: must be stderr or stdout, got {self.output!r}")
        return problems


class Sampler:
    """The first ``initial`` events of each one-second window pass, then every ``thereafter``-th (0: none)."""

    def __init__(self, initial: int, thereafter: int) -> None:
        self.initial = initial
        self.thereafter = thereafter
        self._window = -1
        self._seen = 0

    def allow(self, now: float) -> bool:
        window = int(now)
        if window != self._window:
            self._window, self._seen = window, 0
        self._seen += 1
        if self._seen <= self.initial:
            return True
        return self.thereafter > 0 and (self._seen - self.initial) % self.thereafter == 0


# ----------------------------------------------------------------------------- value rendering


def format_time(unix_nano: int) -> str:
    """``2026-11-23 19:20:00.000000789 +0000 UTC`` (as Go prints a time; no fraction when it is zero)."""
    seconds, nanos = divmod(unix_nano, 1_000_000_000)
    try:
        text = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return f"{unix_nano}ns"
    return f"{text}.{nanos:09d} +0000 UTC" if nanos else f"{text} +0000 UTC"


def _plain(value: Any) -> Any:
    """An AnyValue as a plain Python value (for JSON inside Slice/Map)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if kind == "double_value" and value.double_value != value.double_value:
        return "NaN"
    return getattr(value, kind) if kind else None


def format_value(value: Any) -> str:
    """An AnyValue with its type: ``Str(x)``, ``Int(3)``, ``Map({"a":1})`` …"""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return f"Str({value.string_value})"
    if kind == "int_value":
        return f"Int({value.int_value})"
    if kind == "bool_value":
        return f"Bool({str(value.bool_value).lower()})"
    if kind == "double_value":
        return f"Double({value.double_value!r})"
    if kind == "bytes_value":
        return f"Bytes({base64.b64encode(value.bytes_value).decode()})"
    if kind == "array_value":
        return f"Slice({json.dumps(_plain(value), separators=(',', ':'), ensure_ascii=False, allow_nan=True)})"
    if kind == "kvlist_value":
        return f"Map({json.dumps(_plain(value), separators=(',', ':'), ensure_ascii=False, allow_nan=True)})"
    return "Empty()"


def _short_value(value: Any) -> str:
    """An AnyValue for a one-line view: strings as they are, the rest as JSON."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    plain = _plain(value)
    return json.dumps(plain, separators=(",", ":"), ensure_ascii=False) if isinstance(plain, (list, dict, bool)) else str(plain)


def _kv_pairs(attributes: Any) -> str:
    return " ".join(f"{kv.key}={_short_value(kv.value)}" for kv in attributes)


def _attributes_block(lines: list[str], title: str, attributes: Any, indent: str = _INDENT) -> None:
    if attributes:
        lines.append(title)
        lines.extend(f"{indent}{kv.key}: {format_value(kv.value)}" for kv in attributes)


# ----------------------------------------------------------------------------- basic


def _resources(batch: Batch) -> int:
    field = {Signal.LOGS: "resource_logs", Signal.TRACES: "resource_spans", Signal.METRICS: "resource_metrics"}[batch.signal]
    return sum(len(getattr(r, field)) for r in batch.requests)


def format_basic(batch: Batch) -> str:
    """``logs: 3 log records from 1 resource``"""
    items = batch.signal.item_name.replace("_", " ")
    resources = _resources(batch)
    return f"{batch.signal.value}: {batch.count} {items} from {resources} resource{'s' if resources != 1 else ''}\n"


# ----------------------------------------------------------------------------- normal


def _enum_name(names: list[str], value: int) -> str:
    """The name of an enum value, or the number for one outside ``names`` (open enums: a peer may send any int32)."""
    return names[value] if 0 <= value < len(names) else str(value)


def _severity(record: Any) -> str:
    if record.severity_text:
        return record.severity_text
    n = record.severity_number
    return _SEVERITY_NAMES[n] if 0 < n < len(_SEVERITY_NAMES) else ("-" if n == 0 else str(n))


def _point_value(point: Any) -> str:
    kind = point.WhichOneof("value")
    return repr(point.as_double) if kind == "as_double" else str(point.as_int) if kind == "as_int" else "-"


def format_normal(batch: Batch) -> str:
    """One line per log record (time, severity, body, attributes), span or metric data point."""
    lines: list[str] = []
    for request in batch.requests:
        if batch.signal is Signal.LOGS:
            for rl in request.resource_logs:
                for sl in rl.scope_logs:
                    for r in sl.log_records:
                        when = format_time(r.time_unix_nano or r.observed_time_unix_nano)
                        parts = [when, _severity(r), _short_value(r.body) if r.HasField("body") else "", _kv_pairs(r.attributes)]
                        lines.append(" ".join(p for p in parts if p))
        elif batch.signal is Signal.TRACES:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        duration = (s.end_time_unix_nano - s.start_time_unix_nano) / 1e6 if s.end_time_unix_nano else 0.0
                        status = _enum_name(_STATUS_CODES, s.status.code)
                        parts = [s.name, s.trace_id.hex(), s.span_id.hex(), f"{duration:g}ms", status, _kv_pairs(s.attributes)]
                        lines.append(" ".join(p for p in parts if p))
        else:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        lines.extend(_normal_points(m))
    return "".join(line + "\n" for line in lines)


def _normal_points(metric: Any) -> list[str]:
    kind = metric.WhichOneof("data")
    if kind is None:
        return []
    out = []
    for p in getattr(metric, kind).data_points:
        attrs = "{" + ",".join(f"{kv.key}={_short_value(kv.value)}" for kv in p.attributes) + "}"
        if kind in ("gauge", "sum"):
            value = _point_value(p)
        elif kind == "summary":
            value = f"count={p.count} sum={p.sum!r}"
        else:
            value = f"count={p.count} sum={p.sum!r}" if p.HasField("sum") else f"count={p.count}"
        out.append(f"{metric.name} {attrs} {value}")
    return out


# ----------------------------------------------------------------------------- detailed


def _resource_lines(lines: list[str], title: str, index: int, holder: Any) -> None:
    lines.append(f"{title} #{index}")
    lines.append(f"Resource SchemaURL: {holder.schema_url}")
    _attributes_block(lines, "Resource attributes:", holder.resource.attributes)


def _scope_lines(lines: list[str], title: str, index: int, holder: Any) -> None:
    lines.append(f"{title} #{index}")
    lines.append(f"{title} SchemaURL: {holder.schema_url}")
    lines.append(f"InstrumentationScope {holder.scope.name} {holder.scope.version}".rstrip())
    _attributes_block(lines, "InstrumentationScope attributes:", holder.scope.attributes)


def format_detailed(batch: Batch) -> str:
    """Every field of every item, several lines each (in the spirit of the Collector's detailed output)."""
    lines: list[str] = []
    for request in batch.requests:
        if batch.signal is Signal.LOGS:
            for i, rl in enumerate(request.resource_logs):
                _resource_lines(lines, "ResourceLog", i, rl)
                for j, sl in enumerate(rl.scope_logs):
                    _scope_lines(lines, "ScopeLogs", j, sl)
                    for k, r in enumerate(sl.log_records):
                        _detailed_log(lines, k, r)
        elif batch.signal is Signal.TRACES:
            for i, rs in enumerate(request.resource_spans):
                _resource_lines(lines, "ResourceSpans", i, rs)
                for j, ss in enumerate(rs.scope_spans):
                    _scope_lines(lines, "ScopeSpans", j, ss)
                    for k, s in enumerate(ss.spans):
                        _detailed_span(lines, k, s)
        else:
            for i, rm in enumerate(request.resource_metrics):
                _resource_lines(lines, "ResourceMetrics", i, rm)
                for j, sm in enumerate(rm.scope_metrics):
                    _scope_lines(lines, "ScopeMetrics", j, sm)
                    for k, m in enumerate(sm.metrics):
                        _detailed_metric(lines, k, m)
    return "".join(line + "\n" for line in lines)


def _detailed_log(lines: list[str], index: int, r: Any) -> None:
    lines += [
        f"LogRecord #{index}",
        f"ObservedTimestamp: {format_time(r.observed_time_unix_nano)}",
        f"Timestamp: {format_time(r.time_unix_nano)}",
        f"SeverityText: {r.severity_text}",
        f"SeverityNumber: {_severity_number(r.severity_number)}",
    ]
    if r.event_name:
        lines.append(f"EventName: {r.event_name}")
    lines.append(f"Body: {format_value(r.body)}")
    _attributes_block(lines, "Attributes:", r.attributes)
    lines += [f"Trace ID: {r.trace_id.hex()}", f"Span ID: {r.span_id.hex()}", f"Flags: {r.flags}"]
    if r.dropped_attributes_count:
        lines.append(f"DroppedAttributesCount: {r.dropped_attributes_count}")


def _severity_number(n: int) -> str:
    name = _SEVERITY_NAMES[n] if 0 < n < len(_SEVERITY_NAMES) else "Unspecified" if n == 0 else "Unknown"
    return f"{name}({n})"


def _detailed_span(lines: list[str], index: int, s: Any) -> None:
    kind = _enum_name(_SPAN_KINDS, s.kind)
    code = _enum_name(_STATUS_CODES, s.status.code)
    lines += [
        f"Span #{index}",
        f"    Trace ID       : {s.trace_id.hex()}",
        f"    Parent ID      : {s.parent_span_id.hex()}",
        f"    ID             : {s.span_id.hex()}",
        f"    Name           : {s.name}",
        f"    Kind           : {kind}",
        f"    TraceState     : {s.trace_state}",
        f"    Start time     : {format_time(s.start_time_unix_nano)}",
        f"    End time       : {format_time(s.end_time_unix_nano)}",
        f"    Status code    : {code}",
        f"    Status message : {s.status.message}",
        f"    Flags          : {s.flags}",
    ]
    _attributes_block(lines, "Attributes:", s.attributes)
    if s.events:
        lines.append("Events:")
        for i, e in enumerate(s.events):
            lines += [f"SpanEvent #{i}", f"{_INDENT}Name: {e.name}", f"{_INDENT}Timestamp: {format_time(e.time_unix_nano)}"]
            lines.append(f"{_INDENT}DroppedAttributesCount: {e.dropped_attributes_count}")
            _attributes_block(lines, f"{_INDENT}Attributes:", e.attributes, "          -> ")
    if s.links:
        lines.append("Links:")
        for i, link in enumerate(s.links):
            lines += [
                f"SpanLink #{i}",
                f"{_INDENT}Trace ID: {link.trace_id.hex()}",
                f"{_INDENT}ID: {link.span_id.hex()}",
                f"{_INDENT}TraceState: {link.trace_state}",
                f"{_INDENT}DroppedAttributesCount: {link.dropped_attributes_count}",
            ]
            _attributes_block(lines, f"{_INDENT}Attributes:", link.attributes, "          -> ")
    counts = (s.dropped_attributes_count, s.dropped_events_count, s.dropped_links_count)
    if any(counts):
        lines.append("Dropped: attributes={} events={} links={}".format(*counts))


def _detailed_metric(lines: list[str], index: int, m: Any) -> None:
    kind = m.WhichOneof("data")
    data_type = {"gauge": "Gauge", "sum": "Sum", "histogram": "Histogram", "exponential_histogram": "ExponentialHistogram", "summary": "Summary", None: "Empty"}[kind]
    lines += [f"Metric #{index}", "Descriptor:", f"{_INDENT}Name: {m.name}", f"{_INDENT}Description: {m.description}", f"{_INDENT}Unit: {m.unit}", f"{_INDENT}DataType: {data_type}"]
    if kind is None:
        return
    data = getattr(m, kind)
    if kind == "sum":
        lines.append(f"{_INDENT}IsMonotonic: {str(data.is_monotonic).lower()}")
    if kind in ("sum", "histogram", "exponential_histogram"):
        t = data.aggregation_temporality
        lines.append(f"{_INDENT}AggregationTemporality: {_enum_name(_TEMPORALITY, t)}")
    title = {"gauge": "NumberDataPoints", "sum": "NumberDataPoints", "histogram": "HistogramDataPoints", "exponential_histogram": "ExponentialHistogramDataPoints", "summary": "SummaryDataPoints"}[kind]
    for i, p in enumerate(data.data_points):
        lines.append(f"{title} #{i}")
        _attributes_block(lines, "Data point attributes:", p.attributes)
        lines += [f"StartTimestamp: {format_time(p.start_time_unix_nano)}", f"Timestamp: {format_time(p.time_unix_nano)}"]
        if kind in ("gauge", "sum"):
            lines.append(f"Value: {_point_value(p)}")
        else:
            lines.append(f"Count: {p.count}")
            if kind == "summary" or p.HasField("sum"):
                lines.append(f"Sum: {p.sum!r}")
        if kind in ("histogram", "exponential_histogram"):
            if p.HasField("min"):
                lines.append(f"Min: {p.min!r}")
            if p.HasField("max"):
                lines.append(f"Max: {p.max!r}")
        if kind == "histogram":
            lines += [f"ExplicitBounds #{j}: {b!r}" for j, b in enumerate(p.explicit_bounds)]
            lines += [f"Buckets #{j}, Count: {c}" for j, c in enumerate(p.bucket_counts)]
        elif kind == "exponential_histogram":
            lines += [f"Scale: {p.scale}", f"ZeroCount: {p.zero_count}"]
            for name, buckets in (("Positive", p.positive), ("Negative", p.negative)):
                lines.append(f"{name} offset: {buckets.offset}, bucket counts: {list(buckets.bucket_counts)}")
        elif kind == "summary":
            lines += [f"QuantileValue #{j}: Quantile {q.quantile!r}, Value {q.value!r}" for j, q in enumerate(p.quantile_values)]
        for j, e in enumerate(getattr(p, "exemplars", ())):
            lines.append(f"Exemplar #{j}: {_point_value(e)} at {format_time(e.time_unix_nano)} trace {e.trace_id.hex()} span {e.span_id.hex()}")


_FORMATTERS = {"basic": format_basic, "normal": format_normal, "detailed": format_detailed}


class DebugExporter:
    def __init__(self, settings: Settings, config: DebugConfig, ports: Ports, stream: TextIO | None = None) -> None:
        """``stream``: where to write; None means sys.stderr or sys.stdout (per ``config.output``) at start."""
        self.settings = settings
        self.config = config
        self.input = ports.input
        self.stream = stream
        self.sampler = Sampler(config.sampling_initial, config.sampling_thereafter)
        self._write_failed = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stream = self.stream or (sys.stdout if self.config.output == "stdout" else sys.stderr)
        render = _FORMATTERS[self.config.verbosity]
        telemetry = self.settings.telemetry
        task_status.started()
        async for batch in self.input:
            if self.sampler.allow(trio.current_time()):
                text = render(batch)
                if text:
                    try:
                        await trio.to_thread.run_sync(_write, stream, text)
                    except OSError as e:  # a closed pipe: the data still went where the pipeline sent it
                        if not self._write_failed:
                            self._write_failed = True
                            self.settings.logger.warning("debug exporter cannot write its output (%s); printing stops being reported", e)
            telemetry.signal_add("exporter_sent", batch.signal, batch.count)
            batch.done(True)


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def _create(settings: Settings, config: DebugConfig, ports: Ports) -> DebugExporter:
    return DebugExporter(settings, config, ports)


factory = Factory(
    type="debug",
    kind=Kind.EXPORTER,
    config_class=DebugConfig,
    signals=frozenset(Signal),
    create=_create,
    description="Prints batches to stderr or stdout: a line per batch, a line per item, or every field.",
    summary=lambda c: f"{c.verbosity} to {c.output}",
)
