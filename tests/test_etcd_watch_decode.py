"""The etcd-watch receiver's pure parts: gateway lines, values, Kubernetes keys and protobuf, OTLP bytes, delivery order.

Kubernetes protobuf values are built here from the published wire format
(k8s.io/apimachinery runtime.Unknown, meta/v1 ObjectMeta field numbers),
independently of the decoder under test. Fuzzed with hypothesis: no input
makes a parser raise anything but its own error type.
"""

from __future__ import annotations

import base64
import json
import math
import random

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tapio.receivers.etcd_watch import _encode as enc
from tapio.receivers.etcd_watch._component import prefix_range
from tapio.receivers.etcd_watch._gateway import (
    LineSplitter,
    MalformedResponse,
    StreamError,
    WatchResponse,
    parse_range,
    parse_watch_line,
)
from tapio.receivers.etcd_watch._progress import DeliveryProgress
from tapio.receivers.etcd_watch._records import RecordBuilder
from tapio.receivers.etcd_watch._gateway import Event, KeyValue
from tapio.receivers.etcd_watch._values import ProtoError, ProtoReader, decode_value, parse_key
from tapio.testing.etcd import k8s_object, ld, varint, vi

# ---------------------------------------------------------------- protobuf, written from the wire format (tapio.testing.etcd)


POD = k8s_object(
    "v1", "Pod", name="web-1", namespace="shop", uid="7c1f-uid", labels={"app": "web"}, created=1700000000,
    owners=[{"kind": "ReplicaSet", "name": "web-5d8", "uid": "rs-uid", "apiVersion": "apps/v1"}], generation=3,
    spec=ld(2, ld(1, "web")),  # spec.containers[0].name: skipped by the decoder
)


def test_kubernetes_protobuf_value_decodes_to_its_identity():
    d = decode_value(POD)
    assert (d.encoding, d.problem) == ("kubernetes-protobuf", "")
    assert (d.api_version, d.kind, d.name, d.namespace, d.uid) == ("v1", "Pod", "web-1", "shop", "7c1f-uid")
    assert d.body == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-1", "namespace": "shop", "uid": "7c1f-uid", "resourceVersion": "12345", "generation": 3,
            "creationTimestamp": "2023-11-14T22:13:20Z", "labels": {"app": "web"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d8", "uid": "rs-uid", "apiVersion": "apps/v1", "controller": True}],
        },
    }


def test_cluster_scoped_protobuf_object_has_no_namespace():
    d = decode_value(k8s_object("v1", "Node", name="node-1"))
    assert (d.kind, d.name, d.namespace) == ("Node", "node-1", "")


@pytest.mark.parametrize("cut", range(5, len(POD)))
def test_every_truncation_of_a_protobuf_value_is_a_counted_problem(cut):
    d = decode_value(POD[:cut])
    # a cut can land on a field boundary of the outer message (raw then ends early): still never a crash
    assert d.encoding == "kubernetes-protobuf"
    if d.problem:
        assert d.body == POD[:cut] and d.problem.startswith("invalid Kubernetes protobuf")


def test_protobuf_value_with_trailing_junk_or_bad_wire_types_is_a_problem():
    assert decode_value(POD + b"\xff").problem
    assert decode_value(b"k8s\x00" + vi(1, 5)).problem  # typeMeta as a varint
    assert decode_value(b"k8s\x00" + varint(1 << 3 | 3)).problem  # a group


@given(st.binary(max_size=300))
def test_protobuf_decoder_never_raises(data):
    d = decode_value(b"k8s\x00" + data)
    assert d.encoding == "kubernetes-protobuf"
    assert isinstance(d.problem, str)


@given(st.binary(max_size=200))
def test_proto_reader_stays_inside_its_buffer(data):
    try:
        for number, wire_type, value in ProtoReader(data):
            assert number > 0 and wire_type in (0, 1, 2, 5)
            if wire_type == 2:
                assert len(value) <= len(data)
    except ProtoError:
        pass


# ---------------------------------------------------------------- other values

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6) | st.lists(json_values, max_size=6))
def test_json_values_decode_to_themselves(doc):
    d = decode_value(json.dumps(doc).encode())
    assert (d.encoding, d.problem) == ("json", "")
    assert d.body == doc


def test_json_kubernetes_object_gives_its_identity():
    d = decode_value(b'{"apiVersion":"cilium.io/v2","kind":"CiliumEndpoint","metadata":{"name":"x","namespace":"kube-system","uid":"u"}}')
    assert (d.api_version, d.kind, d.name, d.namespace, d.uid) == ("cilium.io/v2", "CiliumEndpoint", "x", "kube-system", "u")


@pytest.mark.parametrize(
    "raw, encoding, body, problem",
    [
        (b"", "empty", "", False),
        (b"hello world", "text", "hello world", False),
        (b"12", "text", "12", False),
        (b"\x00\x01\xff", "binary", b"\x00\x01\xff", False),
        (b"{not json", "text", "{not json", True),
        (b"{\xff", "binary", b"{\xff", True),
        (b"k8s:enc:aescbc:v1:key1:\x8a\x01", "kubernetes-encrypted", b"k8s:enc:aescbc:v1:key1:\x8a\x01", False),
        (b"[" * 100000, "text", "[" * 100000, True),  # too deep for the JSON decoder
    ],
)
def test_value_encodings(raw, encoding, body, problem):
    d = decode_value(raw)
    assert (d.encoding, d.body, bool(d.problem)) == (encoding, body, problem)


@given(st.binary(max_size=200))
def test_value_decoder_never_raises(raw):
    d = decode_value(raw)
    assert d.encoding in ("json", "kubernetes-protobuf", "kubernetes-encrypted", "text", "binary", "empty")


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key, expected",
    [
        (b"/registry/pods/default/web-1", ("pods", "default", "web-1")),
        (b"/registry/nodes/node-1", ("nodes", "", "node-1")),
        (b"/registry/minions/node-1", ("nodes", "", "node-1")),
        (b"/registry/services/specs/default/kubernetes", ("services", "default", "kubernetes")),
        (b"/registry/services/endpoints/default/kubernetes", ("endpoints", "default", "kubernetes")),
        (b"/registry/deployments/kube-system/coredns", ("deployments", "kube-system", "coredns")),
        (b"/registry/controllers/default/rc", ("replicationcontrollers", "default", "rc")),
        (b"/registry/cilium.io/ciliumendpoints/kube-system/x", ("ciliumendpoints.cilium.io", "kube-system", "x")),
        (b"/registry/cilium.io/ciliumnodes/node-1", ("ciliumnodes.cilium.io", "", "node-1")),
        (b"/registry/apiregistration.k8s.io/apiservices/v1.apps", ("apiservices.apiregistration.k8s.io", "", "v1.apps")),
        (b"/registry/namespaces/default", ("namespaces", "", "default")),
    ],
)
def test_kubernetes_keys(key, expected):
    path = parse_key(key, "/registry/")
    assert path is not None and (path.resource, path.namespace, path.name) == expected


@pytest.mark.parametrize("key", [b"/registry/", b"/registry/pods", b"/registry/pods/", b"/other/pods/a/b", b"/registry/a/b/c/d/e", b"/registry//x"])
def test_keys_that_are_not_kubernetes_objects(key):
    assert parse_key(key, "/registry/") is None


def test_no_kubernetes_prefix_reads_no_key():
    assert parse_key(b"/registry/pods/a/b", "") is None


@given(st.binary(max_size=100))
def test_key_parser_never_raises(key):
    path = parse_key(b"/registry/" + key, "/registry/")
    assert path is None or (path.resource and path.name)


@pytest.mark.parametrize(
    "prefix, key, end",
    [("/registry/", b"/registry/", b"/registry0"), ("", b"\0", b"\0"), ("a\xff", b"a\xc3\xbf", b"a\xc3\xc0")],
)
def test_prefix_ranges(prefix, key, end):
    assert prefix_range(prefix) == (key, end)


# ---------------------------------------------------------------- gateway lines


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_watch_lines_as_etcd_34_sends_them():
    created = parse_watch_line(b'{"result":{"header":{"cluster_id":"15118495548433857066","member_id":"1","revision":"2","raft_term":"2"},"created":true}}')
    assert isinstance(created, WatchResponse) and created.created and created.header.revision == 2
    assert created.header.cluster_id == 15118495548433857066
    line = json.dumps({"result": {"header": {"revision": "4"}, "events": [
        {"kv": {"key": b64(b"/k"), "create_revision": "2", "mod_revision": "3", "version": "2", "value": b64(b"v2"), "lease": "7"},
         "prev_kv": {"key": b64(b"/k"), "create_revision": "2", "mod_revision": "2", "version": "1", "value": b64(b"v1")}},
        {"type": "DELETE", "kv": {"key": b64(b"/k"), "mod_revision": "4"}},
    ]}}).encode()
    msg = parse_watch_line(line)
    assert isinstance(msg, WatchResponse)
    put, delete = msg.events
    assert (put.deleted, put.kv.value, put.kv.mod_revision, put.kv.lease, put.prev.value) == (False, b"v2", 3, 7, b"v1")
    assert (delete.deleted, delete.kv.mod_revision, delete.kv.value, delete.prev) == (True, 4, b"", None)
    canceled = parse_watch_line(b'{"result":{"header":{"cluster_id":"1","raft_term":"2"},"canceled":true,"compact_revision":"3"}}')
    assert isinstance(canceled, WatchResponse) and canceled.canceled and canceled.compact_revision == 3
    error = parse_watch_line(b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}')
    assert error == StreamError(14, "etcdserver: no leader")


@pytest.mark.parametrize(
    "line",
    [
        b"", b"[]", b"nope", b'{"x":1}', b'{"result":[]}', b'{"result":{"events":{}}}',
        b'{"result":{"events":[{"kv":{"key":"!!!"}}]}}', b'{"result":{"events":[{"type":"MOVE","kv":{}}]}}',
        b'{"result":{"events":[{}]}}', b'{"result":{"header":{"revision":"x"}}}', b'{"result":{"header":{"revision":"99999999999999999999"}}}',
        b'{"result":{"created":"yes"}}', b'{"result":{"header":{"cluster_id":"-1"}}}', b'\xff\xfe',
    ],
)
def test_malformed_watch_lines(line):
    with pytest.raises(MalformedResponse):
        parse_watch_line(line)


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.builds(lambda d: json.dumps({"result": d}).encode(), json_values))
def test_watch_line_parser_raises_only_its_own_error(line):
    try:
        msg = parse_watch_line(line)
    except MalformedResponse:
        return
    assert isinstance(msg, (WatchResponse, StreamError))


def test_range_pages():
    page = parse_range(json.dumps({"header": {"revision": "9"}, "kvs": [{"key": b64(b"/a"), "value": b64(b"1"), "mod_revision": "5"}], "more": True, "count": "3"}).encode())
    assert (page.header.revision, [kv.key for kv in page.kvs], page.more) == (9, [b"/a"], True)
    empty = parse_range(b'{"header":{"revision":"9"}}')
    assert (empty.kvs, empty.more) == ([], False)


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=10), st.randoms(use_true_random=False))
def test_line_splitter_gives_the_lines_whatever_the_chunking(lines, rnd):
    stream = b"".join(line + b"\n" for line in lines)
    splitter, got, pos = LineSplitter(64), [], 0
    while pos < len(stream):
        n = rnd.randint(1, 20)
        got += splitter.feed(stream[pos:pos + n])
        pos += n
    assert got == [line for line in lines if line.strip()] and splitter.pending == 0


def test_line_splitter_refuses_a_line_over_its_limit():
    splitter = LineSplitter(10)
    splitter.feed(b"12345")
    with pytest.raises(MalformedResponse):
        splitter.feed(b"678901")
    with pytest.raises(MalformedResponse):
        LineSplitter(10).feed(b"a\n" + b"x" * 11 + b"\nb")


# ---------------------------------------------------------------- OTLP bytes


def reference_any_value(value) -> AnyValue:
    av = AnyValue()
    if isinstance(value, dict):
        for k, v in value.items():
            av.kvlist_value.values.add(key=k).value.CopyFrom(reference_any_value(v))
        if not value:
            av.kvlist_value.SetInParent()
    elif isinstance(value, list):
        for v in value:
            av.array_value.values.add().CopyFrom(reference_any_value(v))
        if not value:
            av.array_value.SetInParent()
    elif isinstance(value, bool):
        av.bool_value = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            av.int_value = value
        else:
            av.string_value = str(value)
    elif isinstance(value, float):
        av.double_value = value
    elif isinstance(value, str):
        av.string_value = value
    elif isinstance(value, bytes):
        av.bytes_value = value
    return av


@given(json_values | st.binary(max_size=20))
def test_any_value_bytes_are_what_protobuf_builds(value):
    written = AnyValue.FromString(enc.any_value(value))
    assert written == reference_any_value(value)


@given(st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=10))
def test_strings_with_lone_surrogates_still_parse(text):
    AnyValue.FromString(enc.any_value({text: [text]}))


def test_nesting_deeper_than_the_limit_becomes_json_text():
    doc: list = []
    inner = doc
    for _ in range(enc.MAX_DEPTH + 10):
        inner.append([])
        inner = inner[0]
    av = AnyValue.FromString(enc.any_value(doc))
    for _ in range(enc.MAX_DEPTH):
        av = av.array_value.values[0]
    assert av.string_value.startswith("[[")


def test_records_parse_and_carry_the_event():
    builder = RecordBuilder(raw_values=True, kubernetes_prefix="/registry/")
    kv = KeyValue(b"/registry/pods/shop/web-1", POD, 5, 9, 2, 0)
    prev = KeyValue(b"/registry/pods/shop/web-1", b'{"kind":"Pod"}', 5, 8, 1, 0)
    built = builder.event(Event(True, KeyValue(kv.key, b"", 0, 10, 0, 0), kv), "/registry/", 123)
    put = builder.event(Event(False, kv, prev), "/registry/", 124)
    marker = builder.resync_marker(prefix="/registry/", reason="compacted", wanted_revision=3, revision=20, compact_revision=15, relist=True, observed_ns=125)
    request = ExportLogsServiceRequest.FromString(builder.request(0xABC, [built.record, put.record, marker]))
    resource = {a.key: a.value.string_value for a in request.resource_logs[0].resource.attributes}
    assert resource["tapio.etcd.cluster_id"] == "abc" and resource["service.name"] == "tapio"
    scope = request.resource_logs[0].scope_logs[0]
    assert scope.scope.name == "tapio.etcd-watch"
    delete, update, mark = scope.log_records
    attrs = {a.key: a.value for a in delete.attributes}
    assert attrs["tapio.etcd.operation"].string_value == "DELETE" and attrs["tapio.etcd.revision"].int_value == 10
    assert attrs["tapio.etcd.prev_value"].bytes_value == POD and "tapio.etcd.value" not in attrs
    assert attrs["k8s.object.kind"].string_value == "Pod" and attrs["k8s.namespace.name"].string_value == "shop"
    assert delete.body.kvlist_value.values[1].value.string_value == "Pod"
    assert delete.event_name == "tapio.etcd.delete" and delete.observed_time_unix_nano == 123 and delete.time_unix_nano == 0
    uattrs = {a.key: a.value for a in update.attributes}
    assert uattrs["tapio.etcd.prev_revision"].int_value == 8 and uattrs["tapio.etcd.value"].bytes_value == POD
    assert mark.severity_text == "WARN" and "compacted" in mark.body.string_value
    assert {a.key: a.value for a in mark.attributes}["tapio.etcd.compact_revision"].int_value == 15


# ---------------------------------------------------------------- delivery order


@settings(max_examples=200)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.randoms(use_true_random=False), st.integers(-1, 29))
def test_delivered_is_the_end_of_the_delivered_run(steps, rnd, fail_at):
    async def main() -> None:
        progress = DeliveryProgress(0)
        revision, callbacks = 0, []
        for step in steps:
            revision += step
            callbacks.append((revision, progress.track(revision)))
        order = list(range(len(callbacks)))
        rnd.shuffle(order)
        reported: set[int] = set()
        for i in order:
            rev, done = callbacks[i]
            done(i != fail_at)
            reported.add(i)
            # every batch up to `delivered` reported delivered, and none before a failure is missing
            ok_prefix = 0
            for j, (r, _) in enumerate(callbacks):
                if j not in reported or j == fail_at:
                    break
                ok_prefix = max(ok_prefix, r)
            if progress.stuck_at is None:
                assert progress.delivered == ok_prefix
            else:
                assert progress.delivered <= ok_prefix
    trio.run(main)


async def test_passed_revisions_count_only_after_what_is_in_flight():
    progress = DeliveryProgress(5)
    done = progress.track(7)
    progress.passed(9)
    assert progress.delivered == 5
    done(True)
    assert progress.delivered == 9
    progress.passed(12)
    assert progress.delivered == 12


async def test_after_reset_old_reports_are_ignored():
    progress = DeliveryProgress(100)
    old = progress.track(101)
    progress.reset()
    old(False)
    assert progress.stuck_at is None and progress.delivered == 0
    progress.passed(3)
    assert progress.delivered == 3
