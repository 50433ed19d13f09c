"""Log records as OTLP protobuf bytes, written on the wire directly. Pure: no I/O, no clocks.

Why: a Kubernetes object decoded from JSON becomes a tree of AnyValue
messages; building that tree through the protobuf API costs about twice
what writing its bytes does, and the batch is parsed once afterwards anyway
(`Batch.from_bytes`, which keeps the bytes for exporters).

Invariants:
- The bytes are the message the protobuf API would build from the same
  values (tests parse them back and compare): proto3 defaults left out of
  LogRecord, every AnyValue written (it is a oneof).
- Python values map to AnyValue as JSON does: str → string_value, bool →
  bool_value, int → int_value (one outside int64 → its decimal text as a
  string), float → double_value, dict → kvlist_value, list/tuple →
  array_value, bytes → bytes_value, None → an empty AnyValue. Nesting
  deeper than `MAX_DEPTH` is written as that subtree's JSON text.
- Every string written is valid UTF-8 (lone surrogates become U+FFFD), so
  the output always parses.

Field numbers are opentelemetry-proto's: common/v1 (AnyValue 1-7,
ArrayValue.values 1, KeyValueList.values 1, KeyValue key 1 value 2,
InstrumentationScope name 1 version 2), resource/v1 (Resource.attributes
1), logs/v1 (LogRecord: severity_number 2, severity_text 3, body 5,
attributes 6, observed_time_unix_nano 11 (fixed64), event_name 12;
ScopeLogs scope 1 log_records 2; ResourceLogs resource 1 scope_logs 2),
collector/logs/v1 (ExportLogsServiceRequest.resource_logs 1).
"""

from __future__ import annotations

import json
import struct
from typing import Any, Iterable, Sequence

from tapio import otlpwire
from tapio.otlpwire import field as _ld
from tapio.otlpwire import scope, varint  # noqa: F401 - part of this module's API

#: AnyValue nesting written as such; deeper subtrees become JSON text (a
#: Kubernetes object is ~10 levels deep; this bounds the encoder's recursion)
MAX_DEPTH = 48

_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_MASK64 = (1 << 64) - 1

SEVERITY_INFO, SEVERITY_WARN = 9, 13


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def any_value(value: Any, depth: int = 0) -> bytes:
    """An AnyValue message (see the module invariants for the mapping)."""
    t = type(value)
    if t is str:
        return _ld(b"\x0a", _utf8(value))
    if t is dict:
        if depth >= MAX_DEPTH:
            return _ld(b"\x0a", _utf8(json.dumps(value, default=repr)))
        return _ld(b"\x32", b"".join([_ld(b"\x0a", key_value(str(k), v, depth + 1)) for k, v in value.items()]))
    if t is list or t is tuple:
        if depth >= MAX_DEPTH:
            return _ld(b"\x0a", _utf8(json.dumps(value, default=repr)))
        return _ld(b"\x2a", b"".join([_ld(b"\x0a", any_value(v, depth + 1)) for v in value]))
    if t is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if t is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return b"\x18" + varint(value)
        return _ld(b"\x0a", str(value).encode())
    if t is float:
        return b"\x21" + _DOUBLE(value)
    if t is bytes:
        return _ld(b"\x3a", value)
    if value is None:
        return b""
    raise TypeError(f"no AnyValue for {t.__name__}")


def key_value(key: str, value: Any, depth: int = 0) -> bytes:
    """A KeyValue message."""
    return _ld(b"\x0a", _utf8(key)) + _ld(b"\x12", any_value(value, depth))


def attributes(pairs: Iterable[tuple[str, Any]], tag: bytes = b"\x32") -> bytes:
    """Repeated KeyValue fields under ``tag``: LogRecord.attributes (the default) or, with ``b"\\x0a"``, Resource.attributes."""
    return b"".join([_ld(tag, key_value(k, v)) for k, v in pairs])


def log_record(*, observed_time_unix_nano: int, severity_number: int, severity_text: str, body: bytes, attrs: bytes, event_name: str) -> bytes:
    """A LogRecord; ``body`` is `any_value` output, ``attrs`` `attributes` output."""
    return b"".join(
        (
            b"\x10" + varint(severity_number),
            _ld(b"\x1a", severity_text.encode()),
            _ld(b"\x2a", body),
            attrs,
            b"\x59" + _FIXED64(observed_time_unix_nano & _MASK64),
            _ld(b"\x62", event_name.encode()),
        )
    )


def request(resource_attrs: bytes, scope_message: bytes, records: Sequence[bytes]) -> bytes:
    """An ExportLogsServiceRequest: one resource, one scope, ``records`` (`log_record` outputs)."""
    return otlpwire.request(resource_attrs, scope_message, [otlpwire.item(r) for r in records])
