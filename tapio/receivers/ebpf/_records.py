"""Decoded kernel events → OTLP log records and spans, as bytes. Pure: no I/O, no clocks.

What each event kind becomes (attribute keys and values, body, severity,
the span an event ends) is decided here and nowhere else; the receiver
hands in the events, their containers and the times, and gets bytes back.

Invariants:
- `RecordWriter.write` turns one drain into at most one list of log-record
  items and one of span items (`_encode.item` framing), in event order, one
  log record per event; a span is written only for an event that ends one
  (a process exit with a known start, a TCP close or a failed connect).
- A span and the log record of the event that ends it carry the same
  trace and span ids, drawn from the writer's ``ids`` source.
- State kept between drains: the executable and exec time of each process
  seen exec'ing, until its exit (at most ``max_pending``, oldest first out,
  evictions counted), and bounded caches of encoded attributes. Every input
  of a cached piece is part of its key, so a cached record equals one built
  from scratch.
- I/O the mapping needs (a parent pid the kernel did not see) goes through
  the ``ppid_of`` callable the receiver hands in.
"""

from __future__ import annotations

import errno
import random
import signal as signal_module
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from . import _decode as d
from tapio import otlpwire as enc
from ._containers import Container

SEV_INFO, SEV_WARN = SeverityNumber.SEVERITY_NUMBER_INFO, SeverityNumber.SEVERITY_NUMBER_WARN
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SPAN_KIND_CLIENT = Span.SPAN_KIND_INTERNAL, Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT
STATUS_CODE_ERROR = Status.STATUS_CODE_ERROR
#: tasks whose shared attributes are kept ready to copy; the cache is dropped when full
COMMON_CACHE_SIZE = 4096


def signal_name(sig: int) -> str:
    """``SIGTERM`` for 15; ``SIG64`` for a number this host's signal module does not name."""
    try:
        return signal_module.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


def errno_name(err: int) -> str:
    """``ENOENT`` for 2; the number as text for one this host does not name."""
    return errno.errorcode.get(err, str(err))


@dataclass
class Drain:
    """What `RecordWriter.write` made of one drain."""

    #: log-record items (`_encode.item`), one per event; None when logs are not wanted
    records: list[bytes] | None
    #: span items; None when traces are not wanted
    spans: list[bytes] | None
    #: processes that exited in this drain, as (pid, cgroup id)
    exited: list[tuple[int, int]] = field(default_factory=list)
    #: processes forgotten between exec and exit because ``max_pending`` was reached
    evicted: int = 0


class RecordWriter:
    """Turns decoded events into OTLP bytes, one drain at a time (see the module invariants).

    Args:
        max_pending: processes remembered between exec and exit (0: none).
        ppid_of: the parent pid of a live process (0 if unknown), asked
            only for an exec the kernel saw no fork for.
        ids: ``randbytes(n)`` for trace and span ids.
    """

    def __init__(self, *, max_pending: int, ppid_of: Callable[[int], int], ids: Callable[[int], bytes] = random.randbytes) -> None:
        self._max_pending = max_pending
        self._ppid_of = ppid_of
        self._ids = ids
        self._pending_exec: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._common_cache: dict[tuple, list[bytes]] = {}

    def write(
        self,
        events: list[d.Event],
        containers: dict[tuple[int, int], Container | None],
        *,
        offset: int,
        observed: int,
        logs: bool = True,
        traces: bool = True,
    ) -> Drain:
        """One drain's events → items.

        Args:
            events: decoded events in ring order.
            containers: the container of each event's (pid, cgroup id); a
                missing key means no container.
            offset: added to the kernel's CLOCK_BOOTTIME ns to get unix ns.
            observed: the drain's observed time (unix ns).
        """
        out = Drain([] if logs else None, [] if traces else None)
        for ev in events:
            self._event(ev, containers.get((ev.h.pid, ev.h.cgroup_id)), offset, observed, out)
        return out

    def _event(self, ev: d.Event, container: Container | None, offset: int, observed: int, out: Drain) -> None:
        h = ev.h
        records, spans = out.records, out.spans
        kind = d.KIND_NAMES[h.kind]
        ts = h.ts + offset
        #: (name, kind, start, end, failed, status message) of the span this event ends
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
                    name = "process " + (exe.rsplit("/", 1)[-1] if exe else h.comm)
                    failed = bool(ev.exit_signal) or ev.exit_code > 0
                    span = (name, SPAN_KIND_INTERNAL, start, ts, failed, body if failed else "")
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
                outbound = ev.states_seen & (1 << d.TCP_SYN_SENT)  # went through SYN_SENT: we connected
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

        pieces = self._common_attributes(h, kind, container) + enc.kv_pieces(extra)
        trace_id = span_id = b""
        if span is not None and spans is not None:
            name, span_kind, start, end, failed, message = span
            trace_id, span_id = self._ids(16), self._ids(8)
            spans.append(
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
            records.append(
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

    def _common_attributes(self, h: d.Header, kind: str, container: Container | None) -> list[bytes]:
        """The attributes every event of one task and kind shares, encoded once (`_encode.kv_pieces`; a new list each call)."""
        key = (h.pid, h.tid, h.uid, h.comm, h.cgroup_id, kind, container)
        found = self._common_cache.get(key)
        if found is not None:
            return list(found)
        pairs: list[tuple[str, Any]] = [
            ("tapio.ebpf.event", kind),
            ("process.pid", h.pid),
            ("thread.id", h.tid),
            ("process.user.id", h.uid),
            ("tapio.ebpf.comm", h.comm),
            ("tapio.ebpf.cgroup_id", h.cgroup_id),
        ]
        if container is not None:
            pairs.append(("container.id", container.id))
            if container.runtime:
                pairs.append(("container.runtime.name", container.runtime))
            if container.pod_uid:
                pairs.append(("k8s.pod.uid", container.pod_uid))
        if len(self._common_cache) >= COMMON_CACHE_SIZE:
            self._common_cache.clear()
        found = self._common_cache[key] = enc.kv_pieces(pairs)
        return list(found)

    def _remember_exec(self, pid: int, filename: str, ts: int) -> int:
        """Remember a process's executable until its exit; returns how many older ones were forgotten."""
        if self._max_pending <= 0:
            return 0
        self._pending_exec[pid] = (filename, ts)
        self._pending_exec.move_to_end(pid)
        evicted = 0
        while len(self._pending_exec) > self._max_pending:
            self._pending_exec.popitem(last=False)
            evicted += 1
        return evicted
