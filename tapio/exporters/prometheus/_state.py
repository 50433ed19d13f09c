"""The series the prometheus exporter exposes, accumulated from OTLP metrics requests.

Translation follows the OpenTelemetry specification "Prometheus and
OpenMetrics Compatibility" and the OTel Collector's prometheus exporter:
gauges and non-monotonic cumulative sums become gauges, monotonic sums
counters (``_total``), delta sums and delta histograms are accumulated
into cumulative values, histograms become ``_bucket{le}``/``_sum``/
``_count``, summaries ``{quantile}``/``_sum``/``_count``; the resource gives
``job`` (``service.namespace/service.name``) and ``instance``
(``service.instance.id``) and its other attributes go to ``target_info``.

Invariants:
- No I/O and no clock: callers pass ``now`` (any monotonic seconds) to
  `MetricsState.ingest` and `MetricsState.expire`, which makes the state a
  pure function of what was fed in, and what renders it (`_render`) a pure
  function of the state.
- A series is identified by its family name and its full, sorted label set;
  its label text (already escaped) is built once, when the series is made.
- Every family holds series of exactly one kind. A metric whose name maps to
  a family of another kind is refused (``type_conflict``), never mixed in.
- ``series_count`` equals the number of series in all families (not
  counting ``target_info``) and never exceeds ``max_series`` (when > 0): a
  data point that would add a series beyond it is refused
  (``series_limit``); points for existing series are always taken.
- A series never goes back in time: a point older than the one held is
  refused (``out_of_order``); a delta point is added only when its start
  time is the end time of what was accumulated, otherwise (a gap) the
  series restarts from it, which Prometheus sees as a counter reset.
- Every data point handed to `ingest` is either taken or counted in the
  returned `IngestResult` under one reason. Points no Prometheus format can
  carry (a negative or NaN counter, a NaN histogram sum, bounds not
  increasing) are refused as ``malformed``.
- No two families use the same name in either format (a counter ``x_total``
  is family ``x`` in OpenMetrics, a histogram ``h`` uses ``h_count`` …):
  the later one is refused (``type_conflict``).
"""

from __future__ import annotations

import base64
import bisect
import json
import math
from typing import Any, Iterable

from tapio.promtext import COUNTER, GAUGE, HISTOGRAM, SUMMARY, format_float, label_name, label_text, metric_name

#: the OTLP data point flag "no recorded value": the series went stale
FLAG_NO_RECORDED_VALUE = 1
_DELTA = 1
_CUMULATIVE = 2

#: OpenMetrics caps an exemplar's label set (names and values) at 128 UTF-8 characters
EXEMPLAR_LABEL_CHARS = 128

#: refusal reasons, as counted
SERIES_LIMIT = "series_limit"
TYPE_CONFLICT = "type_conflict"
OUT_OF_ORDER = "out_of_order"
UNSUPPORTED = "unsupported"
MALFORMED = "malformed"

# ---------------------------------------------------------------- attribute values


def attribute_text(value: Any) -> str:
    """An OTLP AnyValue as label text (strings as they are, others as the OTel attribute spec says)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return ""
    return _non_string(value, kind)


def _non_string(value: Any, kind: str) -> str:
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return format_float(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return json.dumps(_json_value(value), separators=(",", ":"), ensure_ascii=False)


def _json_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        d = value.double_value
        return d if math.isfinite(d) else format_float(d)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind == "array_value":
        return [_json_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _json_value(kv.value) for kv in value.kvlist_value.values}
    return None


# ---------------------------------------------------------------- series


class Exemplar:
    """One exemplar, already rendered as the OpenMetrics text that follows its sample."""

    __slots__ = ("value", "text")

    def __init__(self, value: float, text: str) -> None:
        self.value = value
        self.text = text


class Scalar:
    """A counter or gauge series."""

    __slots__ = ("body", "labels", "value", "time_ns", "start_ns", "seen", "exemplar")

    def __init__(self, body: str) -> None:
        self.body = body
        self.labels = "{" + body + "}" if body else ""
        self.value: float = 0
        self.time_ns = 0
        self.start_ns = 0
        self.seen = 0.0
        self.exemplar: Exemplar | None = None


class Histogram:
    """A histogram series: per-bucket (not cumulative) counts as in OTLP."""

    __slots__ = ("body", "labels", "bounds", "buckets", "sum", "count", "time_ns", "start_ns", "seen", "exemplars")

    def __init__(self, body: str) -> None:
        self.body = body
        self.labels = "{" + body + "}" if body else ""
        self.bounds: tuple[float, ...] = ()
        self.buckets: list[int] = []
        self.sum: float | None = None
        self.count = 0
        self.time_ns = 0
        self.start_ns = 0
        self.seen = 0.0
        #: one (or None) per bucket, the +Inf bucket last
        self.exemplars: list[Exemplar | None] | None = None


class Summary:
    __slots__ = ("body", "labels", "quantiles", "sum", "count", "time_ns", "seen")

    def __init__(self, body: str) -> None:
        self.body = body
        self.labels = "{" + body + "}" if body else ""
        self.quantiles: list[tuple[float, float]] = []
        self.sum = 0.0
        self.count = 0
        self.time_ns = 0
        self.seen = 0.0


class Family:
    """Series of one name and kind; ``name`` is the sample name (a counter's includes ``_total``)."""

    __slots__ = ("name", "kind", "help", "series")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help
        self.series: dict[tuple[tuple[str, str], ...], Any] = {}


class TargetInfo:
    __slots__ = ("labels", "seen")

    def __init__(self, body: str) -> None:
        self.labels = "{" + body + "}"
        self.seen = 0.0


class IngestResult:
    """What `MetricsState.ingest` did with the data points it was given."""

    __slots__ = ("accepted", "refused")

    def __init__(self) -> None:
        self.accepted = 0
        #: reason → data points
        self.refused: dict[str, int] = {}

    def refuse(self, reason: str, n: int = 1) -> None:
        if n:
            self.refused[reason] = self.refused.get(reason, 0) + n

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


# ---------------------------------------------------------------- the state


class MetricsState:
    """Families of series built from OTLP metrics, ready to render.

    Args:
        namespace: prefix of every metric name.
        const_labels: labels on every series (lowest priority).
        resource_labels: copy every resource attribute onto every series.
        suffixes: add unit and type suffixes to names.
        max_series: most series kept; 0 means no limit.
    """

    def __init__(
        self,
        *,
        namespace: str = "",
        const_labels: dict[str, str] | None = None,
        resource_labels: bool = False,
        suffixes: bool = True,
        max_series: int = 0,
    ) -> None:
        self.namespace = namespace
        self.const_labels = dict(const_labels or {})
        self.resource_labels = resource_labels
        self.suffixes = suffixes
        self.max_series = max_series
        self.families: dict[str, Family] = {}
        #: target_info series by label set
        self.targets: dict[tuple[tuple[str, str], ...], TargetInfo] = {}
        self.series_count = 0
        self._label_names: dict[str, str] = {}
        self._metric_names: dict[tuple[str, str, str], str] = {}
        #: every name a family's samples or its OpenMetrics family name use → that family
        self._claimed: dict[str, str] = {"target_info": ""}  # target_info is ours

    # -- names, cached: the same few keys come again and again

    def _label(self, key: str) -> str:
        name = self._label_names.get(key)
        if name is None:
            if len(self._label_names) > 100_000:
                self._label_names.clear()  # keys from an unbounded source: keep the cache bounded
            name = self._label_names[key] = label_name(key)
        return name

    def _family_name(self, name: str, unit: str, kind: str) -> str:
        key = (name, unit, kind)
        out = self._metric_names.get(key)
        if out is None:
            if len(self._metric_names) > 100_000:
                self._metric_names.clear()
            out = self._metric_names[key] = metric_name(name, unit, kind, namespace=self.namespace, suffixes=self.suffixes)
        return out

    def _labels(self, attributes: Any) -> dict[str, str]:
        """Attributes as labels; keys that sanitise alike are joined with ';' in the order of the original keys."""
        out: dict[str, str] = {}
        for kv in attributes:
            v = kv.value
            out[self._label(kv.key)] = v.string_value if v.WhichOneof("value") == "string_value" else attribute_text(v)
        if len(out) != len(attributes):
            return self._labels_of([(kv.key, attribute_text(kv.value)) for kv in attributes])
        return out

    def _labels_of(self, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
        groups: dict[str, list[tuple[str, str]]] = {}
        for key, text in pairs:
            groups.setdefault(self._label(key), []).append((key, text))
        return {name: ";".join(text for _, text in sorted(found)) for name, found in groups.items()}

    # -- ingest

    def ingest(self, request: Any, now: float) -> IngestResult:
        """Take every data point of an ExportMetricsServiceRequest; ``now`` marks the series as fresh."""
        result = IngestResult()
        for rm in request.resource_metrics:
            raw = [(kv.key, attribute_text(kv.value)) for kv in rm.resource.attributes]
            job, instance = _job_instance(raw)
            base = dict(self.const_labels)
            if self.resource_labels:
                base.update(self._labels_of(raw))
            if job:
                base["job"] = job
            if instance:
                base["instance"] = instance
            self._note_target(raw, job, instance, now)
            for sm in rm.scope_metrics:
                scope_base = dict(base)
                if sm.scope.name:
                    scope_base["otel_scope_name"] = sm.scope.name
                if sm.scope.version:
                    scope_base["otel_scope_version"] = sm.scope.version
                for metric in sm.metrics:
                    self._ingest_metric(metric, scope_base, now, result)
        return result

    def _note_target(self, raw: list[tuple[str, str]], job: str, instance: str, now: float) -> None:
        others = [(k, v) for k, v in raw if k not in _SERVICE_KEYS]
        if not others:
            return
        labels = self._labels_of(others)
        if job:
            labels["job"] = job
        if instance:
            labels["instance"] = instance
        key = tuple(sorted(labels.items()))
        target = self.targets.get(key)
        if target is None:
            target = self.targets[key] = TargetInfo(label_text(key))
        target.seen = now

    def _ingest_metric(self, metric: Any, base: dict[str, str], now: float, result: IngestResult) -> None:
        data = metric.WhichOneof("data")
        if data == "gauge":
            self._scalars(metric, metric.gauge.data_points, GAUGE, False, base, now, result)
        elif data == "sum":
            s = metric.sum
            temporality = s.aggregation_temporality
            if temporality not in (_DELTA, _CUMULATIVE):
                result.refuse(UNSUPPORTED, len(s.data_points))
                return
            kind = COUNTER if s.is_monotonic else GAUGE
            self._scalars(metric, s.data_points, kind, temporality == _DELTA, base, now, result)
        elif data == "histogram":
            h = metric.histogram
            temporality = h.aggregation_temporality
            if temporality not in (_DELTA, _CUMULATIVE):
                result.refuse(UNSUPPORTED, len(h.data_points))
                return
            self._histograms(metric, h.data_points, temporality == _DELTA, base, now, result)
        elif data == "summary":
            self._summaries(metric, metric.summary.data_points, base, now, result)
        elif data == "exponential_histogram":
            # Native histograms need the protobuf exposition, which tapio does not serve.
            result.refuse(UNSUPPORTED, len(metric.exponential_histogram.data_points))

    def _family(self, metric: Any, kind: str, n: int, result: IngestResult) -> Family | None:
        name = self._family_name(metric.name, metric.unit, kind)
        family = self.families.get(name)
        if family is None:
            claims = _claims(name, kind)
            if any(c in self._claimed for c in claims):
                result.refuse(TYPE_CONFLICT, n)
                return None
            for c in claims:
                self._claimed[c] = name
            family = self.families[name] = Family(name, kind, metric.description)
        elif family.kind != kind:
            result.refuse(TYPE_CONFLICT, n)
            return None
        elif not family.help and metric.description:
            family.help = metric.description
        return family

    def _series_key(self, base: dict[str, str], point: Any) -> tuple[tuple[str, str], ...]:
        if len(point.attributes):
            labels = {**base, **self._labels(point.attributes)}
            return tuple(sorted(labels.items()))
        return tuple(sorted(base.items()))

    def _room(self, result: IngestResult) -> bool:
        if self.max_series and self.series_count >= self.max_series:
            result.refuse(SERIES_LIMIT)
            return False
        return True

    def _drop(self, family: Family, key: tuple) -> None:
        if family.series.pop(key, None) is not None:
            self.series_count -= 1

    def _scalars(self, metric: Any, points: Any, kind: str, delta: bool, base: dict[str, str], now: float, result: IngestResult) -> None:
        family = self._family(metric, kind, len(points), result)
        if family is None:
            return
        series = family.series
        exemplars_wanted = kind == COUNTER
        for p in points:
            key = self._series_key(base, p)
            if p.flags & FLAG_NO_RECORDED_VALUE:
                self._drop(family, key)
                result.accepted += 1
                continue
            value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
            if exemplars_wanted and not value >= 0:  # a counter is never negative or NaN (OpenMetrics refuses both)
                result.refuse(MALFORMED)
                continue
            t = p.time_unix_nano
            s = series.get(key)
            if s is None:
                if not self._room(result):
                    continue
                s = series[key] = Scalar(label_text(key))
                self.series_count += 1
                s.value, s.time_ns, s.start_ns = value, t, p.start_time_unix_nano
            elif delta:
                if p.start_time_unix_nano == s.time_ns and t >= s.time_ns:
                    s.value += value
                    s.time_ns = t
                elif t and t <= s.time_ns:
                    result.refuse(OUT_OF_ORDER)
                    continue
                else:  # a gap: something was missed; start again from this point
                    s.value, s.time_ns, s.start_ns = value, t, p.start_time_unix_nano
            else:
                if t and t < s.time_ns:
                    result.refuse(OUT_OF_ORDER)
                    continue
                s.value, s.time_ns, s.start_ns = value, t, p.start_time_unix_nano
            s.seen = now
            if exemplars_wanted and len(p.exemplars):
                s.exemplar = _exemplar(p.exemplars[-1])
            result.accepted += 1

    def _histograms(self, metric: Any, points: Any, delta: bool, base: dict[str, str], now: float, result: IngestResult) -> None:
        family = self._family(metric, HISTOGRAM, len(points), result)
        if family is None:
            return
        series = family.series
        for p in points:
            key = self._series_key(base, p)
            if p.flags & FLAG_NO_RECORDED_VALUE:
                self._drop(family, key)
                result.accepted += 1
                continue
            bounds = tuple(p.explicit_bounds)
            buckets = list(p.bucket_counts)
            if (p.HasField("sum") and math.isnan(p.sum)) or (buckets and len(buckets) != len(bounds) + 1) or any(b >= c for b, c in zip(bounds, bounds[1:])) or any(
                math.isnan(b) for b in bounds
            ):
                result.refuse(MALFORMED)
                continue
            t = p.time_unix_nano
            s = series.get(key)
            total_sum = p.sum if p.HasField("sum") else None
            if s is None:
                if not self._room(result):
                    continue
                s = series[key] = Histogram(label_text(key))
                self.series_count += 1
                fresh = True
            elif delta and p.start_time_unix_nano == s.time_ns and t >= s.time_ns and bounds == s.bounds:
                fresh = False
            elif t and (t < s.time_ns or (delta and t == s.time_ns)):
                result.refuse(OUT_OF_ORDER)
                continue
            else:
                fresh = True
            if fresh:
                s.bounds, s.buckets, s.sum, s.count = bounds, buckets, total_sum, p.count
                s.start_ns = p.start_time_unix_nano
                if len(p.exemplars):
                    s.exemplars = None
            else:
                if buckets:
                    s.buckets = [a + b for a, b in zip(s.buckets, buckets)] if s.buckets else buckets
                s.count += p.count
                s.sum = None if s.sum is None or total_sum is None else s.sum + total_sum
            s.time_ns = t
            s.seen = now
            if len(p.exemplars):
                s.exemplars = _bucket_exemplars(p.exemplars, bounds, s.exemplars if not fresh else None)
            result.accepted += 1

    def _summaries(self, metric: Any, points: Any, base: dict[str, str], now: float, result: IngestResult) -> None:
        family = self._family(metric, SUMMARY, len(points), result)
        if family is None:
            return
        series = family.series
        for p in points:
            key = self._series_key(base, p)
            if p.flags & FLAG_NO_RECORDED_VALUE:
                self._drop(family, key)
                result.accepted += 1
                continue
            t = p.time_unix_nano
            s = series.get(key)
            if s is None:
                if not self._room(result):
                    continue
                s = series[key] = Summary(label_text(key))
                self.series_count += 1
            elif t and t < s.time_ns:
                result.refuse(OUT_OF_ORDER)
                continue
            s.quantiles = sorted((q.quantile, q.value) for q in p.quantile_values)
            s.sum, s.count, s.time_ns, s.seen = p.sum, p.count, t, now
            result.accepted += 1

    # -- expiry

    def expire(self, before: float) -> int:
        """Remove every series (and target_info) last updated before ``before``; returns how many series went."""
        removed = 0
        for name in list(self.families):
            family = self.families[name]
            stale = [k for k, s in family.series.items() if s.seen < before]
            for k in stale:
                del family.series[k]
            removed += len(stale)
            if not family.series:
                del self.families[name]
                for c in _claims(name, family.kind):
                    self._claimed.pop(c, None)
        self.series_count -= removed
        for k in [k for k, t in self.targets.items() if t.seen < before]:
            del self.targets[k]
        return removed


def _claims(name: str, kind: str) -> tuple[str, ...]:
    """The names a family uses, in either format: no two families may share one."""
    if kind == COUNTER:
        base = name[:-6] if name.endswith("_total") else name
        return (base, base + "_total", base + "_created")
    if kind == HISTOGRAM:
        return (name, name + "_bucket", name + "_sum", name + "_count", name + "_created")
    if kind == SUMMARY:
        return (name, name + "_sum", name + "_count", name + "_created")
    return (name,)


_SERVICE_KEYS = frozenset({"service.name", "service.namespace", "service.instance.id"})


def _job_instance(raw: list[tuple[str, str]]) -> tuple[str, str]:
    resource = dict(raw)
    name = resource.get("service.name", "")
    namespace = resource.get("service.namespace", "")
    job = f"{namespace}/{name}" if namespace and name else name
    return job, resource.get("service.instance.id", "")


def _exemplar(e: Any) -> Exemplar:
    value = e.as_int if e.WhichOneof("value") == "as_int" else e.as_double
    labels: list[tuple[str, str]] = []
    if e.trace_id:
        labels.append(("trace_id", e.trace_id.hex()))
    if e.span_id:
        labels.append(("span_id", e.span_id.hex()))
    used = sum(len(k) + len(v) for k, v in labels)
    extra = [(label_name(kv.key), attribute_text(kv.value)) for kv in e.filtered_attributes]
    if extra and used + sum(len(k) + len(v) for k, v in extra) <= EXEMPLAR_LABEL_CHARS:
        labels.extend(extra)
    elif not labels:
        labels = []
    text = " # {" + label_text(labels) + "} " + format_float(value)
    if e.time_unix_nano:
        text += " " + _seconds(e.time_unix_nano)
    return Exemplar(value, text)


def _bucket_exemplars(exemplars: Any, bounds: tuple[float, ...], held: list[Exemplar | None] | None) -> list[Exemplar | None]:
    """The largest exemplar per bucket (the spec's rule for pull exporters), merged into ``held``."""
    out: list[Exemplar | None] = list(held) if held is not None and len(held) == len(bounds) + 1 else [None] * (len(bounds) + 1)
    for e in exemplars:
        ex = _exemplar(e)
        i = bisect.bisect_left(bounds, ex.value)  # bucket i holds values <= bounds[i]
        cur = out[i]
        if cur is None or ex.value >= cur.value:
            out[i] = ex
    return out


def _seconds(ns: int) -> str:
    """Nanoseconds since the epoch as OpenMetrics seconds, exactly (no float rounding)."""
    sec, frac = divmod(ns, 1_000_000_000)
    if not frac:
        return str(sec)
    return f"{sec}.{frac:09d}".rstrip("0")
