"""The ebpf event → OTLP mapping written the plain way, as the oracle for `_records.RecordWriter`.

This is the mapping before it was optimised (issue 15): each event is
decoded into its dataclass (`_decode.parse_event`), its attributes listed as
(key, value) pairs and encoded from scratch (`otlpwire.kv_pieces`,
`otlpwire.log_record`, `otlpwire.span`), nothing kept between events but the
exec state. The receiver's writer concatenates cached pieces instead; the
tests feed both the same drains and compare bytes. Ids are drawn as the
writer draws them: one ``ids(24 * events)`` pool per drain, at its first span,
16 bytes of trace id then 8 of span id per span.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from tapio.receivers.ebpf import _decode as d
from tapio import otlpwire as enc
from tapio.receivers.ebpf._containers import Container
from tapio.receivers.ebpf._records import SEV_INFO, SEV_WARN, SPAN_KIND_CLIENT, SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, STATUS_CODE_ERROR, Drain, errno_name, signal_name


class ReferenceWriter:
    """Same interface as `RecordWriter`, but ``write`` takes raw records (it decodes them itself)."""

    def __init__(self, *, max_pending: int, ppid_of: Callable[[int], int], ids: Callable[[int], bytes]) -> None:
        self._max_pending = max_pending
        self._ppid_of = ppid_of
        self._ids = ids
        self._pending_exec: OrderedDict[int, tuple[str, int]] = OrderedDict()

    def write(self, raws: list[bytes], containers: dict, *, offset: int, observed: int, logs: bool = True, traces: bool = True) -> Drain:
        events = [d.parse_event(raw) for raw in raws]
        out = Drain({} if logs else None, {} if traces else None)
        self._pool, self._at, self._events = b"", 0, len(events)
        for ev in events:
            self._event(ev, containers.get((ev.h.pid, ev.h.cgroup_id)), offset, observed, out)
        return out

    def _next_ids(self) -> tuple[bytes, bytes]:
        if self._at + 24 > len(self._pool):
            self._pool, self._at = self._ids(24 * self._events), 0
        at, self._at = self._at, self._at + 24
        return self._pool[at : at + 16], self._pool[at + 16 : at + 24]

    def _event(self, ev: d.Event, container: Container | None, offset: int, observed: int, out: Drain) -> None:
        h = ev.h
        records, spans = out.records, out.spans
        kind = d.KIND_NAMES[h.kind]
        ts = h.ts + offset
        span: tuple[str, int, int, int, bool, str] | None = None
        severity, body = SEV_INFO, kind
        extra: list[tuple[str, Any]] = []
        if isinstance(ev, d.OpenEvent):
            extra = [("file.path", ev.path), ("tapio.ebpf.open.flags", ev.flags), ("tapio.ebpf.open.flags_text", d.open_flags_text(ev.flags))]
            if ev.ret >= 0:
                extra.append(("tapio.ebpf.open.fd", ev.ret))
                body = f"open {ev.path}"
            else:
                err = errno_name(-ev.ret)
                extra += [("error.type", err), ("tapio.ebpf.open.errno", -ev.ret)]
                body = f"open {ev.path}: {err}"
            if ev.flags & d.O_CREAT:
                extra.append(("tapio.ebpf.open.mode", ev.mode))
        elif isinstance(ev, d.ExecEvent):
            extra = [
                ("process.parent_pid", ev.ppid or self._ppid_of(h.pid)),
                ("process.executable.path", ev.filename),
                ("process.executable.name", ev.filename.rsplit("/", 1)[-1]),
                ("process.command_args", ev.argv),
            ]
            if ev.args_truncated:
                extra.append(("tapio.ebpf.exec.args_truncated", True))
            if ev.old_pid != h.pid:
                extra.append(("tapio.ebpf.exec.old_pid", ev.old_pid))
            body = f"exec {ev.filename}"
            out.evicted += self._remember_exec(h.pid, ev.filename, ts)
        elif isinstance(ev, d.ExitEvent):
            if ev.ppid:
                extra.append(("process.parent_pid", ev.ppid))
            if ev.exit_signal:
                extra.append(("tapio.ebpf.exit.signal", signal_name(ev.exit_signal)))
                body = f"exit {h.comm}: killed by {signal_name(ev.exit_signal)}"
            elif ev.exit_code >= 0:
                extra.append(("process.exit.code", ev.exit_code))
                body = f"exit {h.comm}: code {ev.exit_code}"
            else:
                body = f"exit {h.comm}"
            exe, exec_ts = self._pending_exec.pop(h.pid, ("", 0))
            if exe:
                extra.append(("process.executable.path", exe))
            start = ev.start_ts + offset if ev.start_ts else exec_ts
            if start:
                extra.append(("tapio.ebpf.exit.lifetime_ns", max(0, ts - start)))
                if spans is not None:
                    failed = bool(ev.exit_signal) or ev.exit_code > 0
                    span = ("process " + (exe.rsplit("/", 1)[-1] if exe else h.comm), SPAN_KIND_INTERNAL, start, ts, failed, body if failed else "")
            out.exited.append((h.pid, h.cgroup_id))
        elif isinstance(ev, d.TcpEvent):
            event = d.TCP_EVENT_NAMES[ev.event]
            extra = [
                ("network.transport", "tcp"),
                ("network.type", "ipv4" if ev.family == d.AF_INET else "ipv6"),
                ("network.local.address", ev.saddr),
                ("network.local.port", ev.sport),
                ("network.peer.address", ev.daddr),
                ("network.peer.port", ev.dport),
                ("tapio.ebpf.tcp.event", event),
                ("tapio.ebpf.tcp.old_state", d.TCP_STATES.get(ev.oldstate, str(ev.oldstate))),
                ("tapio.ebpf.tcp.new_state", d.TCP_STATES.get(ev.newstate, str(ev.newstate))),
                ("tapio.ebpf.tcp.states", d.states_list(ev.states_seen)),
                ("tapio.ebpf.tcp.duration_ns", max(0, h.ts - ev.start_ts)),
                ("tapio.ebpf.tcp.socket", f"{ev.sock:x}"),
            ]
            if ev.fd >= 0:
                extra.append(("tapio.ebpf.tcp.fd", ev.fd))
            failed = ev.event == d.TCP_CONNECT and ev.newstate == d.TCP_CLOSED
            peer = f"[{ev.daddr}]:{ev.dport}" if ev.family == d.AF_INET6 else f"{ev.daddr}:{ev.dport}"
            body = f"tcp {event} {peer}" + (" failed" if failed else "")
            if spans is not None and (ev.event == d.TCP_CLOSE or failed):
                outbound = ev.states_seen & (1 << d.TCP_SYN_SENT)
                span = (
                    f"tcp {'connect' if outbound else 'accept'} {peer}",
                    SPAN_KIND_CLIENT if outbound else SPAN_KIND_SERVER,
                    ev.start_ts + offset,
                    ts,
                    failed,
                    "connection failed" if failed else "",
                )
        elif isinstance(ev, d.OomEvent):
            severity = SEV_WARN
            extra = [
                ("tapio.ebpf.oom.total_vm_kb", ev.total_vm_kb),
                ("tapio.ebpf.oom.anon_rss_kb", ev.anon_rss_kb),
                ("tapio.ebpf.oom.file_rss_kb", ev.file_rss_kb),
                ("tapio.ebpf.oom.shmem_rss_kb", ev.shmem_rss_kb),
                ("tapio.ebpf.oom.pgtables_kb", ev.pgtables_kb),
                ("tapio.ebpf.oom.score_adj", ev.oom_score_adj),
                ("tapio.ebpf.oom.victim_uid", ev.victim_uid),
                ("tapio.ebpf.oom.marked_time_unix_nano", ev.mark_ts + offset),
            ]
            body = f"OOM kill of {h.comm} (pid {h.pid}), anon rss {ev.anon_rss_kb} kB"
        elif isinstance(ev, d.SignalEvent):
            extra = [
                ("tapio.ebpf.signal.number", ev.sig),
                ("tapio.ebpf.signal.name", signal_name(ev.sig)),
                ("tapio.ebpf.signal.target_pid", ev.target_pid),
                ("tapio.ebpf.signal.target_comm", ev.target_comm),
                ("tapio.ebpf.signal.code", ev.code),
                ("tapio.ebpf.signal.result", ev.result),
            ]
            body = f"signal {signal_name(ev.sig)} from {h.pid} to {ev.target_pid}"

        common: list[tuple[str, Any]] = [
            ("tapio.ebpf.event", kind),
            ("process.pid", h.pid),
            ("thread.id", h.tid),
            ("process.user.id", h.uid),
            ("tapio.ebpf.comm", h.comm),
            ("tapio.ebpf.cgroup_id", h.cgroup_id),
        ]
        boxed: list[tuple[str, Any]] = []
        if container is not None:
            boxed.append(("container.id", container.id))
            if container.runtime:
                boxed.append(("container.runtime.name", container.runtime))
            if container.pod_uid:
                boxed.append(("k8s.pod.uid", container.pod_uid))
        group = tuple(enc.kv_pieces(boxed))  # items are grouped by their container's attributes
        pieces = enc.kv_pieces(common + boxed + extra)
        trace_id = span_id = b""
        if span is not None and spans is not None:
            name, span_kind, start, end, failed, message = span
            trace_id, span_id = self._next_ids()
            spans.setdefault(group, []).append(
                enc.item(
                    enc.span(
                        trace_id=trace_id,
                        span_id=span_id,
                        name=name,
                        kind=span_kind,
                        start_time_unix_nano=start,
                        end_time_unix_nano=max(start, end),
                        attrs=enc.frame(enc.T_ATTR_SPAN, pieces),
                        status_code=STATUS_CODE_ERROR if failed else 0,
                        status_message=message if failed else "",
                    )
                )
            )
        if records is not None:
            records.setdefault(group, []).append(
                enc.item(
                    enc.log_record(
                        time_unix_nano=ts,
                        observed_time_unix_nano=observed,
                        severity_number=severity,
                        severity_text="WARN" if severity == SEV_WARN else "INFO",
                        body=body,
                        attrs=enc.frame(enc.T_ATTR_LOG, pieces),
                        event_name=f"tapio.ebpf.{kind}",
                        trace_id=trace_id,
                        span_id=span_id,
                    )
                )
            )

    def _remember_exec(self, pid: int, filename: str, ts: int) -> int:
        if self._max_pending <= 0:
            return 0
        self._pending_exec[pid] = (filename, ts)
        self._pending_exec.move_to_end(pid)
        evicted = 0
        while len(self._pending_exec) > self._max_pending:
            self._pending_exec.popitem(last=False)
            evicted += 1
        return evicted
