"""OTLP/JSON: the JSON encoding of OTLP export requests, both ways, fast.

OTLP/JSON is protobuf's proto3 JSON mapping with the deviations the OTLP
specification makes (opentelemetry-proto, docs/specification.md, "JSON
Protobuf Encoding"):

- ``traceId``, ``spanId``, ``parentSpanId`` (and a profile's ``profileId``)
  are hex strings, not base64. We write lowercase; we read either case.
- Enum values are written as integers. We also read enum names, which the
  plain protobuf mapping allows and some senders still use.
- Keys are the lowerCamelCase JSON names. The specification says original
  field names (``time_unix_nano``) are *not* valid keys, and that unknown
  keys MUST be ignored, so a snake_case key is ignored like any unknown key.
- 64-bit integers are written as decimal strings; we read strings or numbers.

Invariants:
- ``decode(type(m), encode(m)) == m`` for every message ``m`` whose ids have
  their OTLP lengths (16-byte trace/profile ids, 8-byte span ids or empty).
- `decode` raises `OtlpJsonError` (a `ValueError`) for every malformed input,
  with the key path of the problem, and never any other exception type.
- Both directions are pure functions: no I/O, no global state besides the
  per-descriptor plans, which are built once per message type on first use.

Speed (protobuf 7 upb, Python 3.11, one log record with 10 attributes; see
tests/test_otlpjson.py::test_encode_speed): the encoder walks messages with
``ListFields()`` through a per-field plan and hands one tree of dicts to the
C JSON encoder; the decoder turns the parsed JSON into keyword arguments and
lets the upb constructor build the whole message tree in C.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor

__all__ = ["OtlpJsonError", "encode", "encode_obj", "decode", "decode_obj"]

#: bytes fields written as hex, with the byte length a non-empty value must have
_HEX_IDS = {"trace_id": 16, "span_id": 8, "parent_span_id": 8, "profile_id": 16}

#: messages nested deeper than this are refused: protobuf's own binary parser
#: refuses them too (its default recursion limit is 100), so anything decoded
#: here can also be serialized and parsed again downstream
MAX_DEPTH = 100

_F = FieldDescriptor
_INT64_TYPES = {_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64}
_UINT64_TYPES = {_F.TYPE_UINT64, _F.TYPE_FIXED64}
_INT32_TYPES = {_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32}
_UINT32_TYPES = {_F.TYPE_UINT32, _F.TYPE_FIXED32}
_FLOAT32_MAX = 3.4028234663852886e38
_ANY_VALUE = "opentelemetry.proto.common.v1.AnyValue"
_KEY_VALUE = "opentelemetry.proto.common.v1.KeyValue"


class OtlpJsonError(ValueError):
    """Malformed OTLP/JSON: ``path`` is where (``resourceLogs[0].scopeLogs[2].logRecords[0].traceId``), ``reason`` what."""

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


# --------------------------------------------------------------------------- encode


def encode(message: Any) -> bytes:
    """One compact OTLP/JSON document (UTF-8) for an OTLP message, usually an Export*ServiceRequest."""
    return _dumps(encode_obj(message)).encode("utf-8")


def encode_obj(message: Any) -> dict:
    """The OTLP/JSON form of a message as plain dicts and lists, ready for `json.dumps`."""
    return _encode_message(message)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False, allow_nan=False).encode

#: FieldDescriptor -> (json key, converter or None for values JSON takes as they are)
_ENC: dict[FieldDescriptor, tuple[str, Callable[[Any], Any] | None]] = {}


def _encode_message(msg: Any) -> dict:
    out = {}
    enc = _ENC
    try:
        for fd, value in msg.ListFields():
            key, conv = enc[fd]
            out[key] = value if conv is None else conv(value)
    except KeyError:
        _plan_encoder(msg.DESCRIPTOR)
        return _encode_message(msg)
    return out


def _encode_any_value(v: Any) -> dict:
    # AnyValue is most of the volume (every attribute value): a direct path
    # instead of the generic walk; same output.
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return {"stringValue": v.string_value}
    if kind == "int_value":
        return {"intValue": str(v.int_value)}
    if kind == "bool_value":
        return {"boolValue": v.bool_value}
    if kind == "double_value":
        return {"doubleValue": _encode_double(v.double_value)}
    if kind is None:
        return {}
    return _encode_message(v)


def _encode_key_values(kvs: Any) -> list:
    out = []
    append = out.append
    for kv in kvs:
        if kv.HasField("value"):
            append({"key": kv.key, "value": _encode_any_value(kv.value)} if kv.key else {"value": _encode_any_value(kv.value)})
        else:
            append({"key": kv.key} if kv.key else {})
    return out


def _encode_double(v: float) -> float | str:
    if v - v == 0.0:  # finite (inf - inf and nan - nan are nan)
        return v
    if v != v:
        return "NaN"
    return "Infinity" if v > 0 else "-Infinity"


def _encode_base64(v: bytes) -> str:
    return base64.b64encode(v).decode("ascii")


def _encode_hex(v: bytes) -> str:
    return v.hex()


def _scalar_encoder(fd: FieldDescriptor) -> Callable[[Any], Any] | None:
    t = fd.type
    if t in _INT64_TYPES or t in _UINT64_TYPES:
        return str
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return _encode_double
    if t == _F.TYPE_BYTES:
        return _encode_hex if fd.name in _HEX_IDS else _encode_base64
    return None  # bool, string, 32-bit ints, enums (as integers)


def _plan_encoder(desc: Descriptor) -> None:
    for fd in desc.fields:
        if fd in _ENC:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            raise TypeError(f"{desc.full_name}.{fd.name}: map fields are not supported (OTLP has none)")
        if fd.message_type is not None:
            full = fd.message_type.full_name
            if fd.is_repeated:
                if full == _KEY_VALUE:
                    conv = _encode_key_values
                else:
                    conv = _repeated(_encode_any_value if full == _ANY_VALUE else _encode_message)
            else:
                conv = _encode_any_value if full == _ANY_VALUE else _encode_message
        else:
            scalar = _scalar_encoder(fd)
            if fd.is_repeated:
                conv = list if scalar is None else _repeated(scalar)
            else:
                conv = scalar
        _ENC[fd] = (fd.json_name, conv)


def _repeated(conv: Callable[[Any], Any]) -> Callable[[Any], list]:
    def encode_repeated(values: Any) -> list:
        return [conv(v) for v in values]

    return encode_repeated
