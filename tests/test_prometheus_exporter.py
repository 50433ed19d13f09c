"""The prometheus exporter: OTLP → Prometheus translation, rendering, and the /metrics server.

Translation and rendering are pure, so most tests feed OTLP requests into a
`MetricsState` and read the rendered text back with parsers that are not
ours (prometheus_client's text and OpenMetrics parsers, and promtool, the
Prometheus project's own checker). The component tests run the real HTTP
server on an ephemeral port and scrape it with httpx.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import config_fields, decode_dataclass
from tapio.exporters.prometheus import Config, factory
from tapio.exporters.prometheus._render import go_float, render_openmetrics, render_text
from tapio.exporters.prometheus._state import MetricsState
from tapio.promtext import label_name, metric_name
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing import prereq

T0 = 1_700_000_000_000_000_000  # a data point time, in ns
SEC = 1_000_000_000
DELTA, CUMULATIVE = 1, 2


# ---------------------------------------------------------------- building OTLP


def request(resource: dict | None = None, scope: tuple[str, str] = ("", "")) -> tuple[ExportMetricsServiceRequest, object]:
    """A request with one resource and one scope; returns it and the scope_metrics to add metrics to."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in (resource or {}).items():
        rm.resource.attributes.add(key=k, value=_any(v))
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = scope
    return req, sm


def _any(v) -> dict:
    if isinstance(v, bool):
        return {"bool_value": v}
    if isinstance(v, int):
        return {"int_value": v}
    if isinstance(v, float):
        return {"double_value": v}
    return {"string_value": v}


def _attrs(point, attrs: dict | None) -> None:
    for k, v in (attrs or {}).items():
        point.attributes.add(key=k, value=_any(v))


def add_sum(sm, name, value, *, unit="", monotonic=True, temporality=CUMULATIVE, attrs=None, t=T0, start=1, help="", flags=0):
    m = sm.metrics.add(name=name, unit=unit, description=help)
    m.sum.is_monotonic = monotonic
    m.sum.aggregation_temporality = temporality
    p = m.sum.data_points.add(time_unix_nano=t, start_time_unix_nano=start, flags=flags)
    if isinstance(value, int):
        p.as_int = value
    else:
        p.as_double = value
    _attrs(p, attrs)
    return p


def add_gauge(sm, name, value, *, unit="", attrs=None, t=T0, help=""):
    m = sm.metrics.add(name=name, unit=unit, description=help)
    p = m.gauge.data_points.add(time_unix_nano=t)
    if isinstance(value, int):
        p.as_int = value
    else:
        p.as_double = value
    _attrs(p, attrs)
    return p


def add_histogram(sm, name, bounds, counts, total, *, unit="", temporality=CUMULATIVE, attrs=None, t=T0, start=1, help=""):
    m = sm.metrics.add(name=name, unit=unit, description=help)
    m.histogram.aggregation_temporality = temporality
    p = m.histogram.data_points.add(time_unix_nano=t, start_time_unix_nano=start, count=sum(counts), sum=total)
    p.explicit_bounds.extend(bounds)
    p.bucket_counts.extend(counts)
    _attrs(p, attrs)
    return p


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text → {(sample name, labels): value}, read by prometheus_client's parser."""
    out = {}
    for family in parse_text(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    found = [v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: found {found} in\n{text}"
    return found[0]


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, unit, kind, want",
    [
        ("http.server.duration", "ms", "histogram", "http_server_duration_milliseconds"),
        ("http.server.requests", "{request}", "counter", "http_server_requests_total"),
        ("requests_total", "", "counter", "requests_total"),
        ("network.io", "By", "counter", "network_io_bytes_total"),
        ("disk.throughput", "By/s", "gauge", "disk_throughput_bytes_per_second"),
        ("cpu.utilization", "1", "gauge", "cpu_utilization_ratio"),
        ("cpu.utilization", "1", "counter", "cpu_utilization_total"),
        ("latency_seconds", "s", "gauge", "latency_seconds"),
        ("process.cpu.time", "s", "counter", "process_cpu_time_seconds_total"),
        ("weird--name..x", "", "gauge", "weird_name_x"),
        ("2xx.responses", "", "counter", "_2xx_responses_total"),
        ("temp", "Cel", "gauge", "temp_celsius"),
        ("pkt", "packets", "gauge", "pkt_packets"),
        ("with:colon", "", "gauge", "with:colon"),
    ],
)
def test_metric_names_follow_the_otel_prometheus_rules(name, unit, kind, want):
    assert metric_name(name, unit, kind) == want


def test_metric_names_without_suffixes_and_with_a_namespace():
    assert metric_name("http.server.duration", "ms", "counter", suffixes=False) == "http_server_duration"
    assert metric_name("up", "", "gauge", namespace="tapio") == "tapio_up"


@pytest.mark.parametrize(
    "key, want",
    [
        # the cases of the OTel Collector translator's own test (normalize_label_test.go)
        ("label:with:colons", "label_with_colons"),
        ("LabelWithCapitalLetters", "LabelWithCapitalLetters"),
        ("label!with&special$chars)", "label_with_special_chars_"),
        ("label_with_foreign_characters_字符", "label_with_foreign_characters___"),
        ("label.with.dots", "label_with_dots"),
        ("123label", "key_123label"),
        ("_label_starting_with_underscore", "key_label_starting_with_underscore"),
        # ... except that the Collector keeps a leading __, which OpenMetrics reserves: we prefix key
        ("__label_starting_with_2underscores", "key__label_starting_with_2underscores"),
        # and ours
        ("http.method", "http_method"),
        ("k8s.pod.name", "k8s_pod_name"),
        ("a..b", "a__b"),  # one _ per invalid character: runs are not collapsed
        ("a._b", "a__b"),
        ("x.", "x_"),
        (".x", "key_x"),  # sanitised first, then the leading single _ gets key
        ("..x", "key__x"),
        ("::", "key__"),
        ("ü", "key_"),
        ("١", "key_"),  # a non-ASCII digit is invalid, not a digit to prefix
        ("", "key_"),
    ],
)
def test_label_names_are_sanitised_as_the_collector_does(key, want):
    assert label_name(key) == want


def test_attributes_that_sanitise_alike_are_joined_in_key_order():
    req, sm = request()
    add_gauge(sm, "g", 1, attrs={"a.b": "dot", "a-b": "dash", "c": "x"})
    state = MetricsState()
    state.ingest(req, 0)
    text = render_text(state)
    assert value(text, "g", a_b="dash;dot", c="x") == 1


# ---------------------------------------------------------------- translation


def full_request():
    req, sm = request(
        {"service.name": "api", "service.namespace": "shop", "service.instance.id": "pod-1", "host.name": "node-a", "k8s.pod.uid": 7},
        scope=("io.tapio.test", "1.2.3"),
    )
    add_sum(sm, "http.server.requests", 42, unit="{request}", attrs={"http.method": "GET"}, help="Requests served.")
    add_sum(sm, "queue.depth", -3, monotonic=False, help="Items queued.")
    add_gauge(sm, "memory.usage", 1.5e9, unit="By", help="Memory in use.")
    add_histogram(sm, "http.server.duration", [0.1, 1.0, 10.0], [2, 3, 1, 4], 55.5, unit="s", help="Request time.")
    m = sm.metrics.add(name="rpc.latency", unit="s", description="RPC latency.")
    p = m.summary.data_points.add(time_unix_nano=T0, count=10, sum=4.5)
    p.quantile_values.add(quantile=0.5, value=0.3)
    p.quantile_values.add(quantile=0.99, value=1.25)
    return req


def test_every_kind_translates_as_the_spec_says():
    state = MetricsState()
    result = state.ingest(full_request(), 0)
    assert result.accepted == 5 and not result.refused
    text = render_text(state)
    common = {"job": "shop/api", "instance": "pod-1", "otel_scope_name": "io.tapio.test", "otel_scope_version": "1.2.3"}
    assert value(text, "http_server_requests_total", http_method="GET", **common) == 42
    assert "# TYPE http_server_requests_total counter" in text
    assert value(text, "queue_depth", **common) == -3
    assert "# TYPE queue_depth gauge" in text
    assert value(text, "memory_usage_bytes", **common) == 1.5e9
    for le, cum in (("0.1", 2), ("1", 5), ("10", 6), ("+Inf", 10)):
        assert value(text, "http_server_duration_seconds_bucket", le=le, **common) == cum
    assert value(text, "http_server_duration_seconds_sum", **common) == 55.5
    assert value(text, "http_server_duration_seconds_count", **common) == 10
    assert value(text, "rpc_latency_seconds", quantile="0.99", **common) == 1.25
    assert value(text, "rpc_latency_seconds_count", **common) == 10
    # resource attributes other than the service triple go to target_info, not to every series
    assert value(text, "target_info", job="shop/api", instance="pod-1", host_name="node-a", k8s_pod_uid="7") == 1
    assert "host_name" not in text.split("target_info")[0]


def test_resource_to_telemetry_conversion_and_const_labels():
    state = MetricsState(resource_labels=True, const_labels={"cluster": "prod", "host_name": "overridden"})
    req, sm = request({"service.name": "api", "host.name": "node-a"})
    add_gauge(sm, "g", 2, attrs={"cluster": "from-point"})
    state.ingest(req, 0)
    text = render_text(state)
    assert value(text, "g", job="api", host_name="node-a", service_name="api", cluster="from-point") == 2


def test_delta_sums_accumulate_when_contiguous_restart_after_a_gap_and_refuse_the_past():
    state = MetricsState()

    def send(v, start, end):
        req, sm = request()
        add_sum(sm, "d", v, temporality=DELTA, t=end, start=start)
        return state.ingest(req, 0)

    send(5, T0, T0 + SEC)
    send(3, T0 + SEC, T0 + 2 * SEC)
    assert value(render_text(state), "d_total") == 8
    assert send(4, T0, T0 + SEC).refused == {"out_of_order": 1}
    assert value(render_text(state), "d_total") == 8
    send(2, T0 + 5 * SEC, T0 + 6 * SEC)  # a gap: points were lost; start again (a counter reset)
    assert value(render_text(state), "d_total") == 2


def test_delta_histograms_accumulate_bucket_by_bucket():
    state = MetricsState()
    for i in range(3):
        req, sm = request()
        add_histogram(sm, "h", [1.0, 2.0], [1, 1, 1], 4.0, temporality=DELTA, t=T0 + (i + 1) * SEC, start=T0 + i * SEC)
        state.ingest(req, 0)
    text = render_text(state)
    assert value(text, "h_bucket", le="1") == 3
    assert value(text, "h_bucket", le="2") == 6
    assert value(text, "h_bucket", le="+Inf") == 9
    assert value(text, "h_sum") == 12.0


@pytest.mark.parametrize("count, want", [(3, 10), (6, 10), (10, 10), (25, 25)], ids=["below-finite", "below-total", "equal", "above"])
def test_the_inf_bucket_and_count_are_never_below_a_bucket_even_when_the_counts_disagree(count, want):
    req, sm = request()
    p = add_histogram(sm, "h", [1.0, 2.0, 5.0], [2, 3, 1, 4], 9.5, help="H.")  # buckets: 2, 5, 6 and +Inf 10
    p.count = count  # bad input unless 10
    state = MetricsState()
    assert state.ingest(req, 0).accepted == 1
    text = render_text(state)
    assert [value(text, "h_bucket", le=le) for le in ("1", "2", "5", "+Inf")] == [2, 5, 6, want]
    assert value(text, "h_count") == want
    promtool_check(promtool_binary(), text)
    (family,) = parse_openmetrics(render_openmetrics(state))  # strict: +Inf must equal _count, buckets must not decrease
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("h_bucket", "5.0")] == 6 and got[("h_bucket", "+Inf")] == got[("h_count", None)] == want


def test_cumulative_points_from_the_past_are_refused():
    state = MetricsState()
    req, sm = request()
    add_sum(sm, "c", 10, t=T0 + SEC)
    add_sum(sm, "c", 7, t=T0)
    result = state.ingest(req, 0)
    assert result.accepted == 1 and result.refused == {"out_of_order": 1}
    assert value(render_text(state), "c_total") == 10


def test_a_name_taken_by_another_type_is_refused():
    state = MetricsState()
    req, sm = request()
    add_gauge(sm, "x_total", 1)
    add_sum(sm, "x", 2)  # would also be x_total, as a counter
    result = state.ingest(req, 0)
    assert result.refused == {"type_conflict": 1}
    assert "# TYPE x_total gauge" in render_text(state)


def test_the_series_limit_refuses_new_series_but_updates_old_ones():
    state = MetricsState(max_series=2)
    req, sm = request()
    for i in range(4):
        add_gauge(sm, "g", i, attrs={"i": i})
    assert state.ingest(req, 0).refused == {"series_limit": 2}
    req, sm = request()
    add_gauge(sm, "g", 100, attrs={"i": 0}, t=T0 + SEC)
    assert state.ingest(req, 0).accepted == 1
    assert state.series_count == 2
    assert value(render_text(state), "g", i="0") == 100


def test_no_recorded_value_removes_the_series():
    state = MetricsState()
    req, sm = request()
    add_sum(sm, "c", 1)
    state.ingest(req, 0)
    req, sm = request()
    add_sum(sm, "c", 0, flags=1, t=T0 + SEC)
    state.ingest(req, 0)
    assert state.series_count == 0 and "c_total" not in render_text(state)


def test_exponential_histograms_and_unspecified_temporality_are_counted_as_unsupported():
    state = MetricsState()
    req, sm = request()
    m = sm.metrics.add(name="e")
    m.exponential_histogram.aggregation_temporality = CUMULATIVE
    m.exponential_histogram.data_points.add(count=1)
    add_sum(sm, "u", 1, temporality=0)
    assert state.ingest(req, 0).refused == {"unsupported": 2}


def test_expire_removes_series_not_updated_since():
    state = MetricsState()
    req, sm = request({"service.name": "a", "host.name": "h"})
    add_gauge(sm, "old", 1)
    state.ingest(req, 10.0)
    req, sm = request({"service.name": "b", "host.name": "h"})
    add_gauge(sm, "new", 1)
    state.ingest(req, 20.0)
    assert state.expire(15.0) == 1
    text = render_text(state)
    assert "old" not in text and "new" in text
    assert 'job="a"' not in text and value(text, "target_info", job="b") == 1


# ---------------------------------------------------------------- rendering


def promtool_binary() -> str:
    return prereq.command("promtool", "install Debian's prometheus package (scripts/setup.sh does)")


def promtool_check(promtool: str, text: str) -> None:
    proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert proc.returncode == 0 and not proc.stderr, proc.stdout.decode() + proc.stderr.decode() + text


def test_text_exposition_passes_promtool():
    promtool = promtool_binary()
    state = MetricsState()
    state.ingest(full_request(), 0)
    for timestamps in (False, True):
        promtool_check(promtool, render_text(state, timestamps=timestamps))


def request_with_exemplars():
    """`full_request` with an exemplar on the counter and two on the histogram."""
    req = full_request()
    sm = req.resource_metrics[0].scope_metrics[0]
    counter = sm.metrics[0].sum.data_points[0]
    counter.exemplars.add(as_double=0.25, trace_id=bytes(range(16)), span_id=bytes(range(8)), time_unix_nano=T0 + 5)
    hist = sm.metrics[3].histogram.data_points[0]
    hist.exemplars.add(as_double=0.7, trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    hist.exemplars.add(as_double=0.9, trace_id=b"\x03" * 16, span_id=b"\x04" * 8)  # larger: wins the 1.0 bucket
    return req


_OM_EXEMPLAR = re.compile(r" # \{[^}]*\} \S+( \S+)?$")


def openmetrics_as_promtool_reads_it(text: str) -> tuple[str, int]:
    """The OpenMetrics ``text`` with only its OpenMetrics-only syntax rewritten; also returns how many exemplars went.

    promtool (2.42, and still 3.x) lints with the 0.0.4 text parser, which
    cannot read three things OpenMetrics requires or allows: exemplars
    (dropped here), timestamps in seconds (written here in milliseconds) and
    a counter family named without its ``_total`` (renamed here; the strict
    OpenMetrics parser refuses ``_total`` in a counter's family name). All
    else reaches promtool as rendered.
    """
    counters = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ") and line.endswith(" counter")}
    out, exemplars = [], 0
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, head, name, rest = line.split(" ", 3)
            if name in counters:
                line = f"# {head} {name}_total {rest}"
        elif line and not line.startswith("#"):
            line, n = _OM_EXEMPLAR.subn("", line)
            exemplars += n
            if "{" in line:
                series, _, rest = line.rpartition("}")
                series += "}"
            else:
                series, _, rest = line.partition(" ")
            fields = rest.split()
            if len(fields) == 2:  # a value and a timestamp
                sec, _, frac = fields[1].partition(".")
                line = f"{series} {fields[0]} {int(sec) * 1000 + int(frac.ljust(9, '0')) // 1_000_000}"
        out.append(line + "\n")
    return "".join(out), exemplars


def test_openmetrics_exposition_passes_promtool_and_the_strict_parser():
    promtool = promtool_binary()
    state = MetricsState()
    state.ingest(request_with_exemplars(), 0)
    for timestamps in (False, True):
        text = render_openmetrics(state, timestamps=timestamps)
        families = {f.name: f for f in parse_openmetrics(text)}  # strict: raises on anything invalid
        assert families["target_info"].type == "gauge"
        assert [s.value for s in families["target_info"].samples] == [1]
        readable, exemplars = openmetrics_as_promtool_reads_it(text)
        assert exemplars == 4  # the counter's, and three histogram buckets (0.7 carried up to 10 and +Inf)
        promtool_check(promtool, readable)


def test_openmetrics_exposition_parses_with_exemplars_and_timestamps():
    state = MetricsState()
    state.ingest(request_with_exemplars(), 0)
    text = render_openmetrics(state, timestamps=True)
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["http_server_requests"].type == "counter"
    (total,) = families["http_server_requests"].samples
    assert total.name == "http_server_requests_total" and total.value == 42
    assert total.exemplar.labels == {"trace_id": bytes(range(16)).hex(), "span_id": bytes(range(8)).hex()}
    assert total.exemplar.value == 0.25 and total.timestamp is not None
    buckets = {s.labels["le"]: s for s in families["http_server_duration_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets["0.1"].exemplar is None
    assert buckets["1.0"].exemplar.labels["trace_id"] == ("03" * 16) and buckets["1.0"].exemplar.value == 0.9
    assert buckets["10.0"].exemplar.value == 0.9  # carried up from the lower bucket, as the spec asks
    assert families["target_info"].type == "gauge"


def test_escaping_in_help_and_label_values():
    req, sm = request()
    add_gauge(sm, "g", 1, attrs={"path": 'C:\\dir\n"quoted"'}, help='Line one\nback\\slash "q"')
    state = MetricsState()
    state.ingest(req, 0)
    (fam,) = list(parse_text(render_text(state)))
    assert fam.documentation == 'Line one\nback\\slash "q"'
    assert fam.samples[0].labels["path"] == 'C:\\dir\n"quoted"'
    (fam,) = [f for f in parse_openmetrics(render_openmetrics(state))]
    assert fam.samples[0].labels["path"] == 'C:\\dir\n"quoted"'


def test_special_values_render_as_prometheus_spells_them():
    req, sm = request()
    for i, v in enumerate((math.nan, math.inf, -math.inf, 1e300, -0.0, 2**62)):
        add_gauge(sm, "g", v, attrs={"i": i})
    state = MetricsState()
    state.ingest(req, 0)
    text = render_text(state)
    got = {ls: v for (n, ls), v in samples(text).items()}
    assert math.isnan(got[frozenset({("i", "0")})])
    assert got[frozenset({("i", "1")})] == math.inf and got[frozenset({("i", "2")})] == -math.inf
    assert got[frozenset({("i", "5")})] == 2**62
    assert 'g{i="1"} +Inf' in text and 'g{i="0"} NaN' in text
    list(parse_openmetrics(render_openmetrics(state)))


@pytest.mark.parametrize("v, want", [(1.0, "1"), (0.005, "0.005"), (1e6, "1e+06"), (123456.0, "123456"), (1e-5, "1e-05"), (2.5e-3, "0.0025")])
def test_le_values_are_written_like_the_go_client(v, want):
    assert go_float(v) == want


# -- fuzz: whatever names, units, attribute keys and values come in, both formats parse

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    metrics=st.lists(
        st.tuples(
            _text,
            st.sampled_from(["", "1", "ms", "By/s", "{x}", "s", "weird unit"]),
            st.sampled_from(["gauge", "sum", "updown", "histogram"]),
            st.dictionaries(_text, _text, max_size=3),
            st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63) + 1, 2**63 - 1),
        ),
        max_size=6,
    ),
    resource=st.dictionaries(_text, _text, max_size=3),
)
def test_any_input_renders_to_valid_text_and_openmetrics(metrics, resource):
    req, sm = request(resource)
    for name, unit, kind, attrs, v in metrics:
        if kind == "gauge":
            add_gauge(sm, name, v, unit=unit, attrs=attrs, help=name)
        elif kind in ("sum", "updown"):
            add_sum(sm, name, abs(v) if kind == "sum" and v == v else v, unit=unit, monotonic=kind == "sum", attrs=attrs, help=name)
        else:
            add_histogram(sm, name, [1.0, 5.0], [1, 2, 3], abs(float(v)) if v == v else 0.0, unit=unit, attrs=attrs)
    state = MetricsState()
    result = state.ingest(req, 0)
    assert result.accepted + sum(result.refused.values()) == len(metrics)
    text = render_text(state)
    names = {n for n, _ in samples(text)}
    assert all(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", n) for n in names)
    list(parse_openmetrics(render_openmetrics(state)))


# ---------------------------------------------------------------- the component


def component_settings(telemetry: Telemetry) -> Settings:
    return Settings(
        id=ComponentID("prometheus"),
        kind=Kind.EXPORTER,
        telemetry=telemetry.for_component("exporter", "prometheus"),
        logger=logging.getLogger("test.prometheus"),
        shutdown_grace=1.0,
    )


def make_exporter(telemetry: Telemetry, **config):
    cfg = decode_dataclass(Config, {"endpoint": "127.0.0.1:0", **config})
    assert cfg.validate() == []
    send, recv = trio.open_memory_channel(4)
    return factory.create(component_settings(telemetry), cfg, Ports(input=recv)), send


async def test_serves_text_and_openmetrics_with_gzip_and_counts(nursery):
    telemetry = Telemetry()
    exporter, send = make_exporter(telemetry, enable_open_metrics=True)
    await nursery.start(exporter.run)
    delivered = []
    batch = Batch.of(Signal.METRICS, full_request())
    batch.on_done.append(delivered.append)
    await send.send(batch)
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            while not delivered:
                await trio.sleep(0.01)
        r = await client.get(url, headers={"accept-encoding": "identity"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert value(r.text, "http_server_requests_total", http_method="GET") == 42
        r = await client.get(url, headers={"accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5", "accept-encoding": "gzip"})
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")
        assert (await client.get(url.replace("/metrics", "/other"))).status_code == 404
        assert (await client.post(url)).status_code == 405
    assert delivered == [True]
    assert telemetry.value("tapio_exporter_sent_metric_points_total", exporter="prometheus") == 5
    assert telemetry.value("tapio_exporter_prometheus_series", exporter="prometheus") == 5
    assert telemetry.value("tapio_exporter_prometheus_scrapes_total", format="openmetrics") == 1


async def test_large_bodies_are_gzipped_for_scrapers_that_ask(nursery):
    exporter, send = make_exporter(Telemetry())
    await nursery.start(exporter.run)
    req, sm = request()
    for i in range(300):
        add_gauge(sm, "g", i, attrs={"i": i})
    delivered = trio.Event()
    batch = Batch.of(Signal.METRICS, req)
    batch.on_done.append(lambda ok: delivered.set())
    await send.send(batch)
    await delivered.wait()
    async with await trio.open_tcp_stream("127.0.0.1", exporter.port) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\nconnection: close\r\n\r\n")
        raw = b""
        while chunk := await stream.receive_some():
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    assert value(gzip.decompress(body).decode(), "g", i="299") == 299


async def test_series_limit_and_wrong_signal_are_counted(nursery):
    telemetry = Telemetry()
    exporter, send = make_exporter(telemetry, max_series=1)
    await nursery.start(exporter.run)
    req, sm = request()
    add_gauge(sm, "a", 1)
    add_gauge(sm, "b", 1)
    outcomes = []
    batch = Batch.of(Signal.METRICS, req)
    batch.on_done.append(outcomes.append)
    logs = Signal.LOGS.request_class()
    logs.resource_logs.add().scope_logs.add().log_records.add()
    log_batch = Batch.of(Signal.LOGS, logs)
    log_batch.on_done.append(outcomes.append)
    await send.send(batch)
    await send.send(log_batch)
    with trio.fail_after(10):
        while len(outcomes) < 2:
            await trio.sleep(0.01)
    assert outcomes == [False, False]
    assert telemetry.value("tapio_exporter_prometheus_series_refused_total") == 1
    assert telemetry.value("tapio_exporter_send_failed_metric_points_total", reason="series_limit") == 1
    assert telemetry.value("tapio_exporter_send_failed_log_records_total", reason="unsupported_signal") == 1
    assert telemetry.value("tapio_exporter_sent_metric_points_total") == 1


async def test_expiry_runs_on_a_timer_without_any_scrape(autojump_clock):
    exporter, send = make_exporter(Telemetry(), metric_expiration="1m")
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        req, sm = request()
        add_gauge(sm, "g", 1)
        await send.send(Batch.of(Signal.METRICS, req))
        await trio.sleep(30)
        assert exporter.state.series_count == 1
        await trio.sleep(61)  # nobody scrapes; the sweep alone must drop it
        assert exporter.state.series_count == 0
        await send.aclose()  # end of input: the exporter returns on its own


async def test_a_taken_port_is_reported_plainly():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    try:
        exporter, _ = make_exporter(Telemetry(), endpoint=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"prometheus: cannot listen on 127.0.0.1:{port}: address already in use"):
            await exporter.run()
    finally:
        await listener.aclose()


def test_config_defaults_are_the_collectors():
    cfg = Config()
    assert cfg.validate() == []
    assert (cfg.endpoint, cfg.namespace, cfg.const_labels, cfg.send_timestamps, float(cfg.metric_expiration)) == ("127.0.0.1:9464", "", {}, False, 300.0)
    assert (cfg.resource_to_telemetry_conversion.enabled, cfg.enable_open_metrics, cfg.add_metric_suffixes) == (False, False, True)
    assert cfg.max_series == 200_000  # tapio's own: the Collector has no cardinality limit


def _shown(default) -> str:
    """A default as the doc page's table writes it."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, dict):
        return "{}"
    return '""' if default == "" else str(default)


def test_doc_page_lists_exactly_the_config_keys_with_their_defaults():
    page = Path(__file__).resolve().parent.parent / "docs" / "components" / "prometheus.md"
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", page.read_text(), flags=re.M)
    assert len(rows) == len(dict(rows))
    assert dict(rows) == {key: _shown(default) for key, _, default, _ in config_fields(Config)}
    assert dict(rows)["endpoint"] == "127.0.0.1:9464" and dict(rows)["metric_expiration"] == "5m"


def test_config_validation_reports_every_problem():
    cfg = Config(endpoint="nowhere", namespace="1bad", const_labels={"ok": "1", "bad-name": "x"}, max_series=-1)
    problems = cfg.validate()
    assert [p.split(":")[0] for p in problems] == ["endpoint", "namespace", "const_labels", "max_series"]


async def test_a_batch_of_several_requests_cancelled_midway_is_still_taken_whole_and_finished():
    telemetry = Telemetry()
    exporter, send = make_exporter(telemetry, metric_expiration="0s")
    outcomes = []
    requests = []
    for name in ("a", "b", "c"):
        req, sm = request()
        add_gauge(sm, name, 1)
        requests.append(req)
    batch = Batch.of(Signal.METRICS, *requests)
    batch.on_done.append(outcomes.append)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            await trio.testing.wait_all_tasks_blocked()
            send.send_nowait(batch)  # the exporter wakes holding the batch ...
            nursery.cancel_scope.cancel()  # ... and is cancelled before it took the second request
    assert outcomes == [True]
    assert exporter.state.series_count == 3
    assert telemetry.value("tapio_exporter_sent_metric_points_total", exporter="prometheus") == 3
