"""OTLP log requests built from plain event descriptions, for the correlate connector's tests and bench."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def any_value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


def key_values(attrs: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def logs_request(events: Iterable[Mapping[str, Any]]) -> ExportLogsServiceRequest:
    """One request holding ``events``; each a mapping of ``time_ns``, ``event`` (event name), ``scope``,
    ``attrs``, ``resource`` and ``body`` (all optional). Consecutive events of one resource and scope share
    their ResourceLogs and ScopeLogs, as a receiver would send them."""
    req = ExportLogsServiceRequest()
    last: tuple[Any, Any] | None = None
    sl = None
    for e in events:
        resource = dict(e.get("resource") or {})
        scope = e.get("scope", "")
        ident = (tuple(sorted(resource.items())), scope)
        if ident != last or sl is None:
            rl = req.resource_logs.add()
            rl.resource.attributes.extend(key_values(resource))
            sl = rl.scope_logs.add()
            sl.scope.name = scope
            last = ident
        lr = sl.log_records.add()
        lr.time_unix_nano = int(e.get("time_ns", 0))
        lr.event_name = e.get("event", "")
        if e.get("body"):
            lr.body.string_value = e["body"]
        lr.attributes.extend(key_values(e.get("attrs") or {}))
    return req
