"""The direct OTLP wire encoder (tapio.otlpwire) against the protobuf API, and the ebpf receiver's events → batches.

The oracle is the protobuf API filling the same fields one by one (how the
receiver built its records before it wrote bytes directly): the encoder's
bytes must parse to an equal message for any values hypothesis draws.
"""

from __future__ import annotations

import logging
import struct
import threading

import trio

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Signal
from tapio.receivers.ebpf import _decode as d
from tapio import otlpwire as enc
from tapio.receivers.ebpf import factory
from tapio.receivers.ebpf._config import Config
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
U64 = st.integers(0, (1 << 64) - 1)
KEYS = st.sampled_from(["process.pid", "file.path", "tapio.ebpf.tcp.states", "k", ""]) | st.text(max_size=40)
VALUES = st.booleans() | INT64 | st.text(max_size=300) | st.lists(st.text(max_size=20), max_size=5)
PAIRS = st.lists(st.tuples(KEYS, VALUES), max_size=20)


def put(attrs, key, value) -> None:
    """The protobuf-API way of adding one attribute (the oracle)."""
    kv = attrs.add(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, str):
        kv.value.string_value = value
    else:
        kv.value.array_value.SetInParent()
        kv.value.array_value.values.extend(AnyValue(string_value=v) for v in value)


@settings(max_examples=300)
@given(
    pairs=PAIRS,
    time_unix_nano=U64,
    observed=U64,
    severity=st.sampled_from([0, 9, 13]),
    severity_text=st.sampled_from(["", "INFO", "WARN"]),
    body=st.text(max_size=200),
    event_name=st.text(max_size=30),
    ids=st.none() | st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8)),
)
def test_log_record_bytes_parse_to_what_the_protobuf_api_builds(pairs, time_unix_nano, observed, severity, severity_text, body, event_name, ids):
    trace_id, span_id = ids or (b"", b"")
    data = enc.log_record(
        time_unix_nano=time_unix_nano,
        observed_time_unix_nano=observed,
        severity_number=severity,
        severity_text=severity_text,
        body=body,
        attrs=enc.attributes(enc.T_ATTR_LOG, pairs),
        event_name=event_name,
        trace_id=trace_id,
        span_id=span_id,
    )
    want = LogRecord(
        time_unix_nano=time_unix_nano,
        observed_time_unix_nano=observed,
        severity_number=severity,
        severity_text=severity_text,
        event_name=event_name,
        trace_id=trace_id,
        span_id=span_id,
    )
    want.body.string_value = body
    for key, value in pairs:
        put(want.attributes, key, value)
    assert LogRecord.FromString(data) == want
    # protobuf writes fields in number order too: the very same bytes
    assert data == want.SerializeToString(deterministic=True)


@settings(max_examples=300)
@given(
    pairs=PAIRS,
    name=st.text(max_size=60),
    kind=st.sampled_from([0, 1, 2, 3]),
    start=U64,
    end=U64,
    status=st.sampled_from([(0, ""), (2, ""), (2, "connection failed"), (1, "x")]),
)
def test_span_bytes_parse_to_what_the_protobuf_api_builds(pairs, name, kind, start, end, status):
    data = enc.span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        name=name,
        kind=kind,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attrs=enc.attributes(enc.T_ATTR_SPAN, pairs),
        status_code=status[0],
        status_message=status[1],
    )
    want = Span(trace_id=b"t" * 16, span_id=b"s" * 8, name=name, kind=kind, start_time_unix_nano=start, end_time_unix_nano=end)
    for key, value in pairs:
        put(want.attributes, key, value)
    if status != (0, ""):
        want.status.code, want.status.message = status
    assert Span.FromString(data) == want


@settings(max_examples=100)
@given(resource=PAIRS, n=st.integers(0, 5), scope=st.tuples(st.text(max_size=10), st.text(max_size=10)))
def test_requests_wrap_items_under_one_resource_and_scope(resource, n, scope):
    records = [enc.log_record(time_unix_nano=i + 1, observed_time_unix_nano=0, severity_number=9, severity_text="INFO", body=str(i), attrs=b"", event_name="e") for i in range(n)]
    data = enc.request(enc.attributes(enc.T_ATTR_RESOURCE, resource), enc.scope(*scope), [enc.item(r) for r in records])
    want = ExportLogsServiceRequest()
    rl = want.resource_logs.add()
    rl.resource.SetInParent()
    for key, value in resource:
        put(rl.resource.attributes, key, value)
    sl = rl.scope_logs.add()
    sl.scope.SetInParent()
    sl.scope.name, sl.scope.version = scope
    for r in records:
        sl.log_records.add().MergeFromString(r)
    assert ExportLogsServiceRequest.FromString(data) == want
    # trace requests share the field numbers
    spans = ExportTraceServiceRequest.FromString(enc.request(b"", enc.scope(*scope), []))
    assert spans.resource_spans[0].scope_spans[0].scope.name == scope[0]


@given(st.integers(0, (1 << 64) - 1))
def test_varint_matches_protobuf_uint64(n):
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    # int64 two's complement: a u64 at or past 2**63 reads back negative, never raises
    signed = n - (1 << 64) if n >= 1 << 63 else n
    kv = KeyValue.FromString(enc.key_value("k", n))
    assert kv.value.int_value == signed
    assert enc.varint(n) == enc.varint(signed)


def test_caches_stay_bounded():
    for i in range(enc.PIECES_CACHE_SIZE + 10):
        enc.kv_pieces([("file.path", f"/tmp/{i}")])
    assert len(enc._PIECES) <= enc.PIECES_CACHE_SIZE


# -- raw events through the receiver


def _receiver(signals=tuple(Signal)):
    telemetry = Telemetry()
    settings = Settings(
        id=ComponentID("ebpf"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "ebpf"), logger=logging.getLogger("test.ebpf")
    )
    sink = RecordingConsumer(signals)
    return factory.create(settings, Config(), Ports(output=sink)), sink, telemetry


@st.composite
def raw_events(draw):
    """Well-sized events of every kind with random fields (tcp events get a valid event number)."""
    kind = draw(st.sampled_from(sorted(d.SIZES)))
    data = bytearray(draw(st.binary(min_size=d.SIZES[kind], max_size=d.SIZES[kind])))
    struct.pack_into("<I", data, 16, kind)
    struct.pack_into("<I", data, 20, draw(st.sampled_from([1, 2, 999999])))  # pid: this test's parent, init, or gone
    if kind == d.EV_TCP:
        struct.pack_into("<IH", data, d._HDR.size + 16, draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([2, 10, 0])))
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(st.lists(raw_events(), max_size=12), st.lists(st.binary(max_size=80), max_size=3))
async def test_any_events_become_parsed_batches_that_keep_their_bytes(events, junk):
    receiver, sink, telemetry = _receiver()
    await receiver.deliver(events + junk)
    logs = [b for b in sink.batches if b.signal is Signal.LOGS]
    valid = []
    for raw in events:
        valid.append(d.parse_event(raw))
    bad = 0
    for raw in junk:
        try:
            valid.append(d.parse_event(raw))
        except d.DecodeError:
            bad += 1
    assert telemetry.value("tapio_bad_input_total") == bad
    if not valid:
        assert not sink.batches
        return
    (batch,) = logs
    assert batch.count == len(valid)
    assert batch.raw[0] is not None and batch.to_bytes() == batch.raw[0]
    records = batch.requests[0].resource_logs[0].scope_logs[0].log_records
    for ev, rec in zip(valid, records):
        attrs = {kv.key: kv.value for kv in rec.attributes}
        kind = d.KIND_NAMES[ev.h.kind]
        assert rec.event_name == f"tapio.ebpf.{kind}"
        assert attrs["tapio.ebpf.event"].string_value == kind
        assert attrs["process.pid"].int_value == ev.h.pid
        assert attrs["tapio.ebpf.comm"].string_value == ev.h.comm
        assert rec.time_unix_nano == (ev.h.ts + (receiver.program.boot_to_unix_ns if receiver.program else 0)) % (1 << 64)
    traces = [b for b in sink.batches if b.signal is Signal.TRACES]
    for b in traces:
        for s in b.requests[0].resource_spans[0].scope_spans[0].spans:
            assert len(s.trace_id) == 16 and len(s.span_id) == 8
            linked = [r for r in records if r.span_id == s.span_id]
            assert len(linked) == 1 and linked[0].trace_id == s.trace_id


async def test_logs_only_wiring_builds_no_spans():
    receiver, sink, _ = _receiver([Signal.LOGS])
    raw = d.TCP.struct.pack(
        5, 0, d.EV_TCP, 1, 1, 0, b"curl", 0xFFFF8888, 1, d.TCP_CLOSE, d.AF_INET, 40000, 80, 1, 1, 7, 0b10000110, -1, b"\x7f\0\0\1" + bytes(12), b"\x7f\0\0\1" + bytes(12)
    )
    await receiver.deliver([raw])
    assert [b.signal for b in sink.batches] == [Signal.LOGS]
    rec = sink.batches[0].requests[0].resource_logs[0].scope_logs[0].log_records[0]
    assert rec.body.string_value == "tcp close 127.0.0.1:80" and not rec.span_id
    states = next(kv.value.array_value for kv in rec.attributes if kv.key == "tapio.ebpf.tcp.states")
    assert [v.string_value for v in states.values] == ["ESTABLISHED", "SYN_SENT", "CLOSE"]


async def test_a_batch_has_one_resource_per_container_and_one_for_host_processes(tmp_path):
    """Events of containers go under a resource naming the container; host events under the host's; records keep theirs."""
    from tapio.receivers.ebpf._containers import ContainerResolver

    cids = {100: "a" * 64, 200: "b" * 64}
    for pid, cid in cids.items():
        (tmp_path / str(pid)).mkdir()
        pod = f"kubepods-burstable-pod{pid:08d}_1111_2222_3333_444444444444.slice"
        (tmp_path / str(pid) / "cgroup").write_text(f"0::/kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{cid}.scope\n")
    (tmp_path / "300").mkdir()
    (tmp_path / "300" / "cgroup").write_text("0::/system.slice/sshd.service\n")
    receiver, sink, _ = _receiver([Signal.LOGS])
    receiver._resolver = ContainerResolver(proc_root=str(tmp_path))
    tcp = (0xFFFF8888, 1, d.TCP_CLOSE, d.AF_INET, 40000, 80, 1, 1, 7, 0b10000110, -1, b"\x7f\0\0\1" + bytes(12), b"\x7f\0\0\1" + bytes(12))
    pids = [100, 300, 200, 100, 300, 200, 100]
    await receiver.deliver([d.TCP.struct.pack(i + 1, 0, d.EV_TCP, pid, pid, 0, b"curl", *tcp) for i, pid in enumerate(pids)])
    (batch,) = sink.batches
    assert batch.count == len(pids) and batch.to_bytes() == batch.raw[0]
    groups = []
    for rl in batch.requests[0].resource_logs:
        resource = {kv.key: kv.value.string_value for kv in rl.resource.attributes}
        assert resource["service.name"] == "tapio" and resource["host.name"]
        records = [r for sl in rl.scope_logs for r in sl.log_records]
        assert all(sl.scope.name == "tapio.ebpf" for sl in rl.scope_logs)
        record_pids = [next(kv.value.int_value for kv in r.attributes if kv.key == "process.pid") for r in records]
        for r in records:
            attrs = {kv.key: kv.value.string_value for kv in r.attributes}
            assert attrs.get("container.id", "") == resource.get("container.id", "")
        groups.append((resource.get("container.id", ""), resource.get("container.runtime.name", ""), resource.get("k8s.pod.uid", ""), record_pids, [r.time_unix_nano for r in records]))
    assert [(cid, rt, uid, p) for cid, rt, uid, p, _ in groups] == [
        (cids[100], "containerd", "00000100-1111-2222-3333-444444444444", [100, 100, 100]),
        ("", "", "", [300, 300]),
        (cids[200], "containerd", "00000200-1111-2222-3333-444444444444", [200, 200]),
    ]
    assert all(ts == sorted(ts) for *_, ts in groups), "each resource keeps its events in arrival order"


async def test_the_cgroup_tree_is_walked_off_the_event_loop(tmp_path, monkeypatch):
    """A gone process's container is found by walking the cgroup2 tree in a worker thread, the event loop running meanwhile.

    Checked without a clock: the walk waits for a flag that only a task on
    the event loop sets, so a walk on the loop itself would never see it.
    """
    from tapio.receivers.ebpf import _component
    from tapio.receivers.ebpf._containers import ContainerResolver, walk_cgroup_tree

    cid, pod = "ab" * 32, "3b5f0c1e-8a2d-4f6b-9c7e-1d2e3f4a5b6c"
    root = tmp_path / "cgroup2"
    leaf = root / "kubepods.slice" / f"kubepods-pod{pod.replace('-', '_')}.slice" / f"cri-containerd-{cid}.scope"
    leaf.mkdir(parents=True)
    for i in range(200):  # other cgroups the walk goes through
        (root / "system.slice" / f"unit-{i}.service").mkdir(parents=True)
    walking, loop_ran = threading.Event(), threading.Event()

    def gated_walk(path: str) -> dict:
        walking.set()
        assert loop_ran.wait(10), "the event loop did not run while the cgroup tree was walked"
        return walk_cgroup_tree(path)

    monkeypatch.setattr(_component, "walk_cgroup_tree", gated_walk)
    receiver, sink, telemetry = _receiver()
    receiver._resolver = ContainerResolver(proc_root=str(tmp_path / "noproc"), root_cgroup_id=1, cgroup2_root=str(root))

    async def watch() -> None:
        while not walking.is_set():
            await trio.sleep(0.001)
        loop_ran.set()

    gone = d.OPEN.struct.pack(1, leaf.stat().st_ino, d.EV_OPEN, 4242, 4242, 0, b"cat", 3, 0, 0, d.AT_FDCWD, 0, b"/etc/hostname")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await receiver.deliver([gone, gone])
    records = sink.batches[0].requests[0].resource_logs[0].scope_logs[0].log_records
    found = [{kv.key: kv.value.string_value for kv in r.attributes if kv.key in ("container.id", "k8s.pod.uid")} for r in records]
    assert found == [{"container.id": cid, "k8s.pod.uid": pod}] * 2
    assert receiver._resolver.walks == 1, "one walk per drain, however many events need it"
    assert telemetry.value("tapio_ebpf_container_unresolved_total") == 0
