"""OTLP log records as the rules see them: `Event`s, built only for records some rule could match.

Invariants:
- A record whose event name and scope no member names costs a dictionary
  look-up and nothing else: its attributes are not read.
- Attribute values are converted on first use (`LazyAttrs`): a condition
  reads the one or two attributes it names. An event the engine keeps is
  materialized into plain values first, so a kept event never keeps its
  export request alive.
- Record attributes win over resource attributes of the same name.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from ._match import Event, Value


def any_value(v: AnyValue) -> Value:
    """A plain value for an OTLP AnyValue (arrays and maps as JSON text, bytes as hex)."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "bool_value":
        return v.bool_value
    if which == "double_value":
        return v.double_value
    if which == "bytes_value":
        return v.bytes_value.hex()
    if which is None:
        return ""
    return json.dumps(_plain(v), separators=(",", ":"))


def _plain(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_plain(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in v.kvlist_value.values}
    return any_value(v)


class LazyAttrs:
    """Attributes of a record over those of its resource, converted to plain values when read."""

    __slots__ = ("_own", "_under", "_seen")

    def __init__(self, own: Any, under: "LazyAttrs | None" = None) -> None:
        self._own = own  # the repeated KeyValue field
        self._under = under
        self._seen: dict[str, AnyValue] | None = None

    def _index(self) -> dict[str, AnyValue]:
        if self._seen is None:
            self._seen = {kv.key: kv.value for kv in self._own}
        return self._seen

    def get(self, key: str, default: Any = None) -> Any:
        v = self._index().get(key)
        if v is not None:
            return any_value(v)
        if self._under is not None:
            return self._under.get(key, default)
        return default

    def materialize(self) -> dict[str, Value]:
        out = self._under.materialize() if self._under is not None else {}
        out.update((k, any_value(v)) for k, v in self._index().items())
        return out


#: severity numbers → the text the rules and spans show, when a record has no severity_text
_SEVERITY = {1: "TRACE", 5: "DEBUG", 9: "INFO", 13: "WARN", 17: "ERROR", 21: "FATAL"}


def events(request: ExportLogsServiceRequest, candidates: Callable[[str, str], tuple]) -> Iterator[Event]:
    """The events of ``request`` that some member could match (``candidates(name, scope)`` not empty)."""
    for rl in request.resource_logs:
        resource: LazyAttrs | None = None
        for sl in rl.scope_logs:
            scope = sl.scope.name
            for lr in sl.log_records:
                if not candidates(lr.event_name, scope):
                    continue
                if resource is None:
                    resource = LazyAttrs(rl.resource.attributes)
                body = lr.body.string_value if lr.body.WhichOneof("value") == "string_value" else ""
                yield Event(
                    time_ns=lr.time_unix_nano or lr.observed_time_unix_nano,
                    name=lr.event_name,
                    scope=scope,
                    attrs=LazyAttrs(lr.attributes, resource),
                    resource=resource,
                    body=body,
                    severity=lr.severity_text or _SEVERITY.get(lr.severity_number - (lr.severity_number - 1) % 4, ""),
                    record=lr,
                )
