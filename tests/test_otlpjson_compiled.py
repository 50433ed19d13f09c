"""tapio._wirejson, the compiled walk of `otlpjson.encode_serialized`, against the Python walk and against
`encode(cls.FromString(data))`: byte for byte, on random requests of every signal built from the protobuf
descriptors, re-serialized in other wire forms, joined, mutated and truncated, and on hand-made edge cases.

Run once under ``PYTHONMALLOC=debug`` too (the lead's check for leaks and overruns on garbage input).
"""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import HistogramDataPoint

from tapio import otlpjson
from tapio.otlpjson import encode
from tapio.testing import prereq
from tapio.testing.process import ROOT

REQUESTS = [ExportLogsServiceRequest, ExportMetricsServiceRequest, ExportTraceServiceRequest, ExportProfilesServiceRequest]
F = FieldDescriptor


def walker(cls):
    """The compiled walker of ``cls`` (`prereq.missing` when the module is not built or switched off)."""
    if otlpjson.COMPILED is None:
        prereq.missing("tapio's compiled OTLP/JSON walk (tapio._wirejson)", f"{otlpjson.COMPILED_UNUSED_REASON}")
    w = otlpjson._compiled_walker(cls)
    assert w is not None, f"{cls.__name__}: no compiled walker"
    return w


def outcome(fn, *args):
    """What ``fn(*args)`` returns, or the type and text of the exception it raises."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return (type(e), str(e))


def reference(cls, data):
    return outcome(lambda: encode(cls.FromString(data)))


def check(cls, data, *, must_walk=False):
    """The compiled walk writes what the Python walk and encode(FromString) write, or gives up (None);
    encode_serialized (which takes the compiled walk first) gives the same result or raises the same way."""
    expected = reference(cls, data)
    assert outcome(otlpjson._encode_serialized_python, cls, data) == expected
    compiled = walker(cls).encode(data)
    if compiled is not None:
        assert compiled == expected
    elif must_walk:
        pytest.fail(f"the compiled walk gave up on bytes protobuf wrote: {data!r}")
    assert outcome(otlpjson.encode_serialized, cls, data) == expected
    return compiled


# ----------------------------------------------------------------------------- random messages from the descriptors

INT64_EDGES = [-(2**63), -(2**63) + 1, -1, 0, 1, 2**31, 2**63 - 1]
UINT64_EDGES = [0, 1, 2**32, 2**63, 2**64 - 1]
INT32_EDGES = [-(2**31), -1, 0, 1, 127, 128, 2**31 - 1]
UINT32_EDGES = [0, 1, 2**31, 2**32 - 1]
DOUBLE_EDGES = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1e16, 1e22, 1e-7, 0.1, 1 / 3,
                1.7976931348623157e308, math.inf, -math.inf, math.nan]
# control characters, quotes, backslashes, DEL, U+2028, astral planes: what JSON escaping must get right
tricky_text = st.text(alphabet=st.one_of(st.characters(max_codepoint=0x7F), st.sampled_from("\u2028\u2029\x7f\u00e9\ufffd\U0001f600\U0010ffff"),
                                         st.characters(exclude_categories=("Cs",))), max_size=20)  # no lone surrogates: protobuf strings cannot hold them


def _scalar(fd):
    t = fd.type
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_ENUM):  # enums are open in proto3: any int32
        return st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.one_of(st.sampled_from(UINT32_EDGES), st.integers(0, 2**32 - 1))
    if t == F.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats())
    if t == F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return tricky_text
    if t == F.TYPE_BYTES:  # raw bytes: invalid UTF-8 is fine here
        return st.one_of(st.binary(max_size=20), st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8))
    raise AssertionError(fd.full_name)


@st.composite
def messages(draw, desc, depth=0):
    """A message of type ``desc`` with a random subset of its fields set (one member of each oneof at most)."""
    msg = _class_of(desc)()
    oneofs_done = set()
    for fd in desc.fields:
        if not draw(st.booleans()):
            continue
        oneof = fd.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs_done:
                continue
            oneofs_done.add(oneof.name)
        if fd.message_type is not None:
            if depth >= 4:
                continue
            if fd.is_repeated:
                for sub in draw(st.lists(messages(fd.message_type, depth + 1), max_size=3)):
                    getattr(msg, fd.name).add().CopyFrom(sub)
            else:
                getattr(msg, fd.name).CopyFrom(draw(messages(fd.message_type, depth + 1)))
                getattr(msg, fd.name).SetInParent()
        elif fd.is_repeated:
            getattr(msg, fd.name).extend(draw(st.lists(_scalar(fd), max_size=4)))
        else:
            setattr(msg, fd.name, draw(_scalar(fd)))
    return msg


_CLASSES = {}


def _class_of(desc):
    cls = _CLASSES.get(desc.full_name)
    if cls is None:
        from google.protobuf import message_factory

        cls = _CLASSES[desc.full_name] = message_factory.GetMessageClass(desc)
    return cls


any_request = st.sampled_from(REQUESTS).flatmap(lambda cls: messages(cls.DESCRIPTOR))


# ----------------------------------------------------------------------------- other wire forms of the same messages


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(data: bytes):
    """The (number, wire type, payload) fields of a message's bytes, which protobuf wrote."""
    i, out = 0, []
    while i < len(data):
        tag, i = _read_varint(data, i)
        wire = tag & 7
        if wire == 0:
            start = i
            _, i = _read_varint(data, i)
            out.append((tag >> 3, wire, data[start:i]))
        elif wire == 1:
            out.append((tag >> 3, wire, data[i:i + 8]))
            i += 8
        elif wire == 5:
            out.append((tag >> 3, wire, data[i:i + 4]))
            i += 4
        else:
            n, i = _read_varint(data, i)
            out.append((tag >> 3, wire, data[i:i + n]))
            i += n
    return out


_read_varint = otlpjson._read_varint


_PACKED_WIRE = {F.TYPE_DOUBLE: 1, F.TYPE_FIXED64: 1, F.TYPE_SFIXED64: 1, F.TYPE_FLOAT: 5, F.TYPE_FIXED32: 5, F.TYPE_SFIXED32: 5}


def rewrite(desc, data: bytes, rnd: random.Random) -> bytes:
    """The same message in other wire forms protobuf reads alike: fields shuffled (a repeated field's elements
    keep their order), packed fields unpacked or split, unknown fields of every wire type added, tags and
    lengths in overlong varints. Nested messages are rewritten likewise."""
    by_number = {fd.number: fd for fd in desc.fields}
    pieces = []  # (number, bytes)
    for number, wire, payload in _fields(data):
        fd = by_number.get(number)
        if fd is not None and fd.message_type is not None:
            payload = rewrite(fd.message_type, payload, rnd)
        if fd is not None and fd.is_repeated and wire == 2 and fd.message_type is None and fd.type not in (F.TYPE_STRING, F.TYPE_BYTES):
            elements = _packed_elements(fd, payload)
            if rnd.random() < 0.5:  # unpacked, one tag per element
                ew = _PACKED_WIRE.get(fd.type, 0)
                for e in elements:
                    pieces.append((number, _varint(number << 3 | ew) + e))
                continue
            cut = rnd.randint(0, len(elements))  # two packed runs
            for part in (elements[:cut], elements[cut:]):
                body = b"".join(part)
                pieces.append((number, _tag(number, 2, rnd) + _varint(len(body)) + body))
            continue
        if wire == 2:
            pieces.append((number, _tag(number, 2, rnd) + _length(len(payload), rnd) + payload))
        else:
            pieces.append((number, _tag(number, wire, rnd) + payload))
        if rnd.random() < 0.2:
            pieces.append((0, _unknown_field(by_number, rnd)))
    # shuffle, keeping each field's pieces in their order
    order = [n for n, _ in pieces]
    rnd.shuffle(order)
    queues = {}
    for n, piece in pieces:
        queues.setdefault(n, []).append(piece)
    return b"".join(queues[n].pop(0) for n in order)


def _packed_elements(fd, payload: bytes) -> list[bytes]:
    size = {1: 8, 5: 4}.get(_PACKED_WIRE.get(fd.type, 0))
    if size:
        return [payload[i:i + size] for i in range(0, len(payload), size)]
    out, i = [], 0
    while i < len(payload):
        _, j = _read_varint(payload, i)
        out.append(payload[i:j])
        i = j
    return out


def _tag(number: int, wire: int, rnd: random.Random) -> bytes:
    tag = _varint(number << 3 | wire)
    if rnd.random() < 0.1 and len(tag) < 5:  # one byte longer than needed: protobuf reads it alike
        tag = tag[:-1] + bytes([tag[-1] | 0x80, 0])
    return tag


def _length(n: int, rnd: random.Random) -> bytes:
    out = _varint(n)
    if rnd.random() < 0.1:
        out = out[:-1] + bytes([out[-1] | 0x80, 0])
    return out


def _unknown_field(by_number, rnd: random.Random) -> bytes:
    number = rnd.choice([n for n in (50, 99, 1000, 2**29 - 1) if n not in by_number])
    wire = rnd.choice([0, 1, 2, 5])
    body = {0: _varint(rnd.randrange(2**64)), 1: rnd.randbytes(8), 5: rnd.randbytes(4)}.get(wire)
    if body is None:
        payload = rnd.randbytes(rnd.randint(0, 5))
        body = _varint(len(payload)) + payload
    return _varint(number << 3 | wire) + body


# ----------------------------------------------------------------------------- differential tests


@given(any_request)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_random_requests_of_every_signal_as_protobuf_writes_them(request):
    check(type(request), request.SerializeToString(), must_walk=True)


@given(any_request, st.randoms(use_true_random=False))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_random_requests_in_other_wire_forms(request, rnd):
    data = rewrite(request.DESCRIPTOR, request.SerializeToString(), rnd)
    parsed = type(request).FromString(data)
    parsed.DiscardUnknownFields()
    assert parsed == request
    check(type(request), data)


@given(st.sampled_from(REQUESTS).flatmap(lambda cls: st.lists(messages(cls.DESCRIPTOR), min_size=2, max_size=4)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_joined_requests(reqs):
    cls = type(reqs[0])
    # a singular message field in two parts (a profiles request's dictionary) is merged by protobuf: the Python path writes it
    merges = any(not fd.is_repeated for fd in cls.DESCRIPTOR.fields)
    check(cls, b"".join(r.SerializeToString() for r in reqs), must_walk=not merges)


@given(any_request, st.data())
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_mutated_and_truncated_bytes(request, data):
    raw = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        what = data.draw(st.sampled_from(["byte", "chunk", "truncate", "insert"]))
        if what == "byte" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif what == "chunk":  # a chunk moved or repeated elsewhere: fields out of order, singular fields twice
            a = data.draw(st.integers(0, len(raw)))
            b = data.draw(st.integers(a, len(raw)))
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = raw[a:b]
        elif what == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=6))
    check(type(request), bytes(raw))


@given(st.sampled_from(REQUESTS), st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage(cls, data):
    check(cls, data)


def test_garbage_of_every_length_and_byte():
    """Every byte at every position of short inputs, and every prefix of a real request."""
    req = ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add(time_unix_nano=1, severity_text="I", body=AnyValue(double_value=1.5))
    rec.attributes.add(key="k", value=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=-1), AnyValue(bytes_value=b"\xff")])))
    data = req.SerializeToString()
    for end in range(len(data) + 1):
        check(ExportLogsServiceRequest, data[:end])
    for at in range(len(data)):
        for b in (0x00, 0x01, 0x02, 0x05, 0x07, 0x0A, 0x12, 0x7F, 0x80, 0xC0, 0xFF):
            check(ExportLogsServiceRequest, data[:at] + bytes([b]) + data[at + 1:])


def test_a_huge_request():
    """Many records and long repeated fields: one document, the same bytes."""
    req = ExportLogsServiceRequest()
    scope = req.resource_logs.add().scope_logs.add()
    for i in range(3000):
        rec = scope.log_records.add(time_unix_nano=i, body=AnyValue(string_value="x" * (i % 700)))
        for j in range(13):
            rec.attributes.add(key=f"attr.{j}", value=AnyValue(int_value=i * j) if j % 2 else AnyValue(string_value=f"v{i}-{j}"))
    point = HistogramDataPoint(bucket_counts=range(20000), explicit_bounds=[i / 7 for i in range(19999)])
    metrics = ExportMetricsServiceRequest()
    metrics.resource_metrics.add().scope_metrics.add().metrics.add(name="h").histogram.data_points.append(point)
    assert check(ExportLogsServiceRequest, req.SerializeToString(), must_walk=True)
    assert check(ExportMetricsServiceRequest, metrics.SerializeToString(), must_walk=True)


def test_repeated_attributes_through_the_cache():
    """Attributes are kept by their bytes in a bounded cache: many more distinct ones than it holds, met again in
    another order, beside the same bytes under arrays and kvlists (never kept: their text could depend on depth)."""
    rnd = random.Random(5)
    kvs = [KeyValue(key=f"k{i % 97}", value=AnyValue(string_value=f"v{i}") if i % 3 else AnyValue(int_value=i)) for i in range(3000)]
    kvs += [KeyValue(key="", value=AnyValue(bool_value=True)), KeyValue(key="only"), KeyValue(key="e", value=AnyValue())]
    nested = [KeyValue(key="n", value=AnyValue(kvlist_value={"values": kvs[:3]})), KeyValue(key="a", value=AnyValue(array_value={"values": [kvs[0].value]}))]
    for _ in range(3):
        req = ExportLogsServiceRequest()
        scope = req.resource_logs.add().scope_logs.add()
        for _ in range(300):
            scope.log_records.add(attributes=rnd.sample(kvs, 12) + nested)
        check(ExportLogsServiceRequest, req.SerializeToString(), must_walk=True)


def test_a_cached_attribute_met_again_near_the_depth_limit():
    kv = KeyValue(key="k", value=AnyValue(string_value="v"))
    walked = []
    for levels in range(18, 24):  # AnyValue > KeyValueList > KeyValue: three levels each
        value = AnyValue(kvlist_value={"values": [kv]}).SerializeToString()
        for _ in range(levels):
            kvl = b"\x0a" + _varint(len(b"\x0a\x01x\x12" + _varint(len(value)) + value)) + b"\x0a\x01x\x12" + _varint(len(value)) + value
            value = b"\x32" + _varint(len(kvl)) + kvl  # AnyValue.kvlist_value
        data = _log(attributes=[kv]) + b"\x2a" + _varint(len(value)) + value  # the attribute first, then deep in the body
        walked.append(check(LogRecord, data) is not None)
    assert walked == [True, True, False, False, False, False]  # the innermost string at depth 59, 62, 65...: the walk stops at 64


def test_an_empty_request_and_empty_elements():
    assert check(ExportLogsServiceRequest, b"", must_walk=True) == b"{}"
    req = ExportLogsServiceRequest(resource_logs=[{}, {"scope_logs": [{"log_records": [{}]}]}])
    assert check(ExportLogsServiceRequest, req.SerializeToString(), must_walk=True) == (
        b'{"resourceLogs":[{},{"scopeLogs":[{"logRecords":[{}]}]}]}'
    )


# ----------------------------------------------------------------------------- the OTLP/JSON details, one by one


def _log(**fields) -> bytes:
    return LogRecord(**fields).SerializeToString()


def test_doubles_as_python_repr():
    for v in DOUBLE_EDGES + [-math.nan, 123456789012345678.0, 1.5e300, 2.5e-310, 100.0, 1e15, 0.5]:
        data = _log(body=AnyValue(double_value=v))
        assert check(LogRecord, data, must_walk=True)
    # a NaN with payload bits and a negative NaN: "NaN"
    for bits in (0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001):
        data = b"\x2a\x09\x21" + struct.pack("<Q", bits)  # body: AnyValue double_value
        assert check(LogRecord, data, must_walk=True) == b'{"body":{"doubleValue":"NaN"}}'


def test_zero_doubles_and_optional_ones():
    """An implicit double is left out when its bits are zero (-0.0 is written); proto3 optional ones are written."""
    assert check(HistogramDataPoint, HistogramDataPoint(sum=0.0, min=-0.0).SerializeToString(), must_walk=True) == b'{"sum":0.0,"min":-0.0}'
    from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

    assert check(NumberDataPoint, b"\x21" + struct.pack("<d", -0.0), must_walk=True) == b'{"asDouble":-0.0}'
    from opentelemetry.proto.metrics.v1.metrics_pb2 import ExponentialHistogramDataPoint

    data = b"\x71" + struct.pack("<d", 0.0) + b"\x71" + struct.pack("<d", -0.0)  # zero_threshold (14) twice
    assert check(ExponentialHistogramDataPoint, data) == b'{"zeroThreshold":-0.0}'
    data = b"\x71" + struct.pack("<d", -0.0) + b"\x71" + struct.pack("<d", 0.0)  # the last counts: left out
    assert check(ExponentialHistogramDataPoint, data) == b"{}"


def test_strings_escaped_as_the_json_module_does():
    every_control = "".join(chr(c) for c in range(0x20))
    for s in [every_control, '"\\/', "\x7f\u2028\u2029", "é€😀\U0010ffff", "", "a" * 1000, "\ufeff"]:
        check(LogRecord, _log(severity_text=s, body=AnyValue(string_value=s)), must_walk=True)


def test_strings_with_a_byte_to_escape_at_every_position():
    """The walk copies 16 and 8 bytes at a time up to the first byte to escape: every position of one, in strings
    followed by more bytes and in strings that end the request (where it copies one byte at a time)."""
    for length in range(1, 40):
        for at in range(length):
            for special in ('"', "\\", "\n", "\x01", "\x1f", " ", "\x7f", "\u00e9", "\U0001f600"):
                s = "a" * at + special + "b" * (length - at - 1)
                check(LogRecord, _log(severity_text=s), must_walk=True)  # the last bytes of the request
                check(LogRecord, _log(severity_text=s, event_name="x" * 20), must_walk=True)


def test_invalid_utf8_gives_up_and_protobuf_decides():
    for bad in (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"a\x80", b"\xf8\x88\x80\x80\x80"):
        data = b"\x1a" + bytes([len(bad)]) + bad  # severity_text
        assert walker(LogRecord).encode(data) is None
        assert outcome(otlpjson.encode_serialized, LogRecord, data) == reference(LogRecord, data)
        assert isinstance(reference(LogRecord, data), tuple)  # protobuf refuses it
        # also where a later value replaces it, and in an attribute's key
        assert walker(LogRecord).encode(data + b"\x1a\x01a") is None
        kv = b"\x0a" + bytes([len(bad)]) + bad
        check(LogRecord, b"\x32" + bytes([len(kv)]) + kv)
    # in bytes fields the same bytes are fine
    assert check(LogRecord, _log(body=AnyValue(bytes_value=b"\xff\xc0\x80")), must_walk=True) == b'{"body":{"bytesValue":"/8CA"}}'


def test_integers():
    data = _log(time_unix_nano=2**64 - 1, severity_number=-5, flags=2**32 - 1, dropped_attributes_count=2**32 - 1,
                body=AnyValue(int_value=-(2**63)))
    assert check(LogRecord, data, must_walk=True) == (
        b'{"timeUnixNano":"18446744073709551615","severityNumber":-5,"body":{"intValue":"-9223372036854775808"},'
        b'"droppedAttributesCount":4294967295,"flags":4294967295}'
    )
    # an int32 varint beyond 32 bits is cut to them (2**32 is 0: left out), an enum beyond its names is kept
    assert check(LogRecord, b"\x10" + _varint(2**32), must_walk=True) == b"{}"
    assert check(LogRecord, b"\x10" + _varint(2**32 + 1000), must_walk=True) == b'{"severityNumber":1000}'
    # a varint beyond 64 bits and one of 11 bytes: given up
    for v in (b"\xff" * 9 + b"\x02", b"\x80" * 10 + b"\x00"):
        check(LogRecord, b"\x10" + v)
        assert walker(LogRecord).encode(b"\x10" + v) is None


def test_ids_in_hex_and_bytes_in_base64():
    data = _log(trace_id=bytes(range(16)), span_id=b"\xff" * 8, body=AnyValue(bytes_value=b"\x00\x01"))
    assert check(LogRecord, data, must_walk=True) == (
        b'{"body":{"bytesValue":"AAE="},"traceId":"000102030405060708090a0b0c0d0e0f","spanId":"ffffffffffffffff"}'
    )
    assert check(LogRecord, _log(trace_id=b"\xab\xcd"), must_walk=True) == b'{"traceId":"abcd"}'  # any length, as encode


def test_bools():
    assert check(AnyValue, AnyValue(bool_value=False).SerializeToString(), must_walk=True) == b'{"boolValue":false}'
    assert walker(AnyValue).encode(b"\x10\x02") is None  # protobuf reads 2 as true: the Python path writes it
    assert check(AnyValue, b"\x10\x02") is None
    assert otlpjson.encode_serialized(AnyValue, b"\x10\x02") == b'{"boolValue":true}'


def test_key_values():
    kvs = [KeyValue(key="", value=AnyValue(string_value="x")), KeyValue(key="k"), KeyValue(key="e", value=AnyValue())]
    assert check(LogRecord, _log(attributes=kvs), must_walk=True) == (
        b'{"attributes":[{"key":"","value":{"stringValue":"x"}},{"key":"k"},{"key":"e","value":{}}]}'
    )
    # value before key, the key twice (the last counts), an unknown field inside; the value twice is merged: given up
    kv = b"\x12\x02\x18\x07" + b"\x0a\x01a" + b"\x0a\x01b" + b"\x20\x01"
    assert check(LogRecord, b"\x32" + bytes([len(kv)]) + kv, must_walk=True) == b'{"attributes":[{"key":"b","value":{"intValue":"7"}}]}'
    kv = b"\x12\x02\x18\x07\x12\x02\x18\x08"
    assert walker(LogRecord).encode(b"\x32" + bytes([len(kv)]) + kv) is None
    check(LogRecord, b"\x32" + bytes([len(kv)]) + kv)


def test_fields_out_of_order_repeated_and_oneofs():
    parts = [_log(observed_time_unix_nano=5), _log(severity_text="INFO", body=AnyValue(string_value="a")),
             _log(severity_text="WARN", time_unix_nano=7), b"\xf8\x01\x05", _log(attributes=[KeyValue(key="a")]),
             _log(flags=3), _log(attributes=[KeyValue(key="b")])]
    assert check(LogRecord, b"".join(parts), must_walk=True) == (
        b'{"timeUnixNano":"7","severityText":"WARN","body":{"stringValue":"a"},"attributes":[{"key":"a"},{"key":"b"}],'
        b'"flags":3,"observedTimeUnixNano":"5"}'
    )
    # the body twice: protobuf merges the two messages; the Python path writes it
    assert check(LogRecord, b"".join(parts) + _log(body=AnyValue(int_value=3))) is None
    # one oneof member twice (the last counts) and two members (the last counts, given up)
    assert check(AnyValue, b"\x18\x01\x18\x02", must_walk=True) == b'{"intValue":"2"}'
    assert check(AnyValue, b"\x18\x01\x0a\x01x") is None


def test_packed_and_unpacked_mixed_and_empty():
    data = HistogramDataPoint(bucket_counts=[1, 2], explicit_bounds=[0.5]).SerializeToString()  # packed
    unpacked = b"\x31" + struct.pack("<Q", 3) + b"\x31" + struct.pack("<Q", 4)  # bucket_counts (6) one by one
    assert check(HistogramDataPoint, data + unpacked + b"\x32\x00", must_walk=True) == (
        b'{"bucketCounts":["1","2","3","4"],"explicitBounds":[0.5]}'
    )
    assert check(HistogramDataPoint, b"\x32\x00\x3a\x00", must_walk=True) == b"{}"  # empty packed runs: no field
    assert walker(HistogramDataPoint).encode(b"\x32\x03\x00\x00\x00") is None  # not whole elements


def test_unknown_fields_groups_and_bad_wire_types():
    assert check(LogRecord, b"\xa0\x06\x01" + b"\xa9\x06" + b"\x00" * 8 + b"\xad\x06\x00\x00\x00\x00" + b"\xa2\x06\x01z", must_walk=True) == b"{}"
    for data in (b"\xa3\x06\xa4\x06", b"\xa4\x06", b"\xa6\x06", b"\xa7\x06", b"\x00", b"\x01" + b"\x00" * 8,
                 b"\x08\x01", b"\x88\x80\x80\x80\x80\x00\x01"):
        # a group, an end-group, wire types 6 and 7, field number 0, time_unix_nano (fixed64) as a varint, a 6-byte tag
        assert walker(LogRecord).encode(data) is None
        check(LogRecord, data)


def test_nesting_deeper_than_the_walk_goes():
    value = AnyValue(string_value="leaf").SerializeToString()
    for _ in range(40):  # 80 levels as bytes (the constructor would refuse them): protobuf reads them, the walks stop at 64
        array = b"\x0a" + _varint(len(value)) + value
        value = b"\x2a" + _varint(len(array)) + array
    data = b"\x2a" + _varint(len(value)) + value
    assert walker(LogRecord).encode(data) is None
    check(LogRecord, data)
    value = AnyValue(string_value="leaf")
    for _ in range(20):
        value = AnyValue(array_value=ArrayValue(values=[value]))
    assert check(LogRecord, _log(body=value), must_walk=True)


def test_the_switch_and_a_missing_module_leave_the_python_walk():
    """TAPIO_OTLPJSON_COMPILED=0 turns the compiled walk off; the output is the same."""
    code = ("from tapio import otlpjson; from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as L;"
            "print(otlpjson.COMPILED is None, otlpjson.COMPILED_UNUSED_REASON);"
            "print(otlpjson.encode_serialized(L, L(severity_text='x').SerializeToString()).decode())")
    env = {**os.environ, otlpjson.COMPILED_ENV: "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["True switched off (TAPIO_OTLPJSON_COMPILED=0)", '{"severityText":"x"}']


def test_the_compiled_walk_is_used_when_built():
    walker(ExportLogsServiceRequest)
    assert otlpjson._WALKERS[ExportLogsServiceRequest] is not None
    assert otlpjson.COMPILED.KINDS == otlpjson._X_NAMES


def test_tables_that_do_not_fit_are_refused():
    w = walker(LogRecord)
    Walker = type(w)
    good = (1, b'"a":', 15, 2, False, True, -1, -1)
    assert Walker([[good]]).encode(b"\x0a\x01x") == b'{"a":"x"}'
    for bad in [(1, b'"a":', 99, 2, False, True, -1, -1), (1, b'"a":', 15, 0, False, True, -1, -1),
                (0, b'"a":', 15, 2, False, True, -1, -1), (1, b'"a":', 0, 2, False, False, -1, 5),
                (1, b'"a":', 1, 2, False, False, -1, 0), (1, b'"a":', 15, 2, False, True, 64, -1)]:
        with pytest.raises(ValueError):
            Walker([[bad]])
    with pytest.raises(ValueError):
        Walker([[good, good]])
    with pytest.raises(ValueError):
        Walker([])
    with pytest.raises(TypeError):
        Walker([[(1, "not bytes", 15, 2, False, True, -1, -1)]])
