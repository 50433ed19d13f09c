"""Incidents as OTLP: a trace per incident, a log record per incident, a counter of incidents.

Invariants:
- One trace per incident: a root span (the rule; kind INTERNAL; status
  ERROR for `error` and `critical` incidents) and one child span per member
  event, at the event's time, carrying the event's own attributes. Events
  that join later arrive as more child spans of the same trace.
- The resource of an incident names what it is about: the Kubernetes,
  container and host attributes its member events agree on (the first
  event holding one wins), with ``service.name: tapio``.
- Building these is rare (incidents, not records): plain protobuf.
"""

from __future__ import annotations

from typing import Iterable

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tapio import __version__

from ._engine import Incident, Joined
from ._match import Value

SCOPE_NAME = "tapio.correlate"
INCIDENT_EVENT = "tapio.incident"
INCIDENTS_METRIC = "tapio.incidents"

#: resource attributes taken from the member events, in this order
RESOURCE_KEYS = (
    "k8s.cluster.name",
    "k8s.node.name",
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.container.name",
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.job.name",
    "k8s.cronjob.name",
    "container.id",
    "host.name",
)

_SEVERITY_NUMBER = {
    "info": SeverityNumber.SEVERITY_NUMBER_INFO,
    "warning": SeverityNumber.SEVERITY_NUMBER_WARN,
    "error": SeverityNumber.SEVERITY_NUMBER_ERROR,
    "critical": SeverityNumber.SEVERITY_NUMBER_FATAL,
}


def _value(v: Value | list[str]) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, list):
        out = AnyValue()
        out.array_value.values.extend(AnyValue(string_value=str(x)) for x in v)
        return out
    return AnyValue(string_value=str(v))


def _kvs(pairs: Iterable[tuple[str, Value | list[str]]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in pairs]


def resource_attributes(members: Iterable[Joined]) -> list[tuple[str, Value]]:
    found: dict[str, Value] = {}
    for j in members:
        for key in RESOURCE_KEYS:
            if key not in found:
                v = j.event.attrs.get(key)
                if v not in (None, ""):
                    found[key] = v
    return [("service.name", "tapio"), *((k, found[k]) for k in RESOURCE_KEYS if k in found)]


def incident_attributes(incident: Incident) -> list[tuple[str, Value | list[str]]]:
    rule = incident.rule
    present = sorted({j.member.name for j in incident.members})
    return [
        ("tapio.incident.rule", rule.name),
        ("tapio.incident.severity", rule.severity),
        ("tapio.incident.summary", incident.summary),
        ("tapio.incident.description", rule.description),
        ("tapio.incident.confidence", incident.confidence),
        ("tapio.incident.key", ",".join(f"{n}={v}" for n, v in zip(rule.join or incident.members[0].member.join, incident.key))),
        ("tapio.incident.members", present),
        ("tapio.incident.resolved", incident.resolved),
    ]


def _child(incident: Incident, j: Joined) -> Span:
    e = j.event
    span = Span(
        trace_id=incident.trace_id,
        span_id=j.span_id,
        parent_span_id=incident.root_span_id,
        name=f"{j.member.name}: {e.name or e.scope}",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=e.time_ns,
        end_time_unix_nano=e.time_ns,
    )
    attrs = dict(e.attrs) if isinstance(e.attrs, dict) else e.attrs.materialize()
    span.attributes.extend(
        _kvs(
            [
                ("tapio.incident.member", j.member.name),
                ("tapio.incident.role", j.member.role),
                ("tapio.event.name", e.name),
                ("tapio.event.scope", e.scope),
                *((("log.record.body", e.body),) if e.body else ()),
                *((("log.record.severity", e.severity),) if e.severity else ()),
                *((k, v) for k, v in attrs.items() if k not in ("service.name",)),
            ]
        )
    )
    return span


def _request(incident: Incident, spans: list[Span]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(_kvs(resource_attributes(incident.members)))
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = SCOPE_NAME, __version__
    ss.spans.extend(spans)
    return req


def incident_trace(incident: Incident) -> ExportTraceServiceRequest:
    """The incident's trace: its root span and a child span per member event."""
    root = Span(
        trace_id=incident.trace_id,
        span_id=incident.root_span_id,
        name=incident.rule.name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=incident.first_ns,
        end_time_unix_nano=max(incident.last_ns, incident.first_ns),
    )
    root.attributes.extend(_kvs(incident_attributes(incident)))
    if incident.rule.severity in ("error", "critical"):
        root.status.code = Status.STATUS_CODE_ERROR
        root.status.message = incident.summary
    return _request(incident, [root, *(_child(incident, j) for j in incident.members)])


def appended_trace(incident: Incident, added: Iterable[Joined]) -> ExportTraceServiceRequest:
    """Child spans of events that joined a sent incident (same trace, same root)."""
    return _request(incident, [_child(incident, j) for j in added])


def incident_log(incidents: Iterable[Incident], observed_ns: int) -> ExportLogsServiceRequest:
    """One log record per incident (``event_name: tapio.incident``), in the incident's trace."""
    req = ExportLogsServiceRequest()
    for incident in incidents:
        rl = req.resource_logs.add()
        rl.resource.attributes.extend(_kvs(resource_attributes(incident.members)))
        sl = rl.scope_logs.add()
        sl.scope.name, sl.scope.version = SCOPE_NAME, __version__
        lr = sl.log_records.add()
        lr.time_unix_nano = incident.first_ns
        lr.observed_time_unix_nano = observed_ns
        lr.severity_number = _SEVERITY_NUMBER[incident.rule.severity]
        lr.severity_text = incident.rule.severity.upper()
        lr.event_name = INCIDENT_EVENT
        lr.body.string_value = incident.summary
        lr.trace_id, lr.span_id = incident.trace_id, incident.root_span_id
        lr.attributes.extend(_kvs(incident_attributes(incident)))
    return req


def incident_counter(totals: dict[tuple[str, str], int], start_ns: int, now_ns: int) -> ExportMetricsServiceRequest:
    """``tapio.incidents``: a cumulative, monotonic sum of incidents sent, by rule and severity."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(_kvs([("service.name", "tapio")]))
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = SCOPE_NAME, __version__
    metric = sm.metrics.add()
    metric.name = INCIDENTS_METRIC
    metric.description = "Incidents the correlate connector found, by rule and severity."
    metric.unit = "{incident}"
    metric.sum.is_monotonic = True
    metric.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    for (rule, severity), n in sorted(totals.items()):
        p = metric.sum.data_points.add()
        p.start_time_unix_nano, p.time_unix_nano, p.as_int = start_ns, now_ns, n
        p.attributes.extend(_kvs([("tapio.incident.rule", rule), ("tapio.incident.severity", severity)]))
    return req
