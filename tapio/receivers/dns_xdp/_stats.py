"""The DNS metrics the receiver keeps between emissions, and their OTLP form. Pure: the caller passes the times.

Invariants:
- Everything is cumulative since the receiver started (OTLP cumulative
  temporality), so a lost or late export loses no count.
- Series are bounded: server addresses beyond ``max_servers`` are summed
  under "other"; query types and rcodes are bounded by their 16-bit fields
  and in practice by the handful that occur.
- Histogram buckets are upper bounds in seconds (OTLP explicit buckets:
  bucket i counts values in (bounds[i-1], bounds[i]], the last one the
  values above every bound).
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import repeat
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

#: latency bucket bounds in seconds: a local cache answers in ~0.1 ms, a remote resolver in 1-100 ms, a retry in seconds
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BOUNDS)
CUMULATIVE = 2
OTHER = "other"


class _Histogram:
    __slots__ = ("counts", "count", "sum_ns", "min_ns", "max_ns", "pending")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_NS) + 1)
        self.count = 0
        self.sum_ns = 0
        self.min_ns = 1 << 63
        self.max_ns = 0
        #: latencies a caller collects before `add_many` (the receiver: one drain's)
        self.pending: list[int] = []

    def merge(self, other: "_Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.count += other.count
        self.sum_ns += other.sum_ns
        self.min_ns = min(self.min_ns, other.min_ns)
        self.max_ns = max(self.max_ns, other.max_ns)

    def add(self, ns: int) -> None:
        self.add_many([ns])

    def add_many(self, values: list[int]) -> None:
        """Count latencies (ns, at least one): what a drain's queries of one kind add, in one call."""
        counts = self.counts
        for i in map(bisect_left, repeat(_BOUNDS_NS), values):
            counts[i] += 1
        self.count += len(values)
        self.sum_ns += sum(values)
        low, high = min(values), max(values)
        if low < self.min_ns:
            self.min_ns = low
        if high > self.max_ns:
            self.max_ns = high


class DnsStats:
    """Counts and latencies since start. Answered queries are kept per (server, rcode, qtype) so that
    the hot path is one `histogram` lookup (cached by the caller) and one `_Histogram.add`; the series
    emitted (latency by server and rcode, queries by type, responses by rcode) are sums over them."""

    def __init__(self, max_servers: int, start_unix_ns: int) -> None:
        self._max_servers = max_servers
        self._servers: set[str] = set()
        self.start_unix_ns = start_unix_ns
        #: (server, rcode, qtype) -> latency histogram of answered queries
        self._answered: dict[tuple[str, str, str], _Histogram] = {}
        #: qtype -> unanswered queries
        self._unanswered_by_type: dict[str, int] = {}
        #: rcode -> responses whose query was not seen
        self._response_only: dict[str, int] = {}
        #: server -> queries reported unanswered
        self.unanswered: dict[str, int] = {}
        #: malformed packets by reason, as the kernel counted them (set by the receiver)
        self.malformed: dict[str, int] = {}

    def server_label(self, server: str) -> str:
        if server in self._servers:
            return server
        if len(self._servers) < self._max_servers:
            self._servers.add(server)
            return server
        return OTHER

    def histogram(self, server: str, qtype: str, rcode: str) -> _Histogram:
        """The histogram an answered query of this kind adds its latency (ns) to; the same object every time."""
        key = (self.server_label(server), rcode, qtype)
        h = self._answered.get(key)
        if h is None:
            h = self._answered[key] = _Histogram()
        return h

    def answered(self, server: str, qtype: str, rcode: str, latency_ns: int) -> None:
        self.histogram(server, qtype, rcode).add(latency_ns)

    def response_only(self, rcode: str, n: int = 1) -> None:
        self._response_only[rcode] = self._response_only.get(rcode, 0) + n

    def unanswered_query(self, server: str, qtype: str) -> None:
        label = self.server_label(server)
        self.unanswered[label] = self.unanswered.get(label, 0) + 1
        self._unanswered_by_type[qtype] = self._unanswered_by_type.get(qtype, 0) + 1

    @property
    def latency(self) -> dict[tuple[str, str], _Histogram]:
        """Latency histograms by (server, rcode), summed over question types."""
        out: dict[tuple[str, str], _Histogram] = {}
        for (server, rcode, _), h in self._answered.items():
            total = out.get((server, rcode))
            if total is None:
                total = out[(server, rcode)] = _Histogram()
            total.merge(h)
        return out

    @property
    def queries(self) -> dict[str, int]:
        """Queries whose outcome is known (answered or unanswered), by question type."""
        out = dict(self._unanswered_by_type)
        for (_, _, qtype), h in self._answered.items():
            out[qtype] = out.get(qtype, 0) + h.count
        return out

    @property
    def responses(self) -> dict[str, int]:
        """Responses (with or without their query), by rcode."""
        out = dict(self._response_only)
        for (_, rcode, _), h in self._answered.items():
            out[rcode] = out.get(rcode, 0) + h.count
        return out

    def request(self, resource_attrs: list[tuple[str, Any]], scope: tuple[str, str], now_unix_ns: int) -> ExportMetricsServiceRequest:
        """Every series as one export request (cumulative since start)."""
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        for k, v in resource_attrs:
            _put(rm.resource.attributes, k, v)
        sm = rm.scope_metrics.add()
        sm.scope.name, sm.scope.version = scope
        start = self.start_unix_ns
        m = sm.metrics.add(name="tapio.dns_xdp.latency", unit="s", description="Time from a query to its response as the kernel saw them, by server and response code.")
        m.histogram.aggregation_temporality = CUMULATIVE
        for (server, rcode), h in sorted(self.latency.items()):  # one pass over a few hundred series at most
            p = m.histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=now_unix_ns, count=h.count, sum=h.sum_ns / 1e9)
            p.bucket_counts.extend(h.counts)
            p.explicit_bounds.extend(LATENCY_BOUNDS)
            p.min, p.max = h.min_ns / 1e9, h.max_ns / 1e9
            _put(p.attributes, "server.address", server)
            _put(p.attributes, "dns.response_code", rcode)
        sums = [
            ("tapio.dns_xdp.queries", "Queries whose outcome is known (answered or unanswered), by question type.", "{query}", "dns.question.type", self.queries),
            ("tapio.dns_xdp.responses", "Responses, by response code (NXDOMAIN, SERVFAIL ...).", "{response}", "dns.response_code", self.responses),
            ("tapio.dns_xdp.unanswered", "Queries without a response within query_timeout, where the response path is observed, by server.", "{query}", "server.address", self.unanswered),
        ]
        sums.append(("tapio.dns_xdp.packets.malformed", "DNS packets the kernel could not parse (passed on untouched), by reason.", "{packet}", "reason", self.malformed))
        for name, description, unit, label, values in sums:
            m = sm.metrics.add(name=name, description=description, unit=unit)
            m.sum.aggregation_temporality = CUMULATIVE
            m.sum.is_monotonic = True
            for key, value in sorted(values.items()):
                p = m.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=now_unix_ns, as_int=value)
                _put(p.attributes, label, key)
        return req


def _put(attrs: Any, key: str, value: Any) -> None:
    kv = attrs.add(key=key)
    if isinstance(value, int) and not isinstance(value, bool):
        kv.value.int_value = value
    else:
        kv.value.string_value = str(value)
