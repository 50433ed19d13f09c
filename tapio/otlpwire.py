"""OTLP protobuf bytes written directly on the wire, for receivers that build records. Pure: no I/O, no clocks.

Why: building a LogRecord field by field through the protobuf API costs
~11 µs with a dozen attributes; writing the same message as bytes and
parsing it once (`Batch.from_bytes`, which keeps the bytes for exporters)
costs a fraction of that. Measured numbers are in the commit history and
bench/bench_ebpf_overhead.py.

Invariants:
- The output is exactly the message the protobuf API would build from the
  same values (tests parse it back and compare), with fields in field-number
  order and proto3 scalar defaults (0, "", b"") left out, as protobuf itself
  writes them. AnyValue is a oneof, so a 0 or "" attribute value is written.
- Attribute values: bool → bool_value, int → int_value (int64, two's
  complement when negative), str → string_value, bytes → bytes_value,
  list → array_value of its items' values (an empty list gives an empty
  array_value).
- Field numbers come from opentelemetry/proto: common/v1 (AnyValue,
  KeyValue, ArrayValue, InstrumentationScope), resource/v1 (Resource),
  logs/v1 (LogRecord, ScopeLogs, ResourceLogs), trace/v1 (Span, Status,
  ScopeSpans, ResourceSpans), collector/*/v1 (Export*ServiceRequest).
- ResourceLogs/ScopeLogs and ResourceSpans/ScopeSpans share field numbers
  (resource 1, scope 1, items 2), so one `request` writes both.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Sequence

_MASK64 = (1 << 64) - 1
_SMALL = [bytes([i]) for i in range(128)]
_FIXED64 = struct.Struct("<Q").pack

# field tags: (number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited)
T_ATTR_LOG = b"\x32"  # LogRecord.attributes = 6
T_ATTR_SPAN = b"\x4a"  # Span.attributes = 9
T_ATTR_RESOURCE = b"\x0a"  # Resource.attributes = 1
_T_ITEM = b"\x12"  # ScopeLogs.log_records = 2, ScopeSpans.spans = 2, ResourceLogs.scope_logs = 2


def varint(n: int) -> bytes:
    """Base-128 varint; a negative n is written as its 64-bit two's complement (ten bytes)."""
    if n < 0x80:
        if n >= 0:
            return _SMALL[n]
    elif n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    elif n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    elif n < 0x10000000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
    n &= _MASK64
    out = []
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload

#: a length-delimited field (tag, length, payload), for encoders of other messages built on this module
field = _ld


#: KeyValue.key field (tag 1) for each key seen, ready to prepend
_KEYS: dict[str, bytes] = {}


def _key(key: str) -> bytes:
    found = _KEYS.get(key)
    if found is None:
        found = _KEYS[key] = _ld(b"\x0a", key.encode()) if key else b""
    return found


def any_value(value: Any) -> bytes:
    """An AnyValue message (see the module invariants for the mapping)."""
    t = type(value)
    if t is str:
        return _ld(b"\x0a", value.encode())
    if t is int:
        return b"\x18" + (_SMALL[value] if 0 <= value < 128 else varint(value))
    if t is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if t is bytes:
        return _ld(b"\x3a", value)
    if isinstance(value, (list, tuple)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", any_value(v)) for v in value))
    raise TypeError(f"no AnyValue for {t.__name__}")


def key_value(key: str, value: Any) -> bytes:
    """A KeyValue message."""
    return _key(key) + _ld(b"\x12", any_value(value))


#: key -> the KeyValue's key field and the value field's tag, for int values
_INT_HEADS: dict[str, bytes] = {}
#: (key, value) -> the whole length-prefixed KeyValue, for str, bool and list
#: values; bounded: emptied when full, so high-cardinality values (paths,
#: socket ids) cannot grow it
_PIECES: dict[tuple[str, Any], bytes] = {}
PIECES_CACHE_SIZE = 8192


def kv_pieces(pairs: Iterable[tuple[str, Any]]) -> list[bytes]:
    """Each pair as a length-prefixed KeyValue, lacking only its field tag: join them with `frame`.

    The tag is left out so one encoding serves log records, spans and
    resources alike. Hot path: int values are written inline after a cached
    key; other values are looked up whole in a bounded cache, as most repeat
    (states, kinds, addresses, a workload's paths).
    """
    out = []
    append = out.append
    for key, value in pairs:
        if type(value) is int:
            head = _INT_HEADS.get(key)
            if head is None:
                head = _INT_HEADS[key] = _key(key) + b"\x12"
            v = _SMALL[value] if 0 <= value < 128 else varint(value)
            kv = head + _SMALL[len(v) + 1] + b"\x18" + v
            n = len(kv)
            append((_SMALL[n] if n < 128 else varint(n)) + kv)
            continue
        ck = (key, tuple(value) if type(value) is list else value)
        found = _PIECES.get(ck)
        if found is None:
            if len(_PIECES) >= PIECES_CACHE_SIZE:
                _PIECES.clear()
            kv = key_value(key, value)
            found = _PIECES[ck] = varint(len(kv)) + kv
        append(found)
    return out


def int_piece_heads(key: str) -> list[bytes]:
    """For an int attribute under ``key``: by varint length (1 to 10), what precedes the varint in its `kv_pieces` piece.

    ``heads[len(v)] + v`` with ``v = varint(value)`` equals ``kv_pieces([(key, value)])[0]``.
    """
    out = [b""]
    for n in range(1, 11):
        kv_len = len(_key(key)) + 2 + 1 + n  # key field, value tag and length, AnyValue tag, varint
        out.append(varint(kv_len) + _key(key) + b"\x12" + _SMALL[1 + n] + b"\x18")
    return out


def str_piece(key: str, text: bytes) -> bytes:
    """A string attribute's `kv_pieces` piece from its UTF-8 bytes (no cache)."""
    value = b"\x0a" + varint(len(text)) + text
    kv = _key(key) + b"\x12" + varint(len(value)) + value
    return varint(len(kv)) + kv


def frame(tag: bytes, pieces: list[bytes]) -> bytes:
    """`kv_pieces` output as repeated KeyValue fields under ``tag`` (T_ATTR_LOG, T_ATTR_SPAN, T_ATTR_RESOURCE)."""
    return tag + tag.join(pieces) if pieces else b""


def attributes(tag: bytes, pairs: Iterable[tuple[str, Any]]) -> bytes:
    """Repeated KeyValue fields under ``tag``: `frame` of `kv_pieces`."""
    return frame(tag, kv_pieces(pairs))


def scope(name: str, version: str) -> bytes:
    """An InstrumentationScope message."""
    return (_ld(b"\x0a", name.encode()) if name else b"") + (_ld(b"\x12", version.encode()) if version else b"")


def log_record(
    *,
    time_unix_nano: int,
    observed_time_unix_nano: int,
    severity_number: int,
    severity_text: str,
    body: str | bytes | None,
    attrs: bytes,
    event_name: str,
    trace_id: bytes = b"",
    span_id: bytes = b"",
) -> bytes:
    """A LogRecord message; ``attrs`` is `attributes` (T_ATTR_LOG) output.

    The body is a string value, a bytes value (bytes), or absent (None).
    """
    parts = [b"\x09" + _FIXED64(time_unix_nano & _MASK64)] if time_unix_nano else []
    head = _SEVERITY.get((severity_number, severity_text))
    if head is None:
        head = _SEVERITY[(severity_number, severity_text)] = (b"\x10" + varint(severity_number) if severity_number else b"") + (
            _ld(b"\x1a", severity_text.encode()) if severity_text else b""
        )
    parts.append(head)
    if type(body) is str:
        parts.append(_ld(b"\x2a", _ld(b"\x0a", body.encode())))
    elif body is not None:
        parts.append(_ld(b"\x2a", _ld(b"\x3a", body)))
    parts.append(attrs)
    if trace_id:
        parts.append(_ld(b"\x4a", trace_id))
    if span_id:
        parts.append(_ld(b"\x52", span_id))
    if observed_time_unix_nano:
        parts.append(b"\x59" + _FIXED64(observed_time_unix_nano & _MASK64))
    if event_name:
        name = _EVENT_NAMES.get(event_name)
        if name is None:
            name = _EVENT_NAMES[event_name] = _ld(b"\x62", event_name.encode())
        parts.append(name)
    return b"".join(parts)


#: the few severities and event names a receiver uses, encoded once
_SEVERITY: dict[tuple[int, str], bytes] = {}
_EVENT_NAMES: dict[str, bytes] = {}


def span(
    *,
    trace_id: bytes,
    span_id: bytes,
    name: str,
    kind: int,
    start_time_unix_nano: int,
    end_time_unix_nano: int,
    attrs: bytes,
    status_code: int = 0,
    status_message: str = "",
) -> bytes:
    """A Span message; ``attrs`` is `attributes` (T_ATTR_SPAN) output; a status only when code or message is set."""
    parts = []
    if trace_id:
        parts.append(_ld(b"\x0a", trace_id))
    if span_id:
        parts.append(_ld(b"\x12", span_id))
    if name:
        parts.append(_ld(b"\x2a", name.encode()))
    if kind:
        parts.append(b"\x30" + varint(kind))
    if start_time_unix_nano:
        parts.append(b"\x39" + _FIXED64(start_time_unix_nano & _MASK64))
    if end_time_unix_nano:
        parts.append(b"\x41" + _FIXED64(end_time_unix_nano & _MASK64))
    parts.append(attrs)
    if status_code or status_message:
        status = (_ld(b"\x12", status_message.encode()) if status_message else b"") + (b"\x18" + varint(status_code) if status_code else b"")
        parts.append(_ld(b"\x7a", status))
    return b"".join(parts)


def item(message: bytes) -> bytes:
    """A log record or span framed as an item of its scope (field 2), ready for `request`."""
    return _ld(_T_ITEM, message)


def request_head(resource_attrs: bytes, scope_message: bytes, items_size: int) -> bytes:
    """What precedes the items in `request`: ``request_head(r, s, n) + b"".join(items)`` is the request when the items' bytes total ``n``."""
    scope_field = _ld(b"\x0a", scope_message)
    scoped = len(scope_field) + items_size
    resource_field = _ld(b"\x0a", resource_attrs)
    resourced = len(resource_field) + 1 + len(varint(scoped)) + scoped
    return b"\x0a" + varint(resourced) + resource_field + b"\x12" + varint(scoped) + scope_field


def request(resource_attrs: bytes, scope_message: bytes, items: Sequence[bytes]) -> bytes:
    """An Export{Logs,Trace}ServiceRequest with one resource and one scope holding ``items`` (from `item`)."""
    scoped = _ld(b"\x0a", scope_message) + b"".join(items)
    resourced = _ld(b"\x0a", resource_attrs) + _ld(b"\x12", scoped)
    return _ld(b"\x0a", resourced)
