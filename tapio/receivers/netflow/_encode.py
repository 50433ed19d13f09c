"""OTLP protobuf pieces written as bytes: attributes, log records, the export request. Pure.

Invariants:
- What is written parses back (protobuf) to the message the protobuf API
  would build from the same values; the tests compare the two.
- An *attribute field* is a whole ``LogRecord.attributes`` entry (tag 6,
  length, KeyValue), so a record's attributes are the concatenation of its
  fields; pieces that repeat (addresses, ports, protocol names) are cached
  whole by `PieceCache`, bounded: a full cache is emptied, never grown.
- Field numbers are those of opentelemetry/proto: common/v1 (AnyValue:
  string 1, int 3, double 4, bytes 7; KeyValue: key 1, value 2),
  logs/v1 (LogRecord: time_unix_nano 1, attributes 6,
  observed_time_unix_nano 11; ScopeLogs: scope 1, log_records 2;
  ResourceLogs: resource 1, scope_logs 2), collector logs/v1
  (ExportLogsServiceRequest: resource_logs 1).
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Iterable

_MASK64 = (1 << 64) - 1
FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
#: exact varints of 0 .. 16383 (one or two bytes), the common case of counts, ports and lengths
SHORT_VARINTS: list[bytes] = [bytes([n]) if n < 128 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(1 << 14)]
#: 14 bits as two varint bytes, both with the continuation bit
VARINT_PAIRS: list[bytes] = [bytes((n & 0x7F | 0x80, (n >> 7) | 0x80)) for n in range(1 << 14)]
_NS_LOW, _NS_HIGH = 1 << 56, 1 << 63

T_ATTRIBUTE = b"\x32"  # LogRecord.attributes
PIECE_CACHE_SIZE = 16384


def varint(n: int) -> bytes:
    """Base-128 varint; a negative n is written as its 64-bit two's complement (ten bytes)."""
    if 0 <= n < 16384:
        return SHORT_VARINTS[n]
    if _NS_LOW <= n < _NS_HIGH:  # nanosecond timestamps after 1972: always nine bytes
        return VARINT_PAIRS[n & 0x3FFF] + VARINT_PAIRS[(n >> 14) & 0x3FFF] + VARINT_PAIRS[(n >> 28) & 0x3FFF] + VARINT_PAIRS[(n >> 42) & 0x3FFF] + SHORT_VARINTS[n >> 56]
    n &= _MASK64
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (SHORT_VARINTS[n] if n < 16384 else varint(n)) + payload


def any_value(value: Any) -> bytes:
    """An AnyValue: str → string, bool/int → int, float → double, bytes → bytes."""
    if isinstance(value, str):
        return field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + varint(int(value))
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return field(b"\x3a", bytes(value))
    raise TypeError(f"no AnyValue for {type(value).__name__}")


def attribute(key: str, value: Any) -> bytes:
    """One ``LogRecord.attributes`` field (KeyValue) — also valid as ``Resource.attributes`` and data point attributes after `retag`."""
    return field(T_ATTRIBUTE, field(b"\x0a", key.encode()) + field(b"\x12", any_value(value)))


def int_prefixes(key: str) -> list[bytes]:
    """For an int attribute ``key``: the bytes before a varint of each length 1..10, so a field is ``prefixes[len(v)] + v``."""
    kv_key = field(b"\x0a", key.encode())
    out = [b""]
    for n in range(1, 11):
        kv = kv_key + b"\x12" + SHORT_VARINTS[n + 1] + b"\x18"
        out.append(T_ATTRIBUTE + varint(len(kv) + n) + kv)
    return out


class HighVarints(dict):
    """n >> 28 → the last five bytes of the varint of n, for 2**56 <= n < 2**63 (nanosecond times); emptied when full.

    The top 35 bits of a nanosecond time change every 268 ms, so consecutive
    flows share them: ``VARINT_PAIRS[n & 16383] + VARINT_PAIRS[n >> 14 & 16383] + cache[n >> 28]``
    is ``varint(n)``.
    """

    __slots__ = ()

    def __missing__(self, high: int) -> bytes:
        if len(self) >= 4096:
            self.clear()
        value = self[high] = bytes((high & 0x7F | 0x80, high >> 7 & 0x7F | 0x80, high >> 14 & 0x7F | 0x80, high >> 21 & 0x7F | 0x80, high >> 28))
        return value


class PieceCache(dict):
    """value → the attribute field of ``key`` with ``convert(value)``, computed on first use; emptied when full."""

    __slots__ = ("key", "convert")

    def __init__(self, key: str, convert: Callable[[Any], Any]) -> None:
        super().__init__()
        self.key = key
        self.convert = convert

    def __missing__(self, value: Any) -> bytes:
        if len(self) >= PIECE_CACHE_SIZE:
            self.clear()
        piece = self[value] = attribute(self.key, self.convert(value))
        return piece


def observed_time_field(observed_unix_nano: int) -> bytes:
    return b"\x59" + FIXED64(observed_unix_nano & _MASK64)


def resource(attributes: Iterable[tuple[str, Any]]) -> bytes:
    """A Resource message (its attributes are field 1, not 6)."""
    return b"".join(b"\x0a" + a[1:] for a in (attribute(k, v) for k, v in attributes))


def scope(name: str, version: str) -> bytes:
    return field(b"\x0a", name.encode()) + field(b"\x12", version.encode())


def logs_request(resource_message: bytes, scope_message: bytes, items: list[bytes]) -> bytes:
    """An ExportLogsServiceRequest with one resource and one scope holding ``items``: log records framed as ``ScopeLogs.log_records`` (tag 2, length, LogRecord)."""
    scoped = field(b"\x0a", scope_message) + b"".join(items)
    return field(b"\x0a", field(b"\x0a", resource_message) + field(b"\x12", scoped))
