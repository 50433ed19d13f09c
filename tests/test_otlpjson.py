"""tapio.otlpjson: round trips of random requests, the OTLP spec's examples, and fuzzing."""

from __future__ import annotations

import base64
import json
import math
import pathlib
import time

import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tapio import otlpjson
from tapio.otlpjson import OtlpJsonError, decode, encode
from tapio.pdata import Signal

DATA = pathlib.Path(__file__).parent / "data" / "otlp"

# ----------------------------------------------------------------------------- strategies
# Requests are built as constructor keyword dicts (field names as in the .proto).

u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
# JSON has one "NaN": NaN payload bits cannot survive a round trip, so NaNs here are canonical
doubles = st.floats(allow_nan=True, allow_infinity=True).map(lambda f: math.nan if f != f else f)
text = st.text(max_size=12)
trace_ids = st.one_of(st.just(b""), st.binary(min_size=16, max_size=16))
span_ids = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8))


def _opt(**fields):
    """A dict strategy where every field may be missing (proto3: not set)."""
    return st.fixed_dictionaries({}, optional=fields)


any_values = st.recursive(
    st.one_of(
        st.just({}),
        st.builds(lambda v: {"string_value": v}, text),
        st.builds(lambda v: {"bool_value": v}, st.booleans()),
        st.builds(lambda v: {"int_value": v}, i64),
        st.builds(lambda v: {"double_value": v}, doubles),
        st.builds(lambda v: {"bytes_value": v}, st.binary(max_size=10)),
    ),
    lambda inner: st.one_of(
        st.builds(lambda vs: {"array_value": {"values": vs}}, st.lists(inner, max_size=3)),
        st.builds(
            lambda kvs: {"kvlist_value": {"values": kvs}},
            st.lists(st.builds(lambda k, v: {"key": k, "value": v}, text, inner), max_size=3),
        ),
    ),
    max_leaves=8,
)
key_values = st.lists(
    st.one_of(
        st.builds(lambda k, v: {"key": k, "value": v}, text, any_values),
        st.builds(lambda k: {"key": k}, text),  # value not set
    ),
    max_size=4,
)
resources = _opt(attributes=key_values, dropped_attributes_count=u32)
scopes = _opt(name=text, version=text, attributes=key_values, dropped_attributes_count=u32)

log_records = _opt(
    time_unix_nano=u64,
    observed_time_unix_nano=u64,
    severity_number=st.integers(0, 24),
    severity_text=text,
    body=any_values,
    attributes=key_values,
    dropped_attributes_count=u32,
    flags=u32,
    trace_id=trace_ids,
    span_id=span_ids,
    event_name=text,
)
logs_requests = st.builds(
    lambda rls: ExportLogsServiceRequest(resource_logs=rls),
    st.lists(
        _opt(
            resource=resources,
            schema_url=text,
            scope_logs=st.lists(_opt(scope=scopes, schema_url=text, log_records=st.lists(log_records, max_size=3)), max_size=2),
        ),
        max_size=2,
    ),
)

events = _opt(time_unix_nano=u64, name=text, attributes=key_values, dropped_attributes_count=u32)
links = _opt(trace_id=trace_ids, span_id=span_ids, trace_state=text, attributes=key_values, dropped_attributes_count=u32, flags=u32)
spans = _opt(
    trace_id=trace_ids,
    span_id=span_ids,
    trace_state=text,
    parent_span_id=span_ids,
    flags=u32,
    name=text,
    kind=st.integers(0, 5),
    start_time_unix_nano=u64,
    end_time_unix_nano=u64,
    attributes=key_values,
    dropped_attributes_count=u32,
    events=st.lists(events, max_size=2),
    dropped_events_count=u32,
    links=st.lists(links, max_size=2),
    dropped_links_count=u32,
    status=_opt(message=text, code=st.integers(0, 2)),
)
traces_requests = st.builds(
    lambda rss: ExportTraceServiceRequest(resource_spans=rss),
    st.lists(
        _opt(
            resource=resources,
            schema_url=text,
            scope_spans=st.lists(_opt(scope=scopes, schema_url=text, spans=st.lists(spans, max_size=3)), max_size=2),
        ),
        max_size=2,
    ),
)

exemplars = st.builds(
    lambda base, value: {**base, **value},
    _opt(filtered_attributes=key_values, time_unix_nano=u64, span_id=span_ids, trace_id=trace_ids),
    st.one_of(st.just({}), st.builds(lambda v: {"as_double": v}, doubles), st.builds(lambda v: {"as_int": v}, i64)),
)
_point_common = dict(attributes=key_values, start_time_unix_nano=u64, time_unix_nano=u64, flags=u32)
number_points = st.builds(
    lambda base, value: {**base, **value},
    _opt(**_point_common, exemplars=st.lists(exemplars, max_size=2)),
    st.one_of(st.just({}), st.builds(lambda v: {"as_double": v}, doubles), st.builds(lambda v: {"as_int": v}, i64)),
)
histogram_points = _opt(
    **_point_common,
    count=u64,
    sum=doubles,
    bucket_counts=st.lists(u64, max_size=4),
    explicit_bounds=st.lists(doubles, max_size=3),
    exemplars=st.lists(exemplars, max_size=2),
    min=doubles,
    max=doubles,
)
buckets = _opt(offset=i32, bucket_counts=st.lists(u64, max_size=4))
exp_histogram_points = _opt(
    **_point_common,
    count=u64,
    sum=doubles,
    scale=st.integers(-10, 20),
    zero_count=u64,
    positive=buckets,
    negative=buckets,
    exemplars=st.lists(exemplars, max_size=2),
    min=doubles,
    max=doubles,
    zero_threshold=doubles,
)
summary_points = _opt(
    **_point_common,
    count=u64,
    sum=doubles,
    quantile_values=st.lists(_opt(quantile=doubles, value=doubles), max_size=3),
)
temporality = st.integers(0, 2)
metric_data = st.one_of(
    st.just({}),
    st.builds(lambda p: {"gauge": {"data_points": p}}, st.lists(number_points, max_size=3)),
    st.builds(
        lambda p, t, m: {"sum": {"data_points": p, "aggregation_temporality": t, "is_monotonic": m}},
        st.lists(number_points, max_size=3),
        temporality,
        st.booleans(),
    ),
    st.builds(
        lambda p, t: {"histogram": {"data_points": p, "aggregation_temporality": t}},
        st.lists(histogram_points, max_size=3),
        temporality,
    ),
    st.builds(
        lambda p, t: {"exponential_histogram": {"data_points": p, "aggregation_temporality": t}},
        st.lists(exp_histogram_points, max_size=3),
        temporality,
    ),
    st.builds(lambda p: {"summary": {"data_points": p}}, st.lists(summary_points, max_size=3)),
)
metrics = st.builds(lambda base, data: {**base, **data}, _opt(name=text, description=text, unit=text, metadata=key_values), metric_data)
metrics_requests = st.builds(
    lambda rms: ExportMetricsServiceRequest(resource_metrics=rms),
    st.lists(
        _opt(
            resource=resources,
            schema_url=text,
            scope_metrics=st.lists(_opt(scope=scopes, schema_url=text, metrics=st.lists(metrics, max_size=3)), max_size=2),
        ),
        max_size=2,
    ),
)

requests = st.one_of(logs_requests, traces_requests, metrics_requests)


# ----------------------------------------------------------------------------- round trips


@given(requests)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_random_requests(request):
    data = encode(request)
    assert isinstance(data, bytes)
    decoded = decode(type(request), data)
    assert decoded == request
    # the same bytes as a str decode the same
    assert decode(type(request), data.decode("utf-8")) == request


@given(requests)
@settings(max_examples=100, deadline=None)
def test_encoding_is_otlp_json(request):
    """What the OTLP spec changes from protobuf's JSON mapping: hex ids, integer enums, int64 as strings."""
    doc = json.loads(encode(request))
    reference = json_format.MessageToDict(request)  # protobuf's own mapping: base64 ids, enum names
    _compare_with_protobuf_mapping(doc, reference, request.DESCRIPTOR)


def _compare_with_protobuf_mapping(ours, theirs, desc):
    if desc.name == "KeyValue" and ours.get("key") == "" and "key" not in theirs:
        ours = {k: v for k, v in ours.items() if k != "key"}  # we always write an attribute's key
    assert isinstance(ours, dict) and set(ours) == set(theirs), (ours, theirs)
    for key, value in ours.items():
        fd = next(f for f in desc.fields if f.json_name == key)
        expected = theirs[key]
        values, expecteds = (value, expected) if fd.is_repeated else ([value], [expected])
        assert len(values) == len(expecteds)
        for v, e in zip(values, expecteds):
            if fd.message_type is not None:
                _compare_with_protobuf_mapping(v, e, fd.message_type)
            elif fd.name in ("trace_id", "span_id", "parent_span_id"):
                assert v == base64.b64decode(e).hex()
            elif fd.enum_type is not None:
                assert v == fd.enum_type.values_by_name[e].number if isinstance(e, str) else v == e
            elif fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT) and isinstance(e, float) and math.isnan(e):
                assert v == "NaN"
            else:
                assert v == e


def test_encoding_details():
    request = ExportTraceServiceRequest(
        resource_spans=[
            {
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": bytes.fromhex("5b8efff798038103d269b633813fc60c"),
                                "span_id": bytes.fromhex("eee19b7ec3c1b174"),
                                "kind": 2,
                                "start_time_unix_nano": 1544712660000000000,
                                "attributes": [
                                    {"key": "s", "value": {"string_value": "é\"\n"}},
                                    {"key": "i", "value": {"int_value": -7}},
                                    {"key": "d", "value": {"double_value": math.inf}},
                                    {"key": "b", "value": {"bytes_value": b"\xff\x00"}},
                                    {"key": "none"},
                                ],
                                "status": {"code": 2},
                            }
                        ]
                    }
                ]
            }
        ]
    )
    data = encode(request)
    assert b" " not in data.replace(b"\xc3\xa9", b"")  # compact
    assert "é".encode() in data  # UTF-8, not \u escapes
    span = json.loads(data)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "5b8efff798038103d269b633813fc60c"
    assert span["spanId"] == "eee19b7ec3c1b174"
    assert span["kind"] == 2
    assert span["startTimeUnixNano"] == "1544712660000000000"
    assert span["attributes"] == [
        {"key": "s", "value": {"stringValue": 'é"\n'}},
        {"key": "i", "value": {"intValue": "-7"}},
        {"key": "d", "value": {"doubleValue": "Infinity"}},
        {"key": "b", "value": {"bytesValue": "/wA="}},
        {"key": "none"},
    ]
    assert span["status"] == {"code": 2}
    assert encode(ExportLogsServiceRequest()) == b"{}"


# ----------------------------------------------------------------------------- the OTLP spec's examples


def _protobuf_mapping_of_example(name):
    """The spec example turned into protobuf's own JSON mapping (base64 ids), parsed by protobuf itself."""

    def convert(node):
        if isinstance(node, dict):
            return {
                k: base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId", "parentSpanId") else convert(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node

    return convert(json.loads((DATA / name).read_text()))


@pytest.mark.parametrize(
    ("name", "signal"),
    [("logs.json", Signal.LOGS), ("trace.json", Signal.TRACES), ("metrics.json", Signal.METRICS)],
)
def test_spec_examples_decode_as_protobuf_reads_them(name, signal):
    ours = decode(signal, (DATA / name).read_bytes())
    expected = json_format.ParseDict(_protobuf_mapping_of_example(name), signal.request_class())
    assert ours == expected
    assert ours.ByteSize() > 100
    assert decode(signal, encode(ours)) == ours


def test_spec_example_values():
    logs = decode(Signal.LOGS, (DATA / "logs.json").read_bytes())
    record = logs.resource_logs[0].scope_logs[0].log_records[0]
    assert record.trace_id == bytes.fromhex("5b8efff798038103d269b633813fc60c")  # upper-case hex accepted
    assert record.span_id == bytes.fromhex("eee19b7ec3c1b174")
    assert record.time_unix_nano == 1544712660300000000  # a 64-bit int written as a number
    attrs = {kv.key: kv.value for kv in record.attributes}
    assert attrs["int.attribute"].int_value == 10
    assert attrs["double.attribute"].double_value == 637.704
    assert [v.string_value for v in attrs["array.attribute"].array_value.values] == ["many", "values"]
    assert attrs["map.attribute"].kvlist_value.values[0].key == "some.map.key"

    traces = decode(Signal.TRACES, (DATA / "trace.json").read_bytes())
    span = traces.resource_spans[0].scope_spans[0].spans[0]
    assert span.kind == 2 and span.parent_span_id == bytes.fromhex("eee19b7ec3c1b173")

    metrics = decode(Signal.METRICS, (DATA / "metrics.json").read_bytes())
    hist = metrics.resource_metrics[0].scope_metrics[0].metrics[2].histogram.data_points[0]
    assert list(hist.bucket_counts) == [1, 1] and hist.HasField("min") and hist.min == 0


def test_spec_events_example_is_rejected_with_its_path():
    # events.json in opentelemetry-proto writes kvlistValue as an array (not a KeyValueList)
    with pytest.raises(OtlpJsonError) as info:
        decode(Signal.LOGS, (DATA / "events.json").read_bytes())
    assert info.value.path == "resourceLogs[0].scopeLogs[0].logRecords[0].body.kvlistValue"
    assert "expected an object" in info.value.reason


# ----------------------------------------------------------------------------- what decode accepts


def _log_doc(record: dict | str) -> str:
    """A logs request around one record (a dict, or its JSON text for what json.dumps cannot write)."""
    text = record if isinstance(record, str) else json.dumps(record)
    return '{"resourceLogs": [{"scopeLogs": [{"logRecords": [%s]}]}]}' % text


def _one_record(record: dict):
    return decode(Signal.LOGS, _log_doc(record)).resource_logs[0].scope_logs[0].log_records[0]


def test_decode_tolerates_what_the_spec_allows():
    r = _one_record(
        {
            "timeUnixNano": 1544712660300000000,  # number
            "observedTimeUnixNano": "1544712660300000001",  # string
            "severityNumber": "SEVERITY_NUMBER_WARN",  # enum name (not written by us)
            "traceId": "ABCDEF0123456789abcdef0123456789",  # mixed-case hex
            "spanId": "",
            "unknownField": {"nested": [1, 2, 3]},  # ignored
            "dropped_attributes_count": 5,  # original field names are not OTLP/JSON keys: ignored
            "body": {"bytesValue": "_-8"},  # URL-safe base64 without padding
            "flags": None,  # null = not set
            "eventName": "x",
        }
    )
    assert r.time_unix_nano == 1544712660300000000
    assert r.observed_time_unix_nano == 1544712660300000001
    assert r.severity_number == 13
    assert r.trace_id == bytes.fromhex("abcdef0123456789abcdef0123456789")
    assert r.dropped_attributes_count == 0
    assert r.body.bytes_value == b"\xff\xef"
    assert r.flags == 0 and r.event_name == "x"
    assert _one_record({"attributes": [{"key": "d", "value": {"doubleValue": "NaN"}}]}).attributes[0].value.double_value != 0
    assert _one_record({"attributes": [{"key": "d", "value": {"doubleValue": "-Infinity"}}]}).attributes[0].value.double_value == -math.inf
    assert _one_record({"attributes": [{"key": "i", "value": {"intValue": 1e3}}]}).attributes[0].value.int_value == 1000
    assert _one_record({"severityNumber": 99}).severity_number == 99  # open enum: unknown numbers are kept


@pytest.mark.parametrize(
    ("record", "path", "reason"),
    [
        ({"traceId": "5b8efff798038103d269b633813fc6"}, "traceId", "32 hex digits"),
        ({"spanId": "eee19b7ec3c1b17g"}, "spanId", "16 hex digits"),
        ({"spanId": "eee1 9b7ec3c1b17"}, "spanId", "16 hex digits"),
        ({"timeUnixNano": "12a"}, "timeUnixNano", "unsigned 64-bit"),
        ({"timeUnixNano": -1}, "timeUnixNano", "out of range"),
        ({"timeUnixNano": 2**64}, "timeUnixNano", "out of range"),
        ({"timeUnixNano": 1.5}, "timeUnixNano", "unsigned 64-bit"),
        ({"timeUnixNano": True}, "timeUnixNano", "unsigned 64-bit"),
        ({"flags": "4294967296"}, "flags", "out of range"),
        ({"severityNumber": "LOUD"}, "severityNumber", "enum"),
        ({"severityText": 3}, "severityText", "expected a string"),
        ({"body": "text"}, "body", "expected an object"),
        ({"body": {"boolValue": "true"}}, "body.boolValue", "true or false"),
        ({"body": {"doubleValue": "fast"}}, "body.doubleValue", "a double"),
        ('{"body": {"doubleValue": 1e400}}', "body.doubleValue", "out of range"),
        ({"body": {"bytesValue": "!!"}}, "body.bytesValue", "base64"),
        ({"body": {"arrayValue": {"values": [{}, None]}}}, "body.arrayValue.values[1]", "null"),
        ({"body": {"stringValue": "a", "boolValue": True}}, "body", "only one of them"),
        ({"attributes": {"key": "a"}}, "attributes", "expected an array"),
        ({"attributes": [{"key": "a", "value": {"intValue": "1.5"}}]}, "attributes[0].value.intValue", "64-bit"),
        ({"attributes": [{"key": 1}]}, "attributes[0].key", "expected a string"),
    ],
)
def test_decode_errors_say_where_and_what(record, path, reason):
    with pytest.raises(OtlpJsonError) as info:
        decode(Signal.LOGS, _log_doc(record))
    assert info.value.path == "resourceLogs[0].scopeLogs[0].logRecords[0]." + path
    assert reason in info.value.reason
    assert str(info.value).startswith(info.value.path + ": ")


@pytest.mark.parametrize(
    "data",
    [b"", b"   ", b"[]", b"null", b"3", b'"x"', b"{", b'{"resourceLogs": []} x', b"\xff\xfe\xfd", b'{"a": NaN}', b'{"a": -Infinity}', b"[" * 100_000],
)
def test_decode_rejects_documents_that_are_not_an_object(data):
    with pytest.raises(OtlpJsonError):
        decode(Signal.LOGS, data)


def test_decode_refuses_deep_nesting():
    def nested(n):  # n AnyValues: 2n - 1 messages
        doc = '{"stringValue":"x"}'
        for _ in range(n - 1):
            doc = '{"arrayValue":{"values":[' + doc + "]}}"
        return doc

    value = decode(AnyValue, nested(50))
    assert AnyValue.FromString(value.SerializeToString()) == value  # protobuf can parse what we accept
    with pytest.raises(OtlpJsonError, match="nested more than 100 deep"):
        decode(AnyValue, nested(51))
    with pytest.raises(OtlpJsonError):
        decode(AnyValue, nested(5000))


def test_decode_rejects_lone_surrogates():
    with pytest.raises(OtlpJsonError, match="lone surrogate"):
        decode(Signal.LOGS, _log_doc({"severityText": "\ud800"}))
    with pytest.raises(OtlpJsonError, match="lone surrogate"):
        decode(Signal.LOGS, _log_doc({"attributes": [{"key": "\udfff", "value": {"stringValue": "x"}}]}))


def test_every_truncation_fails_cleanly():
    data = (DATA / "logs.json").read_bytes()
    compact = encode(decode(Signal.LOGS, data))
    for doc in (data, compact):
        for end in range(len(doc) - 1):
            if doc[:end].strip() and doc[end - 1 : end] != b"}":
                with pytest.raises(OtlpJsonError):
                    decode(Signal.LOGS, doc[:end])


# ----------------------------------------------------------------------------- fuzzing

def _walk_fields(desc, seen):
    if desc.full_name in seen:
        return
    seen.add(desc.full_name)
    for f in desc.fields:
        yield f
        if f.message_type is not None:
            yield from _walk_fields(f.message_type, seen)


_OTLP_KEYS = sorted(
    {
        f.json_name
        for cls in (ExportLogsServiceRequest, ExportTraceServiceRequest, ExportMetricsServiceRequest)
        for f in _walk_fields(cls.DESCRIPTOR, set())
    }
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["NaN", "Infinity", "-1", "1e3", "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "/wA=", ""]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_OTLP_KEYS), st.text(max_size=4)), inner, max_size=5),
    ),
    max_leaves=30,
)


def _decode_or_error(cls, data):
    try:
        message = decode(cls, data)
    except OtlpJsonError as e:
        assert str(e)
        return None
    # whatever is accepted is a real message that survives our own round trip
    assert decode(cls, encode(message)) == message
    return message


@given(st.sampled_from(list(Signal)), json_values)
@settings(max_examples=500, deadline=None)
def test_fuzz_arbitrary_json(signal, value):
    _decode_or_error(signal, json.dumps(value))


@given(st.sampled_from(list(Signal)), json_values)
@settings(max_examples=300, deadline=None)
def test_fuzz_arbitrary_json_under_the_request_keys(signal, value):
    top = {"logs": "resourceLogs", "traces": "resourceSpans", "metrics": "resourceMetrics"}[signal.value]
    inner = {"logs": "scopeLogs", "traces": "scopeSpans", "metrics": "scopeMetrics"}[signal.value]
    _decode_or_error(signal, json.dumps({top: [{"resource": value, inner: [value, {"scope": value}]}, value]}))


@given(st.sampled_from(list(Signal)), st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_fuzz_arbitrary_bytes(signal, data):
    _decode_or_error(signal, data)


@given(requests, st.data())
@settings(max_examples=300, deadline=None)
def test_fuzz_mutated_valid_documents(request, data):
    """Replace one node of a valid document with an arbitrary JSON value."""
    doc = json.loads(encode(request))
    nodes = []

    def collect(node):
        if isinstance(node, dict):
            for k, v in node.items():
                nodes.append((node, k))
                collect(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                nodes.append((node, i))
                collect(v)

    collect(doc)
    if nodes:
        parent, key = data.draw(st.sampled_from(nodes))
        parent[key] = data.draw(json_values)
    _decode_or_error(type(request), json.dumps(doc))


@given(st.text(max_size=50))
@settings(max_examples=200, deadline=None)
def test_fuzz_arbitrary_text(text_doc):
    _decode_or_error(ExportLogsServiceRequest, text_doc)


# ----------------------------------------------------------------------------- speed


def _log_request(n: int) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    rl.resource.attributes.add(key="service.name").value.string_value = "tapio"
    sl = rl.scope_logs.add()
    for i in range(n):
        r = sl.log_records.add(
            time_unix_nano=1_700_000_000_000_000_000 + i,
            observed_time_unix_nano=1_700_000_000_000_000_001 + i,
            severity_number=9,
            severity_text="INFO",
            trace_id=bytes(range(16)),
            span_id=bytes(range(8)),
        )
        r.body.string_value = f"connection from 10.0.0.{i % 255} accepted"
        for j in range(10):
            v = r.attributes.add(key=f"attr.{j}").value
            if j % 3 == 0:
                v.string_value = f"value-{j}-{i}"
            elif j % 3 == 1:
                v.int_value = i * j
            else:
                v.bool_value = True
    return request


def _best_us_per_record(fn, records, rounds):
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / records * 1e6


def test_encode_speed():
    """Log records with 10 attributes: ours against protobuf's json_format on the same machine."""
    request = _log_request(200)
    ours = _best_us_per_record(lambda: encode(request), 200, 30)
    theirs = _best_us_per_record(lambda: json_format.MessageToJson(request), 200, 3)
    print(f"\nencode: {ours:.1f} µs/record, json_format: {theirs:.1f} µs/record")
    assert ours * 4 < theirs
    data = encode(request)
    ours = _best_us_per_record(lambda: decode(ExportLogsServiceRequest, data), 200, 10)
    theirs = _best_us_per_record(lambda: json_format.Parse(data, ExportLogsServiceRequest()), 200, 3)
    print(f"decode: {ours:.1f} µs/record, json_format: {theirs:.1f} µs/record")
    assert ours * 2 < theirs


def test_module_exports():
    assert otlpjson.__all__ == ["OtlpJsonError", "encode", "encode_many", "encode_serialized", "decode"]
    assert issubclass(OtlpJsonError, ValueError)
    error = OtlpJsonError("expected a string", "a[0].b")
    assert (error.path, error.reason, str(error)) == ("a[0].b", "expected a string", "a[0].b: expected a string")


@given(st.lists(logs_requests, min_size=1, max_size=4))
@settings(max_examples=100, deadline=None)
def test_encode_many_is_the_merged_request(reqs):
    merged = ExportLogsServiceRequest()
    for r in reqs:
        merged.MergeFrom(r)
    assert otlpjson.encode_many(reqs) == encode(merged)
    assert decode(Signal.LOGS, otlpjson.encode_many(reqs)) == merged


# ----------------------------------------------------------------------------- long documents, decoded in pieces


@given(requests)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encode_serialized_is_encode_of_the_parsed_bytes(request):
    assert otlpjson.encode_serialized(type(request), request.SerializeToString()) == encode(request)


@given(st.lists(logs_requests, min_size=1, max_size=4))
@settings(max_examples=100, deadline=None)
def test_encode_serialized_of_joined_requests_is_encode_many(reqs):
    joined = b"".join(r.SerializeToString() for r in reqs)
    assert otlpjson.encode_serialized(ExportLogsServiceRequest, joined) == otlpjson.encode_many(reqs)


def _encoded_or_error(cls, data):
    try:
        return encode(cls.FromString(data))
    except DecodeError:
        return "DecodeError"


@given(requests, st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encode_serialized_of_mutated_bytes_is_encode_of_what_protobuf_parses(request, data):
    """Bytes the walk does not take as protobuf writes them (fields out of order, repeated, packed, broken) give
    what parsing them gives: the same JSON, or protobuf's DecodeError."""
    raw = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        if raw and data.draw(st.booleans()):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        else:  # a chunk moved or repeated elsewhere: fields out of order, singular fields twice
            a = data.draw(st.integers(0, len(raw)))
            b = data.draw(st.integers(a, len(raw)))
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = raw[a:b]
    raw = bytes(raw)
    cls = type(request)
    try:
        ours = otlpjson.encode_serialized(cls, raw)
    except DecodeError:
        ours = "DecodeError"
    assert ours == _encoded_or_error(cls, raw)


def test_encode_serialized_reads_what_protobuf_writes_other_ways():
    """Fields out of order, a singular field twice (the last counts), a message field twice (merged), an unknown field."""
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

    parts = [
        LogRecord(observed_time_unix_nano=5).SerializeToString(),
        LogRecord(severity_text="INFO", body=AnyValue(string_value="a")).SerializeToString(),
        LogRecord(severity_text="WARN", time_unix_nano=7).SerializeToString(),
        b"\xf8\x01\x05",  # field 31, a varint: unknown
        LogRecord(body=AnyValue(int_value=3)).SerializeToString(),
    ]
    raw = b"".join(parts)
    assert otlpjson.encode_serialized(LogRecord, raw) == encode(LogRecord.FromString(raw))
    assert json.loads(otlpjson.encode_serialized(LogRecord, raw)) == {
        "timeUnixNano": "7", "severityText": "WARN", "body": {"intValue": "3"}, "observedTimeUnixNano": "5"
    }


def _in_pieces(cls, data):
    """Decode as a long document would be, whatever its length: the message, or the error."""
    try:
        return otlpjson._decode_in_pieces(getattr(cls, "request_class", cls), data)
    except OtlpJsonError as e:
        return e


def _whole(cls, data):
    try:
        return decode(cls, data)
    except OtlpJsonError as e:
        return e


def _same_outcome(cls, data) -> None:
    whole, pieces = _whole(cls, data), _in_pieces(cls, data)
    if isinstance(whole, OtlpJsonError) or isinstance(pieces, OtlpJsonError):
        # both refuse; with several problems in one document each may name another one first
        assert isinstance(whole, OtlpJsonError) and isinstance(pieces, OtlpJsonError), (whole, pieces)
    else:
        assert pieces == whole


@given(requests, st.sampled_from([None, 2]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_pieces_decode_valid_documents_as_a_whole(request, indent):
    doc = encode(request)
    assert _in_pieces(type(request), doc) == request
    spaced = json.dumps(json.loads(doc), indent=indent)  # other whitespace, as str
    assert _in_pieces(type(request), spaced) == request


@given(requests, st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_pieces_and_whole_agree_on_mutated_documents(request, data):
    doc = json.loads(encode(request))
    nodes = []

    def collect(node):
        if isinstance(node, dict):
            for k, v in node.items():
                nodes.append((node, k))
                collect(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                nodes.append((node, i))
                collect(v)

    collect(doc)
    if nodes:
        parent, key = data.draw(st.sampled_from(nodes))
        parent[key] = data.draw(json_values)
    _same_outcome(type(request), json.dumps(doc))


@given(st.sampled_from(list(Signal)), json_values)
@settings(max_examples=300, deadline=None)
def test_pieces_and_whole_agree_on_arbitrary_json_under_the_request_keys(signal, value):
    top = {"logs": "resourceLogs", "traces": "resourceSpans", "metrics": "resourceMetrics"}[signal.value]
    inner = {"logs": "scopeLogs", "traces": "scopeSpans", "metrics": "scopeMetrics"}[signal.value]
    _same_outcome(signal, json.dumps({top: [{"resource": value, inner: [value, {"scope": value}]}, value]}))


@given(st.sampled_from(list(Signal)), st.one_of(st.binary(max_size=200), st.text(max_size=50)))
@settings(max_examples=300, deadline=None)
def test_pieces_and_whole_agree_on_arbitrary_bytes_and_text(signal, data):
    _same_outcome(signal, data)


L, M, T = Signal.LOGS, Signal.METRICS, Signal.TRACES


@pytest.mark.parametrize(
    ("signal", "doc"),
    [
        # the last of repeated keys counts, as in json.loads; null is "not set"
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"severityText": "a"}]}]}], "resourceLogs": [{}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{}]}], "scopeLogs": null}]}'),
        (M, '{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"sum": {"dataPoints": [{}]}, "gauge": {}, "sum": null}]}]}]}'),
        (M, '{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "m", "sum": {}, "unit": "s", "metadata": [{"key": "k"}]}]}]}]}'),
        (T, ' \n{"resourceSpans" : [ {"scopeSpans":[{"spans":[{"name":"s"} , {"name":"t"}]}] } ] }\t'),
        (L, '{"resourceLogs": [], "unknown": {"deep": [1, 2, {"x": null}]}}'),
        (L, "{}"),
    ],
)
def test_pieces_follow_json_semantics(signal, doc):
    whole = decode(signal, doc)
    assert _in_pieces(signal, doc) == whole
    assert _in_pieces(signal, doc.encode()) == whole


@pytest.mark.parametrize(
    ("signal", "doc"),
    [
        (M, '{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"sum": {}, "gauge": {}}]}]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [null]}]}'),
        (L, '{"resourceLogs": {"scopeLogs": []}}'),
        (L, '{"resourceLogs": [{"scopeLogs": [[]]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{}],}]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{}] "x": 1}]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords" [{}]}]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{} {}]}]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{}]}]}]} {}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": NaN}]}]}]}'),
        (L, '{"resourceLogs": [{"scopeLogs": [{"logRecords": ['),
        (L, '\ufeff{"resourceLogs": []}'),
        (L, "[]"),
    ],
)
def test_pieces_refuse_what_the_whole_decoder_refuses(signal, doc):
    assert isinstance(_whole(signal, doc), OtlpJsonError)
    assert isinstance(_in_pieces(signal, doc), OtlpJsonError)


@pytest.mark.parametrize(
    ("record", "path", "reason"),
    [
        ({"traceId": "5b8efff798038103d269b633813fc6"}, "traceId", "32 hex digits"),
        ({"body": {"arrayValue": {"values": [{}, None]}}}, "body.arrayValue.values[1]", "null"),
        ({"attributes": {"key": "a"}}, "attributes", "expected an array"),
    ],
)
def test_pieces_say_where_and_what_as_the_whole_decoder(record, path, reason):
    doc = _log_doc(record)
    assert str(_in_pieces(Signal.LOGS, doc)) == str(_whole(Signal.LOGS, doc))
    assert _in_pieces(Signal.LOGS, doc).path == "resourceLogs[0].scopeLogs[0].logRecords[0]." + path


def test_long_documents_are_decoded_in_pieces(monkeypatch):
    request = _log_request(400)
    doc = encode(request)
    assert len(doc) >= otlpjson.PIECEWISE_MIN_LENGTH
    calls = []
    real = otlpjson._decode_in_pieces
    monkeypatch.setattr(otlpjson, "_decode_in_pieces", lambda cls, data: calls.append(len(data)) or real(cls, data))
    assert decode(Signal.LOGS, doc) == request
    assert decode(Signal.LOGS, encode(_log_request(2))) == _log_request(2)
    assert calls == [len(doc)]  # only the long one


def test_a_thread_decoding_a_long_document_lets_others_run():
    """The GIL changes hands between records: another thread ticking every ms never waits long."""
    import threading

    doc = encode(_log_request(20_000))  # ~13 MiB, ~0.5 s to decode
    done = threading.Event()
    result = []
    worker = threading.Thread(target=lambda: (result.append(decode(Signal.LOGS, doc)), done.set()))
    gaps = []
    last = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    assert len(result[0].resource_logs[0].scope_logs[0].log_records) == 20_000
    # json.loads of the whole document would hold the GIL for ~400 ms
    assert len(gaps) > 20 and max(gaps) < 0.1, f"{len(gaps)} ticks, longest wait {max(gaps) * 1000:.0f} ms"
