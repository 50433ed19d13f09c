"""The ebpf receiver's event → OTLP mapping (`_records`), fed with raw event bytes: no kernel, no receiver."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.logs.v1.logs_pb2 import ScopeLogs
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status

from tapio.receivers.ebpf import _decode as d
from tapio.receivers.ebpf._containers import Container
from tapio.receivers.ebpf._records import RecordWriter

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


def counting_ids():
    n = 0

    def ids(size: int) -> bytes:
        nonlocal n
        n += 1
        return n.to_bytes(size, "big")

    return ids


def write(raws: list[bytes], containers: dict | None = None, writer: RecordWriter | None = None):
    writer = writer or RecordWriter(max_pending=16, ppid_of=lambda pid: 4242, ids=counting_ids())
    drain = writer.write([d.parse_event(r) for r in raws], containers or {}, offset=OFFSET, observed=OBSERVED)
    records = ScopeLogs.FromString(b"".join(drain.records)).log_records
    spans = ScopeSpans.FromString(b"".join(drain.spans)).spans
    return drain, list(records), list(spans)


def attrs(item: Any) -> dict[str, Any]:
    out = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = [v.string_value for v in kv.value.array_value.values] if kind == "array_value" else getattr(kv.value, kind)
    return out


def test_an_open_names_path_flags_fd_or_errno():
    _, (ok, failed), spans = write([raw_open(b"/etc/x", 3, flags=0o1101, mode=0o644), raw_open(b"/nope", -2)])
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


def test_exec_then_exit_makes_a_process_span_named_by_the_executable():
    raws = [raw_exec(b"/usr/bin/sleep", [b"sleep", b"1"], ppid=0, ts=100, pid=7), raw_exit(code=3, ts=5100, pid=7, comm=b"sleep")]
    drain, (ex, gone), (span,) = write(raws)
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


def test_an_exit_by_signal_and_an_exit_without_a_known_start():
    _, (killed, bare), spans = write([raw_exit(sig=9, start_ts=10, pid=8), raw_exit(pid=9)])
    assert killed.body.string_value == "exit curl: killed by SIGKILL" and attrs(killed)["tapio.ebpf.exit.signal"] == "SIGKILL"
    assert [s.name for s in spans] == ["process curl"], "no start, no span"
    assert "tapio.ebpf.exit.lifetime_ns" not in attrs(bare)


def test_tcp_close_and_a_failed_connect_end_spans():
    syn_sent, established, close = 1 << d.TCP_SYN_SENT, 1 << d.TCP_ESTABLISHED, 1 << d.TCP_CLOSED
    raws = [
        raw_tcp(d.TCP_CONNECT, d.TCP_SYN_SENT, d.TCP_ESTABLISHED, syn_sent | established, ts=900),
        raw_tcp(d.TCP_CLOSE, 9, d.TCP_CLOSED, syn_sent | established | close, ts=2000),
        raw_tcp(d.TCP_ACCEPT, d.TCP_SYN_RECV, d.TCP_ESTABLISHED, 1 << d.TCP_SYN_RECV | established, fd=5, sock=0xABC),
        raw_tcp(d.TCP_CONNECT, d.TCP_SYN_SENT, d.TCP_CLOSED, syn_sent | close, dport=81),
    ]
    _, (conn, closed, acc, refused), (span_close, span_refused) = write(raws)
    a = attrs(closed)
    assert closed.body.string_value == "tcp close 127.0.0.1:80"
    assert a["tapio.ebpf.tcp.states"] == ["ESTABLISHED", "SYN_SENT", "CLOSE"] and a["tapio.ebpf.tcp.duration_ns"] == 1500
    assert a["network.type"] == "ipv4" and a["tapio.ebpf.tcp.old_state"] == "LAST_ACK" and a["tapio.ebpf.tcp.socket"] == "ffff8888"
    assert attrs(acc)["tapio.ebpf.tcp.fd"] == 5 and "tapio.ebpf.tcp.fd" not in attrs(conn)
    assert span_close.name == "tcp connect 127.0.0.1:80" and span_close.kind == Span.SPAN_KIND_CLIENT and span_close.status.code == 0
    assert refused.body.string_value == "tcp connect 127.0.0.1:81 failed"
    assert span_refused.status.message == "connection failed" and (refused.span_id, closed.span_id) == (span_refused.span_id, span_close.span_id)


def test_signal_and_oom():
    _, (sig, oom), _ = write([raw_signal(15, 77), raw_oom(5000, pid=66, comm=b"hog")])
    assert sig.body.string_value == "signal SIGTERM from 42 to 77"
    assert attrs(sig)["tapio.ebpf.signal.name"] == "SIGTERM" and attrs(sig)["tapio.ebpf.signal.target_comm"] == "sleep"
    assert oom.severity_text == "WARN" and oom.severity_number == 13
    assert oom.body.string_value == "OOM kill of hog (pid 66), anon rss 5000 kB"
    assert attrs(oom)["tapio.ebpf.oom.score_adj"] == -998 and attrs(oom)["tapio.ebpf.oom.marked_time_unix_nano"] == OFFSET + 900


def test_containers_are_attached_by_pid_and_cgroup():
    box = Container(CID, "containerd", POD)
    _, (inside, outside), _ = write([raw_open(b"/a", 3, pid=10, cgroup=5), raw_open(b"/a", 3, pid=11, cgroup=5)], {(10, 5): box})
    a = attrs(inside)
    assert (a["container.id"], a["container.runtime.name"], a["k8s.pod.uid"]) == (CID, "containerd", POD)
    assert "container.id" not in attrs(outside)


def test_pending_execs_are_bounded_and_evictions_counted():
    writer = RecordWriter(max_pending=2, ppid_of=lambda pid: 0, ids=counting_ids())
    drain, _, _ = write([raw_exec(b"/bin/true", [b"true"], pid=p) for p in (1, 2, 3)], writer=writer)
    assert drain.evicted == 1
    _, (first, last), _ = write([raw_exit(pid=1), raw_exit(pid=3)], writer=writer)
    assert "process.executable.path" not in attrs(first) and attrs(last)["process.executable.path"] == "/bin/true"


def test_logs_only_or_traces_only():
    writer = RecordWriter(max_pending=4, ppid_of=lambda pid: 0)
    events = [d.parse_event(raw_exit(start_ts=1))]
    assert writer.write(events, {}, offset=0, observed=0, traces=False).spans is None
    only = writer.write(events, {}, offset=0, observed=0, logs=False)
    assert only.records is None and len(only.spans) == 1
