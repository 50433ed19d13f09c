"""The ebpf receiver's event → OTLP mapping (`_records`), fed with raw event bytes: no kernel, no receiver."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.logs.v1.logs_pb2 import ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status

from tapio.receivers.ebpf import _decode as d
from tapio.receivers.ebpf._containers import Container
from tapio.receivers.ebpf import _records
from tapio.receivers.ebpf._records import RecordWriter
from tapio.testing import prereq
from tests.ebpf_reference import ReferenceWriter

CID = "0123456789abcdef" * 4
POD = "3b5f0c1e-8a2d-4f6b-9c7e-1d2e3f4a5b6c"
OFFSET = 1_700_000_000_000_000_000
OBSERVED = OFFSET + 10**9
LOOPBACK = b"\x7f\0\0\1" + bytes(12)


def hdr(kind: int, *, ts: int = 1000, pid: int = 42, tid: int | None = None, comm: bytes = b"curl", cgroup: int = 7, uid: int = 1000) -> tuple:
    return (ts, cgroup, kind, pid, pid if tid is None else tid, uid, comm)


def raw_open(path: bytes, ret: int, flags: int = 0, mode: int = 0, **h: Any) -> bytes:
    return d.OPEN.struct.pack(*hdr(d.EV_OPEN, **h), ret, flags, mode, d.AT_FDCWD, 0, path)


def raw_exec(filename: bytes, argv: list[bytes], ppid: int = 1, **h: Any) -> bytes:
    packed = b"\0".join(argv) + b"\0"
    pid = h.get("pid", 42)
    return d.EXEC.struct.pack(*hdr(d.EV_EXEC, **h), ppid, pid, len(packed), len(argv), 0, 0, filename, packed)


def raw_exit(code: int = 0, sig: int = 0, start_ts: int = 0, ppid: int = 1, **h: Any) -> bytes:
    return d.EXIT.struct.pack(*hdr(d.EV_EXIT, **h), start_ts, ppid, code, sig, 0)


def raw_tcp(event: int, old: int, new: int, states: int, sport: int = 40000, dport: int = 80, start_ts: int = 500, fd: int = -1, sock: int = 0xFFFF8888, **h: Any) -> bytes:
    return d.TCP.struct.pack(*hdr(d.EV_TCP, **h), sock, start_ts, event, d.AF_INET, sport, dport, 1, old, new, states, fd, LOOPBACK, LOOPBACK)


def raw_signal(sig: int, target: int, target_comm: bytes = b"sleep", **h: Any) -> bytes:
    return d.SIGNAL.struct.pack(*hdr(d.EV_SIGNAL, **h), sig, 0, 0, target, 0, 0, target_comm)


def raw_oom(anon_kb: int, **h: Any) -> bytes:
    return d.OOM.struct.pack(*hdr(d.EV_OOM, **h), 900, 1 << 20, anon_kb, 10, 0, 8, 1000, -998)


#: every test that writes records runs through the compiled loop and through the Python loop (its fallback)
both_loops = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])


def writer_for(compiled: bool, **kwargs: Any) -> RecordWriter:
    """A RecordWriter with or without the compiled loop (`missing` when the compiled loop is wanted but not built)."""
    if compiled and _records.COMPILED is None:
        prereq.missing("the ebpf receiver's compiled record writer", f"{_records.COMPILED_MISSING}")
    writer = RecordWriter(compiled=compiled, **kwargs)
    assert writer.compiled == compiled
    return writer


def counting_ids():
    """A seeded id source: the same ids on every run."""
    return random.Random(0).randbytes


def flat(groups: dict[tuple[bytes, ...], list[bytes]]) -> list[bytes]:
    """A drain's items of every container group, groups in their order."""
    return [item for items in groups.values() for item in items]


def write(raws: list[bytes], containers: dict | None = None, writer: RecordWriter | None = None, compiled: bool = True):
    writer = writer or writer_for(compiled, max_pending=16, ppid_of=lambda pid: 4242, ids=counting_ids())
    scan = writer.scan(raws)
    assert not scan.bad
    drain = writer.write(scan.events, containers or {}, offset=OFFSET, observed=OBSERVED)
    records = ScopeLogs.FromString(b"".join(flat(drain.records))).log_records
    spans = ScopeSpans.FromString(b"".join(flat(drain.spans))).spans
    return drain, list(records), list(spans)


def attrs(item: Any) -> dict[str, Any]:
    out = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = [v.string_value for v in kv.value.array_value.values] if kind == "array_value" else getattr(kv.value, kind)
    return out


@both_loops
def test_an_open_names_path_flags_fd_or_errno(compiled):
    _, (ok, failed), spans = write([raw_open(b"/etc/x", 3, flags=0o1101, mode=0o644), raw_open(b"/nope", -2)], compiled=compiled)
    assert ok.body.string_value == "open /etc/x" and ok.event_name == "tapio.ebpf.open"
    assert ok.time_unix_nano == OFFSET + 1000 and ok.observed_time_unix_nano == OBSERVED
    assert ok.severity_text == "INFO" and ok.severity_number == 9
    a = attrs(ok)
    assert a["tapio.ebpf.open.flags_text"] == "O_WRONLY|O_CREAT|O_TRUNC" and a["tapio.ebpf.open.fd"] == 3
    assert a["tapio.ebpf.open.mode"] == 0o644, "the mode only matters with O_CREAT"
    assert list(a)[:6] == ["tapio.ebpf.event", "process.pid", "thread.id", "process.user.id", "tapio.ebpf.comm", "tapio.ebpf.cgroup_id"]
    b = attrs(failed)
    assert failed.body.string_value == "open /nope: ENOENT"
    assert b["error.type"] == "ENOENT" and b["tapio.ebpf.open.errno"] == 2 and "tapio.ebpf.open.fd" not in b and "tapio.ebpf.open.mode" not in b
    assert not spans


@both_loops
def test_exec_then_exit_makes_a_process_span_named_by_the_executable(compiled):
    raws = [raw_exec(b"/usr/bin/sleep", [b"sleep", b"1"], ppid=0, ts=100, pid=7), raw_exit(code=3, ts=5100, pid=7, comm=b"sleep")]
    drain, (ex, gone), (span,) = write(raws, compiled=compiled)
    a = attrs(ex)
    assert a["process.parent_pid"] == 4242, "asked of ppid_of when the kernel saw no fork"
    assert a["process.command_args"] == ["sleep", "1"] and a["process.executable.name"] == "sleep"
    b = attrs(gone)
    assert gone.body.string_value == "exit sleep: code 3"
    assert b["process.exit.code"] == 3 and b["process.executable.path"] == "/usr/bin/sleep" and b["tapio.ebpf.exit.lifetime_ns"] == 5000
    assert span.name == "process sleep" and span.kind == Span.SPAN_KIND_INTERNAL
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (OFFSET + 100, OFFSET + 5100)
    assert span.status.code == Status.STATUS_CODE_ERROR and span.status.message == "exit sleep: code 3"
    assert (gone.trace_id, gone.span_id) == (span.trace_id, span.span_id) and len(span.trace_id) == 16 and not ex.span_id
    assert drain.exited == [(7, 7)]


@both_loops
def test_an_exit_by_signal_and_an_exit_without_a_known_start(compiled):
    _, (killed, bare), spans = write([raw_exit(sig=9, start_ts=10, pid=8), raw_exit(pid=9)], compiled=compiled)
    assert killed.body.string_value == "exit curl: killed by SIGKILL" and attrs(killed)["tapio.ebpf.exit.signal"] == "SIGKILL"
    assert [s.name for s in spans] == ["process curl"], "no start, no span"
    assert "tapio.ebpf.exit.lifetime_ns" not in attrs(bare)


@both_loops
def test_tcp_close_and_a_failed_connect_end_spans(compiled):
    syn_sent, established, close = 1 << d.TCP_SYN_SENT, 1 << d.TCP_ESTABLISHED, 1 << d.TCP_CLOSED
    raws = [
        raw_tcp(d.TCP_CONNECT, d.TCP_SYN_SENT, d.TCP_ESTABLISHED, syn_sent | established, ts=900),
        raw_tcp(d.TCP_CLOSE, 9, d.TCP_CLOSED, syn_sent | established | close, ts=2000),
        raw_tcp(d.TCP_ACCEPT, d.TCP_SYN_RECV, d.TCP_ESTABLISHED, 1 << d.TCP_SYN_RECV | established, fd=5, sock=0xABC),
        raw_tcp(d.TCP_CONNECT, d.TCP_SYN_SENT, d.TCP_CLOSED, syn_sent | close, dport=81),
    ]
    _, (conn, closed, acc, refused), (span_close, span_refused) = write(raws, compiled=compiled)
    a = attrs(closed)
    assert closed.body.string_value == "tcp close 127.0.0.1:80"
    assert a["tapio.ebpf.tcp.states"] == ["ESTABLISHED", "SYN_SENT", "CLOSE"] and a["tapio.ebpf.tcp.duration_ns"] == 1500
    assert a["network.type"] == "ipv4" and a["tapio.ebpf.tcp.old_state"] == "LAST_ACK" and a["tapio.ebpf.tcp.socket"] == "ffff8888"
    assert attrs(acc)["tapio.ebpf.tcp.fd"] == 5 and "tapio.ebpf.tcp.fd" not in attrs(conn)
    assert span_close.name == "tcp connect 127.0.0.1:80" and span_close.kind == Span.SPAN_KIND_CLIENT and span_close.status.code == 0
    assert refused.body.string_value == "tcp connect 127.0.0.1:81 failed"
    assert span_refused.status.message == "connection failed" and (refused.span_id, closed.span_id) == (span_refused.span_id, span_close.span_id)


@both_loops
def test_signal_and_oom(compiled):
    _, (sig, oom), _ = write([raw_signal(15, 77), raw_oom(5000, pid=66, comm=b"hog")], compiled=compiled)
    assert sig.body.string_value == "signal SIGTERM from 42 to 77"
    assert attrs(sig)["tapio.ebpf.signal.name"] == "SIGTERM" and attrs(sig)["tapio.ebpf.signal.target_comm"] == "sleep"
    assert oom.severity_text == "WARN" and oom.severity_number == 13
    assert oom.body.string_value == "OOM kill of hog (pid 66), anon rss 5000 kB"
    assert attrs(oom)["tapio.ebpf.oom.score_adj"] == -998 and attrs(oom)["tapio.ebpf.oom.marked_time_unix_nano"] == OFFSET + 900


@both_loops
def test_containers_are_attached_by_pid_and_cgroup(compiled):
    box = Container(CID, "containerd", POD)
    _, (inside, outside), _ = write([raw_open(b"/a", 3, pid=10, cgroup=5), raw_open(b"/a", 3, pid=11, cgroup=5)], {(10, 5): box}, compiled=compiled)
    a = attrs(inside)
    assert (a["container.id"], a["container.runtime.name"], a["k8s.pod.uid"]) == (CID, "containerd", POD)
    assert "container.id" not in attrs(outside)


@both_loops
def test_pending_execs_are_bounded_and_evictions_counted(compiled):
    writer = writer_for(compiled, max_pending=2, ppid_of=lambda pid: 0, ids=counting_ids())
    drain, _, _ = write([raw_exec(b"/bin/true", [b"true"], pid=p) for p in (1, 2, 3)], writer=writer)
    assert drain.evicted == 1
    _, (first, last), _ = write([raw_exit(pid=1), raw_exit(pid=3)], writer=writer)
    assert "process.executable.path" not in attrs(first) and attrs(last)["process.executable.path"] == "/bin/true"


@both_loops
def test_logs_only_or_traces_only(compiled):
    writer = writer_for(compiled, max_pending=4, ppid_of=lambda pid: 0)
    events = writer.scan([raw_exit(start_ts=1)]).events
    assert writer.write(events, {}, offset=0, observed=0, traces=False).spans is None
    only = writer.write(events, {}, offset=0, observed=0, logs=False)
    assert only.records is None and len(flat(only.spans)) == 1


# -- cached pieces against records built from scratch


def same_drains(
    drains: list[tuple[list[bytes], dict]], compiled: bool, *, logs: bool = True, traces: bool = True, offset: int = OFFSET, observed: int = OBSERVED
) -> list[tuple[list[bytes], list[bytes]]]:
    """The drains through the receiver's caching writer and the plain reference (`tests.ebpf_reference`, same id source); asserts equal bytes, returns the items."""
    cached = writer_for(compiled, max_pending=8, ppid_of=lambda pid: pid + 1, ids=random.Random(1).randbytes)
    scratch = ReferenceWriter(max_pending=8, ppid_of=lambda pid: pid + 1, ids=random.Random(1).randbytes)
    out = []
    for i, (raws, containers) in enumerate(drains):
        a = cached.write(cached.scan(raws).events, containers, offset=offset + i, observed=observed and observed + i, logs=logs, traces=traces)
        b = scratch.write(raws, containers, offset=offset + i, observed=observed and observed + i, logs=logs, traces=traces)
        assert (a.records is None, a.spans is None) == (b.records is None, b.spans is None) == (not logs, not traces)
        if logs:
            assert list(a.records.items()) == list(b.records.items()), f"drain {i}: log records or their grouping by container differ"
        if traces:
            assert list(a.spans.items()) == list(b.spans.items()), f"drain {i}: spans or their grouping by container differ"
        assert (a.exited, a.evicted) == (b.exited, b.evicted)
        out.append((flat(a.records or {}), flat(a.spans or {})))
    return out


@both_loops
def test_a_container_that_changes_between_drains_is_not_served_from_the_cache(compiled):
    first, second = Container(CID, "containerd", POD), Container("f" * 64, "cri-o", "")
    event = raw_open(b"/etc/hosts", 3, pid=10, cgroup=5)
    drains = [([event, event], {(10, 5): first}), ([event], {(10, 5): second}), ([event], {})]
    items = same_drains(drains, compiled)
    seen = [[attrs(r).get("container.id") for r in ScopeLogs.FromString(b"".join(records)).log_records] for records, _ in items]
    assert seen == [[CID, CID], ["f" * 64], [None]]
    runtime = attrs(ScopeLogs.FromString(b"".join(items[1][0])).log_records[0])
    assert runtime["container.runtime.name"] == "cri-o" and "k8s.pod.uid" not in runtime


@both_loops
def test_a_comm_that_changes_at_exec_is_not_served_from_the_cache(compiled):
    before = raw_open(b"/bin/cat", 3, pid=10, comm=b"sh")
    exec_ = raw_exec(b"/bin/cat", [b"cat", b"x"], pid=10, comm=b"cat")
    after = raw_open(b"x", 3, pid=10, comm=b"cat")
    items = same_drains([([before, exec_, after], {}), ([after, raw_exit(pid=10, comm=b"cat", start_ts=1)], {})], compiled)
    comms = [attrs(r)["tapio.ebpf.comm"] for records, _ in items for r in ScopeLogs.FromString(b"".join(records)).log_records]
    assert comms == ["sh", "cat", "cat", "cat", "cat"]
    (span,) = ScopeSpans.FromString(b"".join(items[1][1])).spans
    assert span.name == "process cat"


PIDS = st.sampled_from([10, 11, 12])
COMMS = st.sampled_from([b"sh", b"cat", b"curl", b"\xff\xfebad"])
CGROUPS = st.sampled_from([5, 6])
ADDRESSES = st.sampled_from([LOOPBACK, b"\x0a\0\0\x02" + bytes(12), bytes(15) + b"\1", bytes(10) + b"\xff\xff\x0a\0\0\1"])
#: TCP states: mostly those of a connection's life (a refused connect ends in CLOSE), sometimes any
STATES = st.sampled_from([d.TCP_SYN_SENT, d.TCP_ESTABLISHED, d.TCP_CLOSED]) | st.integers(0, 13)
SEEN = st.sampled_from([1 << d.TCP_SYN_SENT | 1 << d.TCP_CLOSED, 0b10000110]) | st.integers(0, 1 << 13)
CONTAINERS = st.sampled_from([None, Container(CID, "containerd", POD), Container(CID, "", ""), Container("e" * 64, "docker", POD)])


@st.composite
def hot_events(draw):
    """Events whose values repeat (as on a node), so that the caches are hit, changed and reused."""
    h = {"pid": draw(PIDS), "comm": draw(COMMS), "cgroup": draw(CGROUPS), "ts": draw(st.integers(1, 10**12))}
    h["tid"] = h["pid"] + draw(st.sampled_from([0, 0, 1]))
    kind = draw(st.sampled_from(["open", "tcp", "tcp", "exec", "exit", "signal", "oom"]))
    if kind == "open":
        return raw_open(draw(st.sampled_from([b"/etc/a", b"/tmp/b\0junk", b"\xc3\xa9t\xe9"])), draw(st.sampled_from([3, -2, -13, -999])), flags=draw(st.sampled_from([0, 0o101, 0o2000000])), mode=0o600, **h)
    if kind == "tcp":
        family = draw(st.sampled_from([d.AF_INET, d.AF_INET6, 0]))
        event = draw(st.sampled_from([d.TCP_CONNECT, d.TCP_ACCEPT, d.TCP_CLOSE]))
        data = bytearray(raw_tcp(event, draw(STATES), draw(STATES), draw(SEEN), sport=draw(st.sampled_from([80, 40000, 65535])), dport=draw(st.sampled_from([80, 443, 1])), start_ts=draw(st.integers(0, 10**12)), fd=draw(st.sampled_from([-1, 4])), sock=draw(st.sampled_from([0, 1, 0xFFFF888812345678, (1 << 64) - 1])), **h))
        off = d.TCP.offsets
        data[off["family"][0] : off["family"][0] + 2] = family.to_bytes(2, "little")
        data[off["saddr"][0] : off["saddr"][0] + 16] = draw(ADDRESSES)
        data[off["daddr"][0] : off["daddr"][0] + 16] = draw(ADDRESSES)
        return bytes(data)
    if kind == "exec":
        return raw_exec(draw(st.sampled_from([b"/bin/sh", b"/usr/bin/cat"])), draw(st.lists(st.sampled_from([b"-c", b"x", b""]), max_size=3)), ppid=draw(st.sampled_from([0, 1])), **h)
    if kind == "exit":
        return raw_exit(code=draw(st.sampled_from([0, 3, -1])), sig=draw(st.sampled_from([0, 0, 9, 15, 64])), start_ts=draw(st.sampled_from([0, 5])), **h)
    if kind == "signal":
        return raw_signal(draw(st.sampled_from([15, 17, 64])), draw(PIDS), **h)
    return raw_oom(draw(st.integers(0, 1 << 40)), **h)


@st.composite
def drains(draw):
    return [
        (draw(st.lists(hot_events(), max_size=12)), {(pid, cg): c for pid in (10, 11, 12) for cg in (5, 6) if (c := draw(CONTAINERS)) is not None})
        for _ in range(draw(st.integers(1, 4)))
    ]


#: which signals are wired: logs and traces, logs only, traces only
WIRINGS = st.sampled_from([(True, True), (True, False), (False, True)])


@both_loops
@settings(max_examples=300, deadline=None)
@given(drains=drains(), wiring=WIRINGS, offset=st.sampled_from([OFFSET, 0, -(10**6)]), observed=st.sampled_from([OBSERVED, 0]))
def test_cached_records_equal_records_built_from_scratch(drains, wiring, offset, observed, compiled):
    # each drain's events twice over: the second time most are written from what the first put in the caches
    drains = [(raws + raws, containers) for raws, containers in drains]
    same_drains(drains, compiled, logs=wiring[0], traces=wiring[1], offset=offset, observed=observed)


@st.composite
def any_events(draw):
    """Well-sized events of every kind with arbitrary field values (a valid kind and tcp event), each twice, so the second is written from cached pieces."""
    kind = draw(st.sampled_from(sorted(d.SIZES)))
    data = bytearray(draw(st.binary(min_size=d.SIZES[kind], max_size=d.SIZES[kind])))
    data[16:20] = kind.to_bytes(4, "little")
    if kind == d.EV_TCP:
        at = d.TCP.offsets["event"][0]
        data[at : at + 4] = draw(st.sampled_from([d.TCP_CONNECT, d.TCP_ACCEPT, d.TCP_CLOSE])).to_bytes(4, "little")
        if draw(st.booleans()):
            at = d.TCP.offsets["family"][0]
            data[at : at + 2] = draw(st.sampled_from([d.AF_INET, d.AF_INET6])).to_bytes(2, "little")
    return [bytes(data)] * 2


@both_loops
@settings(max_examples=200, deadline=None)
@given(events=st.lists(any_events(), max_size=6), wiring=WIRINGS, offset=st.sampled_from([OFFSET, 0, -(10**6)]))
def test_records_of_arbitrary_field_values_equal_records_built_from_scratch(events, wiring, offset, compiled):
    same_drains([([raw for pair in events for raw in pair], {})], compiled, logs=wiring[0], traces=wiring[1], offset=offset)


@both_loops
@settings(max_examples=300)
@given(raws=st.lists(hot_events() | st.binary(max_size=200) | st.sampled_from(sorted(d.SIZES.values())).flatmap(lambda n: st.binary(min_size=n, max_size=n)), max_size=8))
def test_a_scan_accepts_and_counts_what_decode_drain_does(raws, compiled):
    scan = writer_for(compiled, max_pending=0, ppid_of=lambda pid: 0).scan(raws)
    events, bad = d.decode_drain(raws)
    assert scan.bad == bad
    assert [f if type(f) is tuple else d.LAYOUTS[d.parse_event(f).h.kind].struct.unpack(f) for f in scan.events] == events
    assert dict(scan.keys) == Counter((f[3], f[1]) for f in events) and dict(scan.kinds) == Counter(f[2] for f in events)


@settings(max_examples=300)
@given(st.lists(hot_events() | st.binary(max_size=200), max_size=8))
def test_decode_drain_accepts_what_parse_event_accepts(raws):
    events, bad = d.decode_drain(raws)
    parsed, reasons = [], {}
    for raw in raws:
        try:
            parsed.append(d.parse_event(raw))
        except d.DecodeError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
    assert bad == reasons
    assert [(f[0], f[1], f[2], f[3]) for f in events] == [(e.h.ts, e.h.cgroup_id, e.h.kind, e.h.pid) for e in parsed]
