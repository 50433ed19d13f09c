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
- A long export request (`PIECEWISE_MIN_LENGTH`) decodes to the same message
  as a short one would, in steps no longer than parsing one of its records,
  spans, data points, resources or scopes, so a thread decoding it never
  holds the GIL for the whole document (see "decode in pieces" below).

Speed, measured here (protobuf 7 upb, Debian's Python 3.11, 2 cores; one
log record with 10 attributes; tests/test_otlpjson.py::test_encode_speed):
encode ~11-12 µs per record, json_format.MessageToJson ~120 µs; decode
~22-30 µs, json_format.Parse ~130-190 µs. The encoder walks messages with
``ListFields()`` through a per-field plan and writes JSON text directly
(attributes take a hand-written path; about 60% of the time is upb field
access itself). The decoder turns the parsed JSON into keyword arguments and
lets the upb constructor build the message tree in C. `encode_serialized`
writes the same text from a request's protobuf bytes (what a batch usually
still holds) without parsing them: on the cni-log receiver's records about a
quarter fewer instructions (callgrind) than reading the parsed message (see
"encode from protobuf bytes" below). Where tapio/_wirejson.c is built, the
same walk runs compiled: ~1 µs per cni-log record (13 attributes, a 300-byte
body) instead of ~11 µs, the same bytes (`COMPILED_ENV` switches it off).

Two details of our output: an attribute's ``key`` is always written (also
when empty), and NaN is written as ``"NaN"`` (so NaN payload bits are lost).
"""

from __future__ import annotations

import base64
import binascii
import json
import json.encoder as _json_encoder
import math
import os
import re
import struct
from typing import Any, Callable, Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor

__all__ = ["OtlpJsonError", "encode", "encode_many", "encode_serialized", "decode"]

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
    out: list[str] = []
    _write_message(message, out)
    return "".join(out).encode("utf-8")


def encode_many(messages: Sequence[Any]) -> bytes:
    """One OTLP/JSON document for several messages of one type, as if merged.

    The result equals ``encode`` of the protobuf merge of ``messages`` (repeated
    fields concatenated in order), without building the merged message when
    every field set is repeated, as in every Export*ServiceRequest.
    """
    if len(messages) == 1:
        return encode(messages[0])
    merged: dict[FieldDescriptor, list] = {}
    for message in messages:
        for fd, value in message.ListFields():
            if not fd.is_repeated:
                whole = type(messages[0])()
                for m in messages:
                    whole.MergeFrom(m)
                return encode(whole)
            merged.setdefault(fd, []).extend(value)
    if not merged:
        return b"{}"
    out: list[str] = []
    sep = "{"
    for fd in sorted(merged, key=lambda f: f.number):
        if fd not in _ENC:
            _plan_encoder(fd.containing_type)
        prefix, conv, writes = _ENC[fd]
        if writes:
            out.append(sep + prefix)
            conv(merged[fd], out)
        else:
            out.append(sep + prefix + conv(merged[fd]))
        sep = ","
    out.append("}")
    return "".join(out).encode("utf-8")


# The encoder writes JSON text directly into one list of pieces, joined once:
# measured, building a tree of dicts for the C JSON encoder costs twice as
# much, and joining per nesting level copies the whole document once per
# level. Strings go through the json module's C string escaper.
_quote: Callable[[str], str] = _json_encoder.c_encode_basestring or _json_encoder.py_encode_basestring  # type: ignore[attr-defined]

#: FieldDescriptor -> (text before the value: '"jsonName":', converter, whether the converter writes into the piece list)
#: A writer is called as ``conv(value, out)``; any other converter returns the value's JSON text.
_ENC: dict[FieldDescriptor, tuple[str, Callable[..., Any], bool]] = {}


def _write_message(msg: Any, out: list[str]) -> None:
    enc = _ENC
    append = out.append
    sep = "{"
    try:
        fields = [(enc[fd], value) for fd, value in msg.ListFields()]
    except KeyError:
        _plan_encoder(msg.DESCRIPTOR)
        fields = [(enc[fd], value) for fd, value in msg.ListFields()]
    for (prefix, conv, writes), value in fields:
        if writes:
            append(sep + prefix)
            conv(value, out)
        else:
            append(sep + prefix + conv(value))
        sep = ","
    append("}" if fields else "{}")


def _write_messages(msgs: Any, out: list[str]) -> None:
    sep = "["
    for m in msgs:
        out.append(sep)
        _write_message(m, out)
        sep = ","
    out.append("]" if sep == "," else "[]")


def _encode_message(msg: Any) -> str:
    out: list[str] = []
    _write_message(msg, out)
    return "".join(out)


def _encode_any_value(v: Any) -> str:
    # AnyValue is most of the volume (every attribute value): a direct path
    # for the common kinds; same output as the generic walk.
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return '{"stringValue":' + _quote(v.string_value) + "}"
    if kind == "int_value":
        return '{"intValue":"%d"}' % v.int_value
    if kind == "bool_value":
        return '{"boolValue":true}' if v.bool_value else '{"boolValue":false}'
    return _encode_message(v)


def _encode_key_values(kvs: Any) -> str:
    # Attributes: the AnyValue kinds inlined, one formatting step per pair.
    parts = []
    append = parts.append
    quote = _quote
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "string_value":
            append(f'{{"key":{quote(kv.key)},"value":{{"stringValue":{quote(v.string_value)}}}}}')
        elif kind == "int_value":
            append(f'{{"key":{quote(kv.key)},"value":{{"intValue":"{v.int_value}"}}}}')
        elif kind == "bool_value":
            append(f'{{"key":{quote(kv.key)},"value":{{"boolValue":{"true" if v.bool_value else "false"}}}}}')
        elif kind is None and not kv.HasField("value"):
            append('{"key":%s}' % quote(kv.key))
        else:
            append('{"key":%s,"value":%s}' % (quote(kv.key), _encode_any_value(v)))
    return "[" + ",".join(parts) + "]"


_float_repr = float.__repr__


def _encode_double(v: float) -> str:
    if v - v == 0.0:  # finite (inf - inf and nan - nan are nan)
        return _float_repr(v)
    if v != v:
        return '"NaN"'
    return '"Infinity"' if v > 0 else '"-Infinity"'


def _encode_base64(v: bytes) -> str:
    return '"' + base64.b64encode(v).decode("ascii") + '"'


def _encode_hex(v: bytes) -> str:
    return '"' + v.hex() + '"'


_encode_int64 = '"%d"'.__mod__
_encode_bool = {True: "true", False: "false"}.__getitem__
_encode_int = int.__repr__  # 32-bit ints and enums (OTLP wants enum numbers)


def _scalar_encoder(fd: FieldDescriptor) -> Callable[[Any], str]:
    t = fd.type
    if t in _INT64_TYPES or t in _UINT64_TYPES:
        return _encode_int64
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return _encode_double
    if t == _F.TYPE_BYTES:
        return _encode_hex if fd.name in _HEX_IDS else _encode_base64
    if t == _F.TYPE_STRING:
        return _quote
    if t == _F.TYPE_BOOL:
        return _encode_bool
    return _encode_int


def _plan_encoder(desc: Descriptor) -> None:
    for fd in desc.fields:
        if fd in _ENC:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            raise TypeError(f"{desc.full_name}.{fd.name}: map fields are not supported (OTLP has none)")
        writes = False
        if fd.message_type is not None:
            full = fd.message_type.full_name
            if full == _KEY_VALUE and fd.is_repeated:
                conv = _encode_key_values
            elif full == _ANY_VALUE:
                conv = _repeated(_encode_any_value) if fd.is_repeated else _encode_any_value
            else:
                conv, writes = (_write_messages if fd.is_repeated else _write_message), True
        else:
            scalar = _scalar_encoder(fd)
            conv = _repeated(scalar) if fd.is_repeated else scalar
        _ENC[fd] = (_quote(fd.json_name) + ":", conv, writes)


def _repeated(conv: Callable[[Any], str]) -> Callable[[Any], str]:
    def encode_repeated(values: Any) -> str:
        return "[" + ",".join([conv(v) for v in values]) + "]"

    return encode_repeated


# --------------------------------------------------------------------------- encode from protobuf bytes
#
# A batch usually still holds the bytes its requests arrived or were built as
# (`tapio.pdata.Batch.raw`). Walking those bytes once is several times faster
# than reading the parsed message field by field through upb, above all for
# attributes: a KeyValue's bytes repeat from record to record (the same
# host, pod, file, style) and are looked up whole in a bounded cache of their
# JSON text. The walk understands the wire forms protobuf itself writes for
# OTLP; anything else (a packed or repeated singular field, a group, two
# members of one oneof, a wire type that does not fit, bad UTF-8, malformed
# bytes) makes it give up, and the request is parsed and encoded as above.
# So the output is always what `encode` writes for the parsed message.


class _GiveUp(Exception):
    """The bytes hold something the walk does not handle: parse them and encode the message instead."""


_W_VARINT, _W_FIXED64, _W_LEN, _W_FIXED32 = 0, 1, 2, 5
#: field kinds of the walk
(_X_MESSAGE, _X_KEY_VALUES, _X_INT64, _X_UINT64, _X_INT32, _X_UINT32, _X_SINT32, _X_SINT64, _X_BOOL, _X_FIXED64,
 _X_SFIXED64, _X_FIXED32, _X_SFIXED32, _X_DOUBLE, _X_FLOAT, _X_STRING, _X_HEX, _X_BASE64) = range(18)
_SCALAR_KINDS = {
    _F.TYPE_INT64: (_X_INT64, _W_VARINT), _F.TYPE_UINT64: (_X_UINT64, _W_VARINT),
    _F.TYPE_INT32: (_X_INT32, _W_VARINT), _F.TYPE_ENUM: (_X_INT32, _W_VARINT), _F.TYPE_UINT32: (_X_UINT32, _W_VARINT),
    _F.TYPE_SINT32: (_X_SINT32, _W_VARINT), _F.TYPE_SINT64: (_X_SINT64, _W_VARINT),
    _F.TYPE_BOOL: (_X_BOOL, _W_VARINT), _F.TYPE_FIXED64: (_X_FIXED64, _W_FIXED64), _F.TYPE_SFIXED64: (_X_SFIXED64, _W_FIXED64),
    _F.TYPE_FIXED32: (_X_FIXED32, _W_FIXED32), _F.TYPE_SFIXED32: (_X_SFIXED32, _W_FIXED32),
    _F.TYPE_DOUBLE: (_X_DOUBLE, _W_FIXED64), _F.TYPE_FLOAT: (_X_FLOAT, _W_FIXED32), _F.TYPE_STRING: (_X_STRING, _W_LEN),
}
_unpack_d, _unpack_f = struct.Struct("<d").unpack_from, struct.Struct("<f").unpack_from
_unpack_q, _unpack_uq = struct.Struct("<q").unpack_from, struct.Struct("<Q").unpack_from
_unpack_i, _unpack_ui = struct.Struct("<i").unpack_from, struct.Struct("<I").unpack_from


class _WirePlan:
    """How to walk one message type: wire tag -> (field number, JSON prefix, kind, repeated, implicit presence, oneof, sub-plan)."""

    __slots__ = ("tags", "numbers", "packed")

    def __init__(self) -> None:
        self.tags: dict[int, tuple] = {}
        self.numbers: set[int] = set()
        #: the length-delimited tag of a packed repeated number field -> its unpacked wire type and spec
        self.packed: dict[int, tuple[int, tuple]] = {}


_WIRE_PLANS: dict[str, _WirePlan] = {}


def _wire_plan(desc: Descriptor) -> _WirePlan:
    plan = _WIRE_PLANS.get(desc.full_name)
    if plan is not None:
        return plan
    plan = _WirePlan()
    for fd in desc.fields:
        sub = None
        if fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                raise TypeError(f"{desc.full_name}.{fd.name}: map fields are not supported (OTLP has none)")
            if fd.message_type.full_name == _KEY_VALUE and not fd.is_repeated:
                raise TypeError(f"{desc.full_name}.{fd.name}: a single KeyValue is not walked")
            kind = _X_KEY_VALUES if fd.message_type.full_name == _KEY_VALUE else _X_MESSAGE
            wire = _W_LEN
            sub = fd.message_type  # planned on first use: messages may nest themselves
        elif fd.type == _F.TYPE_BYTES:
            kind, wire = (_X_HEX if fd.name in _HEX_IDS else _X_BASE64), _W_LEN
        elif fd.type in _SCALAR_KINDS:
            kind, wire = _SCALAR_KINDS[fd.type]
        else:
            raise TypeError(f"{desc.full_name}.{fd.name}: field type {fd.type} is not walked")
        implicit = not fd.has_presence and not fd.is_repeated
        oneof = fd.containing_oneof.index if fd.containing_oneof is not None else -1
        plan.numbers.add(fd.number)
        spec = (fd.number, _quote(fd.json_name) + ":", kind, fd.is_repeated, implicit, oneof, sub)
        plan.tags[fd.number << 3 | wire] = spec
        if fd.is_repeated and wire != _W_LEN:
            plan.packed[fd.number << 3 | _W_LEN] = (wire, spec)
    _WIRE_PLANS[desc.full_name] = plan  # only once whole
    return plan


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise _GiveUp


#: KeyValue bytes -> its JSON text; bounded: emptied when full
_KV_JSON: dict[bytes, str] = {}
KV_JSON_CACHE_SIZE = 16384


#: nesting walked at most (protobuf's parser refuses more than 100 levels: deeper bytes go to it)
_WALK_DEPTH = 64
_MAX_FIELD_NUMBER = (1 << 29) - 1


def _walk(desc: Descriptor, data: bytes, i: int, end: int, depth: int = 1) -> str:
    """The JSON text of the message of type ``desc`` serialized in ``data[i:end]``."""
    out: list[str] = []
    _write(desc, data, i, end, depth, out)
    return "".join(out)


def _write(desc: Descriptor, data: bytes, i: int, end: int, depth: int, out: list[str]) -> None:
    """`_walk` into a list of pieces shared by the whole document (joined once: no level copies the text below it).

    Fast path: fields in field-number order, each once (a repeated one in one
    run), as protobuf writes them; anything else is read by `_walk_any_order`.
    """
    if depth > _WALK_DEPTH:
        raise _GiveUp
    plan = _WIRE_PLANS.get(desc.full_name) or _wire_plan(desc)
    tags = plan.tags
    begin = i
    mark = len(out)
    append = out.append
    sep = "{"
    last = 0
    oneofs = 0
    while i < end:
        tag = data[i]
        spec = tags.get(tag) if tag < 0x80 else None
        if spec is None:
            break
        number, prefix, kind, repeated, implicit, oneof, sub = spec
        if number <= last:
            break
        last = number
        if oneof >= 0:
            if oneofs >> oneof & 1:
                break
            oneofs |= 1 << oneof
        wire = tag & 7
        if wire == _W_LEN:
            run = kind == _X_KEY_VALUES or kind == _X_MESSAGE and repeated
            if repeated and not run:
                break
            items: list[str] = []
            cache = _KV_JSON
            if run and kind == _X_MESSAGE:
                append(sep + prefix + "[")
            while True:  # a repeated message field comes in one run of its tag: read it in this loop
                n = data[i + 1]
                if n < 0x80:
                    start = i + 2
                else:
                    n, start = _read_varint(data, i + 1)
                i = start + n
                if i > end:
                    raise _GiveUp
                if not run:
                    break
                if kind == _X_KEY_VALUES:
                    text = cache.get(data[start:i])
                    if text is None:
                        raw = data[start:i]
                        text = _key_value_json(raw, depth + 1)
                        if '"arrayValue"' not in text and '"kvlistValue"' not in text:  # the same at any depth
                            if len(cache) >= KV_JSON_CACHE_SIZE:
                                cache.clear()
                            cache[raw] = text
                    items.append(text)
                else:
                    if items:
                        append(",")
                    items.append("")  # counts the elements written
                    _write(sub, data, start, i, depth + 1, out)
                if i + 1 >= end or data[i] != tag:
                    break
            if run:
                append(sep + prefix + "[" + ",".join(items) + "]" if kind == _X_KEY_VALUES else "]")
                sep = ","
                continue
            if kind == _X_MESSAGE:
                if sub is _ANY_VALUE_DESC and start + 1 < i and data[start] == 0x0A:
                    n, at = _read_varint(data, start + 1)
                    simple = at + n == i
                else:
                    simple = False
                if simple:
                    try:  # a string value alone (a log body, say), the commonest AnyValue
                        value = data[at:i].decode("utf-8")
                    except UnicodeDecodeError:
                        raise _GiveUp from None
                    append(sep + prefix + '{"stringValue":' + _quote(value) + "}")
                else:
                    append(sep + prefix)
                    _write(sub, data, start, i, depth + 1, out)
            elif kind == _X_STRING:
                try:
                    value = data[start:i].decode("utf-8")
                except UnicodeDecodeError:
                    raise _GiveUp from None
                if not value and implicit:
                    continue
                append(sep + prefix + _quote(value))
            elif start < i or not implicit:  # bytes
                value = data[start:i]
                append(sep + prefix + (_encode_hex(value) if kind == _X_HEX else _encode_base64(value)))
            else:
                continue
            sep = ","
            continue
        if repeated:
            break
        if wire == _W_FIXED64:
            start, i = i + 1, i + 9
            if i > end:
                raise _GiveUp
            if kind == _X_FIXED64:
                v = _unpack_uq(data, start)[0]
                if v or not implicit:
                    append(sep + prefix + '"%d"' % v)
                    sep = ","
                continue
        elif wire == _W_VARINT:
            v = data[i + 1]
            if v < 0x80:
                i += 2
            else:
                v, i = _read_varint(data, i + 1)
                if v >= 1 << 64:
                    raise _GiveUp
            if i > end:
                raise _GiveUp
            if kind == _X_INT32 and v < 0x80:
                if v or not implicit:
                    append(sep + prefix + _SMALL_INTS[v])
                    sep = ","
                continue
        elif wire == _W_FIXED32:
            start, i = i + 1, i + 5
            if i > end:
                raise _GiveUp
        else:
            raise _GiveUp
        break  # the less common scalars: the general walk reads them
    else:
        append("}" if sep == "," else "{}")
        return
    del out[mark:]
    append(_walk_any_order(desc, data, begin, end, depth))


_SMALL_INTS = [repr(n) for n in range(128)]


def _walk_any_order(desc: Descriptor, data: bytes, i: int, end: int, depth: int) -> str:
    """`_walk` for fields in any order and repeated: protobuf's rules (the last value of a singular field counts)."""
    if depth > _WALK_DEPTH:
        raise _GiveUp
    plan = _WIRE_PLANS.get(desc.full_name) or _wire_plan(desc)
    tags = plan.tags
    values: dict[int, Any] = {}  # field number -> its JSON text (a list of them when repeated)
    prefixes: dict[int, str] = {}
    oneofs: dict[int, int] = {}
    while i < end:
        tag = data[i]
        i += 1
        if tag >= 0x80:
            tag, i = _read_varint(data, i - 1)
        spec = tags.get(tag)
        wire = tag & 7
        if wire == _W_LEN:
            start, i = _length_delimited(data, i, end)
        elif wire == _W_VARINT:
            v = data[i]
            i += 1
            if v >= 0x80:
                v, i = _read_varint(data, i - 1)
                if v >= 1 << 64:
                    raise _GiveUp
        elif wire == _W_FIXED64:
            start, i = i, i + 8
        elif wire == _W_FIXED32:
            start, i = i, i + 4
        else:
            raise _GiveUp  # groups
        if i > end:
            raise _GiveUp
        if spec is None:
            packed = plan.packed.get(tag)
            if packed is not None:
                number, prefix = packed[1][0], packed[1][1]
                found = values.get(number)
                if found is None:
                    found = values[number] = []
                    prefixes[number] = prefix
                found += _unpack_packed(packed[0], packed[1][2], data, start, i)
                continue
            if tag >> 3 in plan.numbers or not 0 < tag >> 3 <= _MAX_FIELD_NUMBER:
                raise _GiveUp  # a known field in another wire form
            continue  # an unknown field: not listed, as protobuf keeps it aside
        number, prefix, kind, repeated, implicit, oneof, sub = spec
        if oneof >= 0:
            other = oneofs.setdefault(oneof, number)
            if other != number:
                raise _GiveUp
        if kind == _X_KEY_VALUES:
            # attributes come in runs of one tag: read the run in one tight loop
            found = values.get(number)
            if found is None:
                found = values[number] = []
                prefixes[number] = prefix
            append = found.append
            cache = _KV_JSON
            while True:
                raw = data[start:i]
                text = cache.get(raw)
                if text is None:
                    text = _key_value_json(raw, depth + 1)
                    if '"arrayValue"' not in text and '"kvlistValue"' not in text:  # the same at any depth
                        if len(cache) >= KV_JSON_CACHE_SIZE:
                            cache.clear()
                        cache[raw] = text
                append(text)
                if i + 1 < end and data[i] == tag and data[i + 1] < 0x80:
                    start = i + 2
                    i = start + data[i + 1]
                    if i > end:
                        raise _GiveUp
                else:
                    break
            continue
        elif kind == _X_MESSAGE:
            if not repeated and number in values:
                raise _GiveUp  # merged by protobuf
            text = _walk(sub, data, start, i, depth + 1)
        elif kind == _X_STRING:
            try:
                value = data[start:i].decode("utf-8")
            except UnicodeDecodeError:
                raise _GiveUp from None
            if implicit and not value:
                values.pop(number, None)
                continue
            text = _quote(value)
        elif kind <= _X_BOOL:
            if kind == _X_INT64:
                if v >= 1 << 63:
                    v -= 1 << 64
                text = '"%d"' % v
            elif kind == _X_UINT64:
                text = '"%d"' % v
            elif kind == _X_INT32:
                v &= 0xFFFFFFFF
                if v >= 1 << 31:
                    v -= 1 << 32
                text = repr(v)
            elif kind == _X_UINT32:
                v &= 0xFFFFFFFF
                text = repr(v)
            elif kind == _X_SINT32:
                v &= 0xFFFFFFFF
                v = (v >> 1) ^ -(v & 1)
                text = repr(v)
            elif kind == _X_SINT64:
                v = (v >> 1) ^ -(v & 1)
                text = '"%d"' % v
            else:
                if v > 1:
                    raise _GiveUp
                text = "true" if v else "false"
            if implicit and not v:
                values.pop(number, None)
                continue
        elif kind == _X_FIXED64 or kind == _X_SFIXED64:
            v = (_unpack_uq if kind == _X_FIXED64 else _unpack_q)(data, start)[0]
            if implicit and not v:
                values.pop(number, None)
                continue
            text = '"%d"' % v
        elif kind == _X_FIXED32 or kind == _X_SFIXED32:
            v = (_unpack_ui if kind == _X_FIXED32 else _unpack_i)(data, start)[0]
            if implicit and not v:
                values.pop(number, None)
                continue
            text = repr(v)
        elif kind == _X_DOUBLE or kind == _X_FLOAT:
            if implicit and data[start:i].count(0) == i - start:
                values.pop(number, None)
                continue
            text = _encode_double((_unpack_d if kind == _X_DOUBLE else _unpack_f)(data, start)[0])
        else:  # bytes
            value = data[start:i]
            if implicit and not value:
                values.pop(number, None)
                continue
            text = _encode_hex(value) if kind == _X_HEX else _encode_base64(value)
        if repeated:
            found = values.get(number)
            if found is None:
                values[number] = [text]
                prefixes[number] = prefix
            else:
                found.append(text)
        else:
            values[number] = text
            prefixes[number] = prefix
    out = []
    for number in sorted(values):
        text = values[number]
        if not text:  # a repeated field in empty packed runs only: not set
            continue
        out.append(prefixes[number] + ("[" + ",".join(text) + "]" if type(text) is list else text))
    return "{" + ",".join(out) + "}"


def _unpack_packed(wire: int, kind: int, data: bytes, i: int, end: int) -> list[str]:
    """The JSON texts of the numbers of a packed repeated field in ``data[i:end]``."""
    out = []
    while i < end:
        if wire == _W_VARINT:
            v, i = _read_varint(data, i)
            if v >= 1 << 64:
                raise _GiveUp
            if kind == _X_INT64 or kind == _X_SINT64:
                if kind == _X_SINT64:
                    v = (v >> 1) ^ -(v & 1)
                elif v >= 1 << 63:
                    v -= 1 << 64
                out.append('"%d"' % v)
            elif kind == _X_UINT64:
                out.append('"%d"' % v)
            elif kind == _X_BOOL:
                if v > 1:
                    raise _GiveUp
                out.append("true" if v else "false")
            else:
                v &= 0xFFFFFFFF
                if kind == _X_SINT32:
                    v = (v >> 1) ^ -(v & 1)
                elif kind == _X_INT32 and v >= 1 << 31:
                    v -= 1 << 32
                out.append(repr(v))
        elif wire == _W_FIXED64:
            if i + 8 > end:
                raise _GiveUp
            if kind == _X_DOUBLE:
                out.append(_encode_double(_unpack_d(data, i)[0]))
            else:
                out.append('"%d"' % (_unpack_uq if kind == _X_FIXED64 else _unpack_q)(data, i)[0])
            i += 8
        else:
            if i + 4 > end:
                raise _GiveUp
            if kind == _X_FLOAT:
                out.append(_encode_double(_unpack_f(data, i)[0]))
            else:
                out.append(repr((_unpack_ui if kind == _X_FIXED32 else _unpack_i)(data, i)[0]))
            i += 4
    if i != end:
        raise _GiveUp
    return out


_KEY_VALUE_DESC: Descriptor | None = None
_ANY_VALUE_DESC: Descriptor | None = None


def _key_value_json(raw: bytes, depth: int) -> str:
    """One attribute as `_encode_key_values` writes it (its key always), from the KeyValue's bytes."""
    key, value, i, end = "", None, 0, len(raw)
    while i < end:
        tag = raw[i]
        i += 1
        if tag >= 0x80:
            tag, i = _read_varint(raw, i - 1)
        if tag & 7 != _W_LEN:
            if tag >> 3 in (1, 2) or not 0 < tag >> 3 <= _MAX_FIELD_NUMBER:
                raise _GiveUp
            _, i = _skip(raw, i, tag & 7)
            if i > end:
                raise _GiveUp
            continue
        start, i = _length_delimited(raw, i, end)
        if not 0 < tag >> 3 <= _MAX_FIELD_NUMBER:
            raise _GiveUp
        if tag == 0x0A:
            try:
                key = raw[start:i].decode("utf-8")
            except UnicodeDecodeError:
                raise _GiveUp from None
        elif tag == 0x12:
            if value is not None:
                raise _GiveUp  # merged by protobuf
            value = _walk(_ANY_VALUE_DESC, raw, start, i, depth + 1)
    if value is None:
        return '{"key":%s}' % _quote(key)
    return '{"key":%s,"value":%s}' % (_quote(key), value)


def _length_delimited(data: bytes, i: int, end: int) -> tuple[int, int]:
    """Where the payload of the length-delimited field whose length is at ``data[i]`` starts and ends."""
    n = data[i]
    i += 1
    if n >= 0x80:
        n, i = _read_varint(data, i - 1)
    if i + n > end:
        raise _GiveUp
    return i, i + n


def _skip(data: bytes, i: int, wire: int) -> tuple[None, int]:
    if wire == _W_VARINT:
        return None, _read_varint(data, i)[1]
    if wire == _W_FIXED64:
        return None, i + 8
    if wire == _W_FIXED32:
        return None, i + 4
    raise _GiveUp


# The same walk compiled (tapio/_wirejson.c), driven by tables made here from
# the `_wire_plan` specs: ~10x faster on cni-log records. It writes the same
# bytes as the Python walk or gives up on the same kinds of input (returns
# None), and then the Python walk runs: the output never depends on it.

#: set to 0 to write with the Python walk only (tests and benches compare the two)
COMPILED_ENV = "TAPIO_OTLPJSON_COMPILED"
#: the names of the _X_* kinds in order, as the compiled walk numbers them (it says so in its KINDS)
_X_NAMES = ("message", "key_values", "int64", "uint64", "int32", "uint32", "sint32", "sint64", "bool", "fixed64",
            "sfixed64", "fixed32", "sfixed32", "double", "float", "string", "hex", "base64")


def _load_compiled() -> tuple[Any, str]:
    """The compiled walk's module, or None and why it is not used."""
    if os.environ.get(COMPILED_ENV, "").strip() == "0":
        return None, f"switched off ({COMPILED_ENV}=0)"
    try:
        from tapio import _wirejson  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"not built ({e}); scripts/setup.sh builds tapio/_wirejson.c (gcc, python3-dev)"
    if tuple(getattr(_wirejson, "KINDS", ())) != _X_NAMES:
        return None, f"{_wirejson.__file__} numbers its field kinds otherwise than otlpjson: rebuild it (scripts/setup.sh)"
    return _wirejson, ""


#: the compiled walk's module (None: the Python walk writes everything) and why it is None
COMPILED, COMPILED_UNUSED_REASON = _load_compiled()
_UNPLANNED = object()
#: request class -> its compiled walker, or None where the Python walk runs (not built, or a type it cannot plan)
_WALKERS: dict[Any, Any] = {}


def _compiled_walker(cls: Any) -> Any:
    walker = None
    if COMPILED is not None:
        try:
            walker = COMPILED.Walker(_walker_tables(cls.DESCRIPTOR))
        except TypeError:  # a type `_wire_plan` refuses: the Python path raises the same for it
            walker = None
    _WALKERS[cls] = walker
    return walker


def _walker_tables(desc: Descriptor) -> list[list[tuple]]:
    """The compiled walk's tables for message type ``desc`` and every type under it (``desc`` first)."""
    index = {desc.full_name: 0}
    order = [desc]
    tables = []
    for d in order:  # grows while walked
        fields = []
        for tag, (number, prefix, kind, repeated, implicit, oneof, sub) in _wire_plan(d).tags.items():
            if kind == _X_KEY_VALUES:  # the walk reads the KeyValue itself: it needs its value's type
                sub = sub.fields_by_name["value"].message_type
            at = -1
            if sub is not None:
                at = index.get(sub.full_name, -1)
                if at < 0:
                    at = index[sub.full_name] = len(order)
                    order.append(sub)
            fields.append((number, prefix.encode("utf-8"), kind, tag & 7, repeated, implicit, oneof, at))
        tables.append(fields)
    return tables


def encode_serialized(cls: Any, data: bytes) -> bytes:
    """`encode` of ``cls.FromString(data)``, read from the bytes (faster; see above); raises as FromString does.

    Several serialized requests joined are one request holding them all (every
    field of an export request is repeated), so ``b"".join(parts)`` gives what
    `encode_many` gives for the parsed parts.

    The compiled walk (`COMPILED`) writes the document when it is built and
    not switched off; where it gives up, the Python walk below does.
    """
    walker = _WALKERS.get(cls, _UNPLANNED)
    if walker is _UNPLANNED:
        walker = _compiled_walker(cls)
    if walker is not None:
        text = walker.encode(data)
        if text is not None:
            return text
    return _encode_serialized_python(cls, data)


def _encode_serialized_python(cls: Any, data: bytes) -> bytes:
    """`encode_serialized` by the Python walk (the reference the compiled one is tested against)."""
    global _KEY_VALUE_DESC, _ANY_VALUE_DESC
    if _ANY_VALUE_DESC is None:
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

        _KEY_VALUE_DESC, _ANY_VALUE_DESC = KeyValue.DESCRIPTOR, AnyValue.DESCRIPTOR
    try:
        text = _walk(cls.DESCRIPTOR, data, 0, len(data))
    except (_GiveUp, IndexError, struct.error):
        return encode(cls.FromString(data))
    return text.encode("utf-8")


# --------------------------------------------------------------------------- decode


def decode(signal_or_class: Any, data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one OTLP/JSON document into a message.

    ``signal_or_class`` is a `tapio.pdata.Signal` (its export request class is
    used) or any OTLP message class. ``data`` is the JSON text, as UTF-8
    bytes or as a str.

    Unknown keys are ignored (the OTLP specification requires it); ``null``
    means "not set". Raises `OtlpJsonError` for anything else that is not
    OTLP/JSON: bad JSON, a value of the wrong type, an id of the wrong
    length, a number out of range, two members of one oneof, nesting deeper
    than `MAX_DEPTH`.

    An export request of `PIECEWISE_MIN_LENGTH` or more is decoded in pieces
    (see `_decode_in_pieces`), so that a thread decoding it lets other
    threads run in between; the result is the same.
    """
    cls = getattr(signal_or_class, "request_class", signal_or_class)
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif not isinstance(data, (bytes, str)):
        raise TypeError(f"decode() wants bytes or str, not {type(data).__name__}")
    if len(data) >= PIECEWISE_MIN_LENGTH and cls.DESCRIPTOR.full_name in _PIECEWISE_FIELDS:
        return _decode_in_pieces(cls, data)
    try:
        obj = json.loads(data, parse_constant=_refuse_constant)
    except _Bad as e:
        raise OtlpJsonError(e.reason) from None
    except json.JSONDecodeError as e:
        raise _invalid_json(e) from None
    except RecursionError:
        raise OtlpJsonError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # undecodable bytes, integers with too many digits
        raise OtlpJsonError(f"invalid JSON: {e}") from None
    try:
        kwargs = _decode_message(_plan_decoder(cls.DESCRIPTOR), obj, 1)
    except _Bad as e:
        raise OtlpJsonError(e.reason, _format_path(e.path)) from None
    except RecursionError:
        raise OtlpJsonError("nested too deeply") from None
    return _construct(cls, kwargs)


def _construct(cls: Any, kwargs: dict) -> Any:
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, OverflowError) as e:  # every value was checked before; kept as a guarantee
        raise OtlpJsonError(f"not a valid {cls.DESCRIPTOR.name}: {e}") from None


def _invalid_json(e: json.JSONDecodeError) -> OtlpJsonError:
    return OtlpJsonError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}")


class _Bad(Exception):
    """A decoding problem on its way up; each level adds its key to ``path`` (innermost first)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.path: list[str | int] = []


def _format_path(path: list[str | int]) -> str:
    out = []
    for part in reversed(path):
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(("." if out else "") + part)
    return "".join(out)


def _refuse_constant(name: str) -> Any:
    raise _Bad(f"invalid JSON: {name} is not a JSON value (write \"{name}\" as a string for a double)")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("…" if len(value) > 40 else "")
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:60]
    return "an object" if isinstance(value, dict) else "an array"


class _Plan:
    """How to decode one message type: JSON key -> (field name, value decoder, oneof name or None)."""

    __slots__ = ("name", "fields")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: dict[str, tuple[str, Callable[[Any, int], Any], str | None]] = {}


_PLANS: dict[str, _Plan] = {}


def _plan_decoder(desc: Descriptor) -> _Plan:
    plan = _PLANS.get(desc.full_name)
    if plan is not None:
        return plan
    plan = _PLANS[desc.full_name] = _Plan(desc.name)
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            raise TypeError(f"{desc.full_name}.{fd.name}: map fields are not supported (OTLP has none)")
        if fd.message_type is not None:
            dec = _message_decoder(fd.message_type)
        else:
            dec = _scalar_decoder(fd)
        if fd.is_repeated:
            dec = _repeated_decoder(dec)
            if fd.message_type is not None and fd.message_type.full_name == _KEY_VALUE:
                dec = _key_values_decoder(dec)
        oneof = fd.containing_oneof
        plan.fields[fd.json_name] = (fd.name, dec, oneof.name if oneof is not None else None)
    return plan


def _decode_message(plan: _Plan, obj: Any, depth: int) -> dict:
    if type(obj) is not dict:
        raise _Bad(f"expected an object ({plan.name}), got {_describe(obj)}")
    if depth > MAX_DEPTH:
        raise _Bad(f"messages nested more than {MAX_DEPTH} deep")
    kwargs = {}
    oneofs: dict[str, str] | None = None
    fields = plan.fields
    for key, value in obj.items():
        field = fields.get(key)
        if field is None or value is None:
            continue  # unknown keys are ignored, null is "not set"
        name, dec, oneof = field
        if oneof is not None:
            if oneofs is None:
                oneofs = {}
            other = oneofs.setdefault(oneof, key)
            if other != key:
                e = _Bad(f"{other!r} and {key!r} are both set but only one of them may be")
                raise e
        try:
            kwargs[name] = dec(value, depth)
        except _Bad as e:
            e.path.append(key)
            raise
    return kwargs


def _message_decoder(desc: Descriptor) -> Callable[[Any, int], dict]:
    plan: _Plan | None = None

    def decode_message(value: Any, depth: int) -> dict:
        nonlocal plan
        if plan is None:
            plan = _plan_decoder(desc)
        return _decode_message(plan, value, depth + 1)

    return decode_message


def _repeated_decoder(dec: Callable[[Any, int], Any]) -> Callable[[Any, int], list]:
    def decode_repeated(value: Any, depth: int) -> list:
        if type(value) is not list:
            raise _Bad(f"expected an array, got {_describe(value)}")
        out = []
        i = 0
        try:
            for i, item in enumerate(value):
                if item is None:
                    raise _Bad("null is not allowed in an array")
                out.append(dec(item, depth))
        except _Bad as e:
            e.path.append(i)
            raise
        return out

    return decode_repeated


_INT_TEXT = re.compile(r"-?[0-9]{1,30}")
_NUMBER_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _int_decoder(lo: int, hi: int, what: str) -> Callable[[Any, int], int]:
    def decode_int(value: Any, depth: int) -> int:
        t = type(value)
        if t is int:
            n = value
        elif t is str:
            if _INT_TEXT.fullmatch(value):
                n = int(value)
            elif len(value) < 40 and _NUMBER_TEXT.fullmatch(value) and float(value).is_integer():
                n = int(float(value))
            else:
                raise _Bad(f"expected {what}, got {_describe(value)}")
        elif t is float and value.is_integer():
            n = int(value)
        else:
            raise _Bad(f"expected {what}, got {_describe(value)}")
        if not lo <= n <= hi:
            raise _Bad(f"{n} is out of range for {what}")
        return n

    return decode_int


def _double_decoder(limit: float, what: str) -> Callable[[Any, int], float]:
    def decode_double(value: Any, depth: int) -> float:
        t = type(value)
        if t is float or t is int:
            try:
                f = float(value)
            except OverflowError:
                raise _Bad(f"{_describe(value)} is out of range for {what}") from None
        elif t is str:
            special = _FLOAT_WORDS.get(value)
            if special is not None:
                return special
            if len(value) > 400 or not _NUMBER_TEXT.fullmatch(value):
                raise _Bad(f"expected {what}, got {_describe(value)}")
            f = float(value)
        else:
            raise _Bad(f"expected {what}, got {_describe(value)}")
        if not -limit <= f <= limit:
            raise _Bad(f"{_describe(value)} is out of range for {what}")
        return f

    return decode_double


_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT64_MAX = 1.7976931348623157e308


def _decode_bool(value: Any, depth: int) -> bool:
    if type(value) is not bool:
        raise _Bad(f"expected true or false, got {_describe(value)}")
    return value


def _decode_string(value: Any, depth: int) -> str:
    if type(value) is not str:
        raise _Bad(f"expected a string, got {_describe(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad("the string is not valid Unicode (it has a lone surrogate)") from None
    return value


_URLSAFE = str.maketrans("-_", "+/")


def _decode_base64(value: Any, depth: int) -> bytes:
    if type(value) is not str:
        raise _Bad(f"expected base64 bytes in a string, got {_describe(value)}")
    text = value.translate(_URLSAFE)
    text += "=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _Bad(f"expected base64 bytes, got {_describe(value)}") from None


_HEX_TEXT = re.compile(r"[0-9a-fA-F]*")


def _hex_decoder(size: int, field_json_name: str) -> Callable[[Any, int], bytes]:
    def decode_hex(value: Any, depth: int) -> bytes:
        if type(value) is not str:
            raise _Bad(f"expected {size * 2} hex digits in a string, got {_describe(value)}")
        if value and (len(value) != size * 2 or not _HEX_TEXT.fullmatch(value)):
            raise _Bad(f"expected {size * 2} hex digits ({size} bytes) or an empty string, got {_describe(value)}")
        return bytes.fromhex(value)

    return decode_hex


def _enum_decoder(fd: FieldDescriptor) -> Callable[[Any, int], int]:
    by_name = {v.name: v.number for v in fd.enum_type.values}
    what = f"an enum {fd.enum_type.name} number"
    as_int = _int_decoder(-(2**31), 2**31 - 1, what)

    def decode_enum(value: Any, depth: int) -> int:
        if type(value) is str:
            number = by_name.get(value)
            if number is None:
                raise _Bad(f"expected {what} (or name), got {_describe(value)}")
            return number
        return as_int(value, depth)

    return decode_enum


def _scalar_decoder(fd: FieldDescriptor) -> Callable[[Any, int], Any]:
    t = fd.type
    if t in _INT64_TYPES:
        return _int_decoder(-(2**63), 2**63 - 1, "a 64-bit integer")
    if t in _UINT64_TYPES:
        return _int_decoder(0, 2**64 - 1, "an unsigned 64-bit integer")
    if t in _INT32_TYPES:
        return _int_decoder(-(2**31), 2**31 - 1, "a 32-bit integer")
    if t in _UINT32_TYPES:
        return _int_decoder(0, 2**32 - 1, "an unsigned 32-bit integer")
    if t == _F.TYPE_DOUBLE:
        return _double_decoder(_FLOAT64_MAX, "a double")
    if t == _F.TYPE_FLOAT:
        return _double_decoder(_FLOAT32_MAX, "a float")
    if t == _F.TYPE_BOOL:
        return _decode_bool
    if t == _F.TYPE_STRING:
        return _decode_string
    if t == _F.TYPE_BYTES:
        size = _HEX_IDS.get(fd.name)
        return _hex_decoder(size, fd.json_name) if size is not None else _decode_base64
    if t == _F.TYPE_ENUM:
        return _enum_decoder(fd)
    raise TypeError(f"{fd.full_name}: field type {t} is not supported")


def _key_values_decoder(generic: Callable[[Any, int], list]) -> Callable[[Any, int], list]:
    """Attributes: a direct path for the common pairs, the generic decoder (and its errors) for the rest."""

    def decode_key_values(value: Any, depth: int) -> list:
        if type(value) is list:
            out = []
            append = out.append
            for item in value:
                # {"key": "<ascii>", "value": {"stringValue": "<ascii>" | "intValue": "<digits>" | "boolValue": bool}}
                if type(item) is not dict or len(item) != 2:
                    break
                key = item.get("key")
                any_value = item.get("value")
                if type(key) is not str or not key.isascii() or type(any_value) is not dict or len(any_value) != 1:
                    break
                ((kind, v),) = any_value.items()
                if kind == "stringValue" and type(v) is str and v.isascii():
                    append({"key": key, "value": {"string_value": v}})
                elif kind == "intValue" and type(v) is str and _INT_TEXT.fullmatch(v) and -(2**63) <= (n := int(v)) < 2**63:
                    append({"key": key, "value": {"int_value": n}})
                elif kind == "boolValue" and type(v) is bool:
                    append({"key": key, "value": {"bool_value": v}})
                else:
                    break
            else:
                return out
        return generic(value, depth)

    return decode_key_values


# --------------------------------------------------------------------------- decode in pieces
#
# json.loads of a large document is one call into C that holds the GIL from
# start to end (about 30 ms per MiB of OTLP/JSON), so decoding it in a worker
# thread would still stop every other thread, the event loop's too. A long
# export request is therefore walked down its levels here (request,
# resource, scope, and for metrics the metric and its data) in Python, and
# each record, span, data point or metric is parsed by the C scanner on its
# own and added to the message under construction in place; between two of
# them the interpreter can switch threads. Measured on a 36 MiB document of
# 40k log records: 1.0 s instead of 2.4 s (the JSON tree of the whole
# document never exists, so the garbage collector has less to walk), and no
# single step longer than a record.

#: documents at least this long (bytes or characters) are decoded in pieces: below it one json.loads holds the GIL
#: for less than ~2 ms, and the pieces would save nothing
PIECEWISE_MIN_LENGTH = 64 * 1024

#: message -> its fields decoded piece by piece: the levels above records, spans and data points
_PIECEWISE_FIELDS: dict[str, tuple[str, ...]] = {
    "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest": ("resource_logs",),
    "opentelemetry.proto.logs.v1.ResourceLogs": ("scope_logs",),
    "opentelemetry.proto.logs.v1.ScopeLogs": ("log_records",),
    "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest": ("resource_spans",),
    "opentelemetry.proto.trace.v1.ResourceSpans": ("scope_spans",),
    "opentelemetry.proto.trace.v1.ScopeSpans": ("spans",),
    "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest": ("resource_metrics",),
    "opentelemetry.proto.metrics.v1.ResourceMetrics": ("scope_metrics",),
    "opentelemetry.proto.metrics.v1.ScopeMetrics": ("metrics",),
    "opentelemetry.proto.metrics.v1.Metric": ("gauge", "sum", "histogram", "exponential_histogram", "summary"),
    "opentelemetry.proto.metrics.v1.Gauge": ("data_points",),
    "opentelemetry.proto.metrics.v1.Sum": ("data_points",),
    "opentelemetry.proto.metrics.v1.Histogram": ("data_points",),
    "opentelemetry.proto.metrics.v1.ExponentialHistogram": ("data_points",),
    "opentelemetry.proto.metrics.v1.Summary": ("data_points",),
}

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_scan_value = json.JSONDecoder(parse_constant=_refuse_constant).scan_once
_scan_string = json.decoder.scanstring
_UTF8_BOM = "\ufeff"


class _Piece:
    """A field decoded piece by piece."""

    __slots__ = ("fd", "element", "piecewise")

    def __init__(self, fd: FieldDescriptor) -> None:
        self.fd = fd
        #: the element's message type
        self.element: Descriptor = fd.message_type
        #: whether the element is itself decoded in pieces
        self.piecewise = fd.message_type.full_name in _PIECEWISE_FIELDS


#: message full name -> JSON key -> _Piece, for the messages in _PIECEWISE_FIELDS
_PIECES: dict[str, dict[str, _Piece]] = {}


def _pieces_of(desc: Descriptor) -> dict[str, _Piece]:
    pieces = _PIECES.get(desc.full_name)
    if pieces is None:
        names = _PIECEWISE_FIELDS[desc.full_name]
        pieces = {}
        for name in names:
            fd = desc.fields_by_name[name]
            oneof = fd.containing_oneof
            if oneof is not None and any(f.name not in names for f in oneof.fields):
                # the oneof check below sees only the fields decoded in pieces
                raise TypeError(f"{desc.full_name}: oneof {oneof.name} mixes fields decoded in pieces with others")
            pieces[fd.json_name] = _Piece(fd)
        _PIECES[desc.full_name] = pieces
    return pieces


def _decode_in_pieces(cls: Any, data: bytes | str) -> Any:
    """`decode` for a long export request: the same result, the same kinds of errors.

    When a document has several problems, the one reported may differ from
    the one `json.loads` would have found first (a bad value before a syntax
    error further on is reported here, not the syntax error).
    """
    message = cls()
    try:
        if isinstance(data, str):
            if data.startswith(_UTF8_BOM):
                raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
            text = data
        else:  # as json.loads reads bytes
            text = data.decode(json.detect_encoding(data), "surrogatepass")
        end = _piece_message(message, text, _WHITESPACE.match(text, 0).end(), 1)
        end = _WHITESPACE.match(text, end).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except OtlpJsonError:
        raise
    except _Bad as e:
        raise OtlpJsonError(e.reason, _format_path(e.path)) from None
    except json.JSONDecodeError as e:
        raise _invalid_json(e) from None
    except RecursionError:
        raise OtlpJsonError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # undecodable bytes, integers with too many digits
        raise OtlpJsonError(f"invalid JSON: {e}") from None
    return message


def _scan(s: str, i: int) -> tuple[Any, int]:
    """The JSON value at ``s[i]`` and the index after it."""
    try:
        return _scan_value(s, i)
    except StopIteration as e:
        raise json.JSONDecodeError("Expecting value", s, e.value) from None


def _piece_message(message: Any, s: str, i: int, depth: int) -> int:
    """Decode the JSON object at ``s[i]`` into the empty ``message``; returns the index after it."""
    desc = message.DESCRIPTOR
    plan = _plan_decoder(desc)
    if not s.startswith("{", i):
        value, _ = _scan(s, i)
        _decode_message(plan, value, depth)  # not an object: raises, saying so
        raise AssertionError("unreachable")
    pieces = _pieces_of(desc)
    rest: dict[str, Any] = {}
    #: JSON keys of the fields decoded in pieces -> whether their last value was set (not null)
    seen: dict[str, bool] = {}
    ws = _WHITESPACE.match
    i = ws(s, i + 1).end()
    if s.startswith("}", i):
        i += 1
    else:
        while True:
            if not s.startswith('"', i):
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, i)
            key, i = _scan_string(s, i + 1)
            i = ws(s, i).end()
            if not s.startswith(":", i):
                raise json.JSONDecodeError("Expecting ':' delimiter", s, i)
            i = ws(s, i + 1).end()
            piece = pieces.get(key)
            if piece is None:
                rest[key], i = _scan(s, i)
            else:
                if key in seen:  # a repeated key: its last value counts, as in json.loads
                    message.ClearField(piece.fd.name)
                try:
                    i, seen[key] = _piece_field(message, piece, s, i, depth)
                except _Bad as e:
                    e.path.append(key)
                    raise
            i = ws(s, i).end()
            if s.startswith(",", i):
                i = ws(s, i + 1).end()
            elif s.startswith("}", i):
                i += 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", s, i)
    oneofs: dict[str, str] = {}
    for key, is_set in seen.items():
        oneof = pieces[key].fd.containing_oneof
        if is_set and oneof is not None:
            other = oneofs.setdefault(oneof.name, key)
            if other != key:
                raise _Bad(f"{other!r} and {key!r} are both set but only one of them may be")
    if rest:
        message.MergeFrom(_construct(type(message), _decode_message(plan, rest, depth)))
    return i


def _piece_field(message: Any, piece: _Piece, s: str, i: int, depth: int) -> tuple[int, bool]:
    """Decode the value at ``s[i]`` into ``message``'s field; returns the index after it and whether it was set."""
    fd = piece.fd
    if s.startswith("null", i):
        return i + 4, False  # not set
    if not fd.is_repeated:
        field = getattr(message, fd.name)
        field.SetInParent()  # set even when the object is empty
        return _piece_element(piece, field, s, i, depth + 1), True
    if not s.startswith("[", i):
        value, _ = _scan(s, i)
        _plan_decoder(message.DESCRIPTOR).fields[fd.json_name][1](value, depth)  # not an array: raises, saying so
        raise AssertionError("unreachable")
    container = getattr(message, fd.name)
    ws = _WHITESPACE.match
    i = ws(s, i + 1).end()
    if s.startswith("]", i):
        return i + 1, True
    n = 0
    while True:
        try:
            if s.startswith("null", i):
                raise _Bad("null is not allowed in an array")
            i = _piece_element(piece, container, s, i, depth + 1)
        except _Bad as e:
            e.path.append(n)
            raise
        n += 1
        i = ws(s, i).end()
        if s.startswith(",", i):
            i = ws(s, i + 1).end()
        elif s.startswith("]", i):
            return i + 1, True
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", s, i)


def _piece_element(piece: _Piece, target: Any, s: str, i: int, depth: int) -> int:
    """Decode the object at ``s[i]`` into ``target``: a message, or a repeated field to add it to."""
    if piece.piecewise:
        return _piece_message(target.add() if piece.fd.is_repeated else target, s, i, depth)
    value, i = _scan(s, i)
    kwargs = _decode_message(_plan_decoder(piece.element), value, depth)
    try:
        if piece.fd.is_repeated:
            target.add(**kwargs)
        else:
            target.MergeFrom(type(target)(**kwargs))
    except (ValueError, TypeError, OverflowError) as e:  # every value was checked before; kept as a guarantee
        raise OtlpJsonError(f"not a valid {piece.element.name}: {e}") from None
    return i
