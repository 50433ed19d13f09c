"""Render benchmark of the prometheus exporter against prometheus_client, same series, same run.

Run: ``.venv/bin/python bench/bench_prometheus_render.py``. For 10k and 100k
series (counters and gauges with five labels each, plus histograms of ten
buckets making up a tenth of the series) it takes the series into a
`MetricsState`, renders it with `render_text`, then exposes the very same
families through a prometheus_client custom Collector and times
``generate_latest`` on it. Prints one JSON line per size with the median of
several rounds and the speed-up; the goal is >= 10x at 100k series.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tapio.exporters.prometheus._render import go_float, render_text
from tapio.exporters.prometheus._state import MetricsState
from tapio.promtext import COUNTER, GAUGE, HISTOGRAM

BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
#: series per metric name: like a real node, many names with moderate cardinality
SERIES_PER_METRIC = 500
ROUNDS = 5


def make_request(n_series: int) -> ExportMetricsServiceRequest:
    """``n_series`` series: 45% counters, 45% gauges, 10% histograms (each histogram counts as one series)."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in (("service.name", "node-agent"), ("service.instance.id", "node-7"), ("host.name", "node-7")):
        rm.resource.attributes.add(key=k, value={"string_value": v})
    sm = rm.scope_metrics.add()
    sm.scope.name = "bench"
    made = 0
    metric_no = 0
    while made < n_series:
        kind = (COUNTER, GAUGE, COUNTER, GAUGE, COUNTER, GAUGE, COUNTER, GAUGE, COUNTER, HISTOGRAM)[metric_no % 10]
        m = sm.metrics.add(name=f"bench.metric.{metric_no}", description=f"Benchmark metric {metric_no}.")
        take = min(SERIES_PER_METRIC, n_series - made)
        if kind == HISTOGRAM:
            m.unit = "s"
            m.histogram.aggregation_temporality = 2
            for i in range(take):
                p = m.histogram.data_points.add(time_unix_nano=1_700_000_000_000_000_000, count=45, sum=12.5 + i)
                p.explicit_bounds.extend(BOUNDS)
                p.bucket_counts.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
                _labels(p, i)
        else:
            data = m.sum if kind == COUNTER else m.gauge
            if kind == COUNTER:
                m.sum.aggregation_temporality = 2
                m.sum.is_monotonic = True
            for i in range(take):
                p = data.data_points.add(time_unix_nano=1_700_000_000_000_000_000)
                if i % 2:
                    p.as_int = i * 7
                else:
                    p.as_double = i * 0.37
                _labels(p, i)
        made += take
        metric_no += 1
    return req


def _labels(p, i: int) -> None:
    p.attributes.add(key="k8s.namespace.name", value={"string_value": f"ns-{i % 20}"})
    p.attributes.add(key="k8s.pod.name", value={"string_value": f"pod-{i}"})
    p.attributes.add(key="container", value={"string_value": "app"})
    p.attributes.add(key="direction", value={"string_value": "in" if i % 2 else "out"})
    p.attributes.add(key="code", value={"int_value": 200 + i % 5})


class SameSeries:
    """A prometheus_client Collector yielding the state's families (built once, as an exporter would hold them)."""

    def __init__(self, state: MetricsState) -> None:
        self.families = []
        for name in sorted(state.families):
            fam = state.families[name]
            first = next(iter(fam.series))
            label_names = [k for k, _ in first]
            if fam.kind == COUNTER:
                mf = CounterMetricFamily(name, fam.help, labels=label_names)
                for key, s in fam.series.items():
                    mf.add_metric([v for _, v in key], s.value)
            elif fam.kind == GAUGE:
                mf = GaugeMetricFamily(name, fam.help, labels=label_names)
                for key, s in fam.series.items():
                    mf.add_metric([v for _, v in key], s.value)
            else:
                mf = HistogramMetricFamily(name, fam.help, labels=label_names)
                for key, s in fam.series.items():
                    cum, buckets = 0, []
                    for b, c in zip(s.bounds, s.buckets):
                        cum += c
                        buckets.append((go_float(b), cum))
                    buckets.append(("+Inf", s.count))
                    mf.add_metric([v for _, v in key], buckets, s.sum)
            self.families.append(mf)

    def collect(self):
        return iter(self.families)


def median_seconds(fn) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        size = len(out)
    return statistics.median(times), size


def run(n_series: int) -> dict:
    req = make_request(n_series)
    state = MetricsState()
    t0 = time.perf_counter()
    result = state.ingest(req, 0.0)
    ingest = time.perf_counter() - t0
    assert not result.refused and state.series_count == n_series, (result.refused, state.series_count)
    ours, ours_bytes = median_seconds(lambda: render_text(state).encode())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SameSeries(state))
    theirs, theirs_bytes = median_seconds(lambda: generate_latest(registry))
    return {
        "bench": "prometheus_render",
        "series": n_series,
        "points": result.accepted,
        "python": sys.version.split()[0],
        "tapio_render_ms": round(ours * 1e3, 2),
        "prometheus_client_generate_latest_ms": round(theirs * 1e3, 2),
        "speedup": round(theirs / ours, 1),
        "tapio_bytes": ours_bytes,
        "prometheus_client_bytes": theirs_bytes,
        "tapio_ingest_ms": round(ingest * 1e3, 1),
    }


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
    for n in sizes:
        print(json.dumps(run(n)), flush=True)
