"""Decoded kernel events → OTLP log records and spans, as bytes. Pure: no I/O, no clocks.

What each event kind becomes (attribute keys and values, body, severity,
the span an event ends) is decided here and nowhere else; the receiver
hands in the events (`_decode.decode_drain` field tuples), their containers
and the times, and gets the bytes of one drain's items back.

Invariants:
- `RecordWriter.write` turns one drain into log-record items and span items
  (`otlpwire.item` framing) grouped by container (its attribute pieces; ``()``
  for host processes), groups in the order of their first event, items in
  event order within a group; one log record per event; a span is written
  only for an event that ends one (a process exit with a known start, a TCP
  close or a failed connect). The receiver puts each group under a resource
  of its own.
- A span and the log record of the event that ends it carry the same
  trace and span ids, drawn from the writer's ``ids`` source.
- The bytes are what `otlpwire.log_record` / `otlpwire.span` write from the
  same values: fields in field-number order, attributes in the order listed
  here. Most of a record is concatenated from cached pieces (the attributes
  one task's events share, an address, a path with its flags, the TCP state
  names); every input a piece is made from is part of its key, so a record
  equals one built from scratch (tests/ebpf_reference.py, which keeps
  nothing between events, is how the tests check it).
- State kept between drains: the executable and exec time of each process
  seen exec'ing, until its exit (at most ``max_pending``, oldest first out,
  evictions counted), and the caches, each emptied when it reaches
  `CACHE_SIZE` entries.
- I/O the mapping needs (a parent pid the kernel did not see) goes through
  the ``ppid_of`` callable the receiver hands in.
- Two paths, one output: when the compiled helper (_hotloop.c) is built, a
  drain is checked and counted in C (`RecordWriter.scan`) and its TCP and
  open events are written in C from the same cached pieces (a piece it
  lacks is made by this module's method for it); every other event, and
  every event without the helper, is written by the loop here. The tests
  run both paths against tests/ebpf_reference.py.
"""

from __future__ import annotations

import errno
import random
import signal as signal_module
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable

from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tapio import otlpwire as enc

from . import _decode as d
from ._containers import Container

SEV_INFO, SEV_WARN = SeverityNumber.SEVERITY_NUMBER_INFO, SeverityNumber.SEVERITY_NUMBER_WARN
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SPAN_KIND_CLIENT = Span.SPAN_KIND_INTERNAL, Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT
STATUS_CODE_ERROR = Status.STATUS_CODE_ERROR
#: entries in each cache of encoded pieces; a full cache is emptied (few distinct values repeat: tasks, addresses, paths)
CACHE_SIZE = 4096
#: trace id and span id bytes of one span
_ID_BYTES = 16 + 8

_TL, _TS = enc.T_ATTR_LOG, enc.T_ATTR_SPAN
_SMALL = [bytes([i]) for i in range(128)]
_FIXED64 = struct.Struct("<Q").pack
_MASK64 = (1 << 64) - 1
_varint = enc.varint


def signal_name(sig: int) -> str:
    """``SIGTERM`` for 15; ``SIG64`` for a number this host's signal module does not name."""
    try:
        return signal_module.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


def errno_name(err: int) -> str:
    """``ENOENT`` for 2; the number as text for one this host does not name."""
    return errno.errorcode.get(err, str(err))


def _text(raw: bytes) -> bytes:
    """A NUL-terminated C string field as the UTF-8 bytes written for it (invalid bytes replaced)."""
    i = raw.find(b"\0")
    if i >= 0:
        raw = raw[:i]
    if raw.isascii():
        return raw
    return raw.decode("utf-8", "replace").encode()


def _ld(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else _varint(n)) + payload


def _body(text: bytes) -> bytes:
    """LogRecord.body (field 5) holding AnyValue.string_value ``text``."""
    return _ld(b"\x2a", _ld(b"\x0a", text))


def _heads(key: str) -> list[bytes]:
    return enc.int_piece_heads(key)


# int attributes written per event: their pieces' heads by varint length
_PID, _TID, _UID, _CGROUP = _heads("process.pid"), _heads("thread.id"), _heads("process.user.id"), _heads("tapio.ebpf.cgroup_id")
_LPORT, _PPORT = _heads("network.local.port"), _heads("network.peer.port")
_DURATION, _TCP_FD = _heads("tapio.ebpf.tcp.duration_ns"), _heads("tapio.ebpf.tcp.fd")
_OPEN_FD, _OPEN_MODE, _OPEN_FLAGS, _OPEN_ERRNO = (
    _heads("tapio.ebpf.open.fd"), _heads("tapio.ebpf.open.mode"), _heads("tapio.ebpf.open.flags"), _heads("tapio.ebpf.open.errno"),
)
_PARENT, _EXIT_CODE, _LIFETIME = _heads("process.parent_pid"), _heads("process.exit.code"), _heads("tapio.ebpf.exit.lifetime_ns")
_KIND_PIECE = {kind: enc.str_piece("tapio.ebpf.event", name.encode()) for kind, name in d.KIND_NAMES.items()}
_EVENT_NAME = {kind: _ld(b"\x62", f"tapio.ebpf.{name}".encode()) for kind, name in d.KIND_NAMES.items()}
#: tapio.ebpf.tcp.socket by text length (a u64 in hex: at most 16 digits)
_SOCKET = [enc.str_piece("tapio.ebpf.tcp.socket", b"x" * n)[:-n or None] for n in range(17)]
_TRANSPORT = enc.str_piece("network.transport", b"tcp")
_NET_TYPE = {d.AF_INET: enc.str_piece("network.type", b"ipv4"), d.AF_INET6: enc.str_piece("network.type", b"ipv6")}
_NET_TYPE_OTHER = _NET_TYPE[d.AF_INET6]  # as before: anything but AF_INET is reported as ipv6
_SEVERITY = {
    SEV_INFO: b"\x10" + _varint(SEV_INFO) + _ld(b"\x1a", b"INFO"),
    SEV_WARN: b"\x10" + _varint(SEV_WARN) + _ld(b"\x1a", b"WARN"),
}
#: "tcp connect " ...: a TCP body up to the peer
_TCP_EVENT_TEXT = {num: b"tcp %s " % name.encode() for num, name in d.TCP_EVENT_NAMES.items()}


#: the compiled path's layout fields (_hotloop.c's LY_* after the sizes): (layout, field) in order
_LAYOUT_FIELDS = (
    *((d.HDR, name) for name in ("ts", "cgroup_id", "kind", "pid", "tid", "uid", "comm")),
    *((d.TCP, name) for name in ("sock", "start_ts", "event", "family", "sport", "dport", "oldstate", "newstate", "states_seen", "fd", "saddr", "daddr")),
    *((d.OPEN, name) for name in ("ret", "flags", "mode", "path")),
)
#: record sizes by kind, then the offsets of `_LAYOUT_FIELDS`, as _hotloop.c reads them
LAYOUT = (
    *(d.SIZES[kind] for kind in (d.EV_EXEC, d.EV_EXIT, d.EV_OPEN, d.EV_TCP, d.EV_OOM, d.EV_SIGNAL)),
    *(layout.offsets[name][0] for layout, name in _LAYOUT_FIELDS),
)
_LAYOUT_CODES = "".join(dict(layout.fields)[name] for layout, name in _LAYOUT_FIELDS)


def _load_compiled() -> tuple[Any, str]:
    """The compiled drain path (tapio/receivers/ebpf/_hotloop.c), or None and why it is not used."""
    try:
        from . import _hotloop  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the compiled record writer is not built ({exc}; scripts/setup.sh builds it)"
    ours = {
        "EV_OPEN": d.EV_OPEN, "EV_TCP": d.EV_TCP, "TCP_CONNECT": d.TCP_CONNECT, "TCP_ACCEPT": d.TCP_ACCEPT, "TCP_CLOSE": d.TCP_CLOSE,
        "TCP_SYN_SENT": d.TCP_SYN_SENT, "TCP_CLOSED": d.TCP_CLOSED, "O_CREAT": d.O_CREAT,
        "SPAN_KIND_SERVER": SPAN_KIND_SERVER, "SPAN_KIND_CLIENT": SPAN_KIND_CLIENT, "STATUS_CODE_ERROR": STATUS_CODE_ERROR,
        "T_ATTR_LOG": _TL[0], "T_ATTR_SPAN": _TS[0], "CONTEXT": 23, "LAYOUT": len(LAYOUT), "COMM_SIZE": d.HDR.offsets["comm"][1],
        "LAYOUT_CODES": _LAYOUT_CODES,
    }
    theirs = getattr(_hotloop, "ASSUMES", {})
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    if differ:
        return None, f"the compiled record writer was built from another version of the event layout ({', '.join(differ)} differ; scripts/setup.sh rebuilds it)"
    return _hotloop, ""


#: the compiled drain path (its ``scan`` and ``run``), or None; and why it is None
COMPILED, COMPILED_MISSING = _load_compiled()
#: a field tuple from a record `_decode.decode_drain` accepts, by its size
_UNPACK = {layout.size: layout.struct.unpack for layout in d.LAYOUTS.values()}


@dataclass
class Scan:
    """A drain's records checked and counted (`RecordWriter.scan`)."""

    #: what `RecordWriter.write` takes: field tuples, or (compiled) the accepted records themselves
    events: list
    #: events by (pid, cgroup id)
    keys: dict[tuple[int, int], int]
    #: events by kind
    kinds: dict[int, int]
    #: refused records by reason (`_decode.BAD_REASONS`)
    bad: dict[str, int]


#: (pid, cgroup id) and kind of a field tuple
_PID_CGROUP, _KIND = itemgetter(3, 1), itemgetter(2)


def _int(heads: list[bytes], value: int) -> bytes:
    v = _varint(value)
    return heads[len(v)] + v


@dataclass
class Drain:
    """What `RecordWriter.write` made of one drain."""

    #: log-record items (`otlpwire.item` framing), one per event, by the container's attribute
    #: pieces (``()``: host processes) in the order each container's first event came; None when
    #: logs are not wanted
    records: dict[tuple[bytes, ...], list[bytes]] | None
    #: span items, grouped the same way; None when traces are not wanted
    spans: dict[tuple[bytes, ...], list[bytes]] | None
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
        ids: ``randbytes(n)``, the source of trace and span ids (called
            once per drain that ends spans).
        compiled: write the TCP and open events with the compiled loop
            when it is built (`COMPILED`); the bytes are the same either way.
    """

    def __init__(
        self, *, max_pending: int, ppid_of: Callable[[int], int], ids: Callable[[int], bytes] = random.randbytes, compiled: bool = True
    ) -> None:
        self._max_pending = max_pending
        self._ppid_of = ppid_of
        self._ids = ids
        self._pending_exec: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        #: (pid, tid, uid, raw comm, cgroup id, kind, container pieces) -> (log attrs, span attrs) of the attributes one task's events share
        self._common: dict = {}
        #: Container -> its pieces
        self._containers: dict = {}
        #: (family, raw address) -> (network.local.address piece, network.peer.address piece, text as in a body)
        self._addresses: dict = {}
        #: (family, raw local address) -> (log attrs, span attrs) from network.transport to network.local.address
        self._locals: dict = {}
        #: (family, raw peer address) -> (log attrs, span attrs) of network.peer.address, the address as in a body ("[::1]" for IPv6)
        self._peers: dict = {}
        #: port -> (network.local.port piece, network.peer.port piece)
        self._ports: dict = {}
        #: (tcp event, old state, new state, states seen) -> (log attrs, span attrs) from tapio.ebpf.tcp.event to .states
        self._tcp_states: dict = {}
        #: (path cut at its NUL, flags) -> (log attrs from file.path to the flags text, path text, body when the open succeeded)
        self._paths: dict = {}
        #: failed open's return value (-errno) -> (log attrs error.type and tapio.ebpf.open.errno, the errno's name)
        self._errors: dict = {}
        self._caches = [self._common, self._containers, self._addresses, self._locals, self._peers, self._ports, self._tcp_states, self._paths, self._errors]
        #: the compiled loop and what it reads: the caches and constant pieces, in _hotloop.c's CX_* order
        self._compiled = COMPILED if compiled else None
        self._fast = COMPILED.run if self._compiled is not None else None
        self._fast_context = (
            self._common, self._locals, self._peers, self._tcp_states, self._paths, self._errors, _SEVERITY[SEV_INFO],
            _LPORT, _PPORT, _DURATION, _SOCKET, _TCP_FD, _OPEN_FD, _OPEN_MODE,
            (b"", *(_TCP_EVENT_TEXT[e] for e in (d.TCP_CONNECT, d.TCP_ACCEPT, d.TCP_CLOSE))), (),
            self._shared, self._local, self._peer, self._tcp_shape, self._path, self._error, LAYOUT,
        )

    @property
    def compiled(self) -> bool:
        """Whether the compiled loop writes this writer's TCP and open events."""
        return self._fast is not None

    def scan(self, raws: list[bytes]) -> Scan:
        """A drain's records as `write` takes them, counted; what `_decode.decode_drain` refuses, counted by reason."""
        if self._compiled is not None:
            events, keys, kinds, refused = self._compiled.scan(raws, LAYOUT)
            return Scan(events, keys, kinds, d.bad_reasons(refused))
        events, bad = d.decode_drain(raws)
        return Scan(events, Counter(map(_PID_CGROUP, events)), Counter(map(_KIND, events)), bad)

    def write(
        self,
        events: list[tuple],
        containers: dict[tuple[int, int], Container | None],
        *,
        offset: int,
        observed: int,
        logs: bool = True,
        traces: bool = True,
    ) -> Drain:
        """One drain's events → items.

        Args:
            events: `scan`'s events (field tuples, or records when compiled), in ring order.
            containers: the container of each event's (pid, cgroup id); a
                missing key means no container.
            offset: added to the kernel's CLOCK_BOOTTIME ns to get unix ns.
            observed: the drain's observed time (unix ns).
        """
        for cache in self._caches:
            if len(cache) >= CACHE_SIZE:
                cache.clear()
        records: dict[tuple[bytes, ...], list[bytes]] | None = {} if logs else None
        spans: dict[tuple[bytes, ...], list[bytes]] | None = {} if traces else None
        out = Drain(records, spans)
        observed_field = b"\x59" + _FIXED64(observed & _MASK64) if observed else b""
        self._id_pool = b""
        self._id_at = 0
        tail = {kind: observed_field + name for kind, name in _EVENT_NAME.items()}
        write_one = {d.EV_EXEC: self._exec, d.EV_EXIT: self._exit, d.EV_OOM: self._oom, d.EV_SIGNAL: self._signal}
        # the two kinds most events of a busy node are (TCP transitions, opens) are written out in the loop
        ev_tcp, ev_open, tcp_close, tcp_connect, tcp_closed, o_creat = d.EV_TCP, d.EV_OPEN, d.TCP_CLOSE, d.TCP_CONNECT, d.TCP_CLOSED, d.O_CREAT
        common, locals_, peers, ports, shapes, paths, errors = self._common, self._locals, self._peers, self._ports, self._tcp_states, self._paths, self._errors
        # a container's pieces, once per (pid, cgroup id) of the drain: they key the shared attributes
        pieces_of = {key: self._container_pieces(c) for key, c in containers.items() if c is not None}
        container_of = pieces_of.get
        sev_info, tl, ts_tag, fixed64, small, varint, mask64 = _SEVERITY[SEV_INFO], _TL, _TS, _FIXED64, _SMALL, _varint, _MASK64
        duration_heads, socket_heads, fd_heads, event_text, open_fd_heads = _DURATION, _SOCKET, _TCP_FD, _TCP_EVENT_TEXT, _OPEN_FD
        with_spans = spans is not None
        # the compiled loop writes the TCP and open events (asking the methods below for the pieces it
        # does not find) and stops at any other event, which the loop below writes before handing back
        fast = self._fast
        if fast is not None:
            fast_drain = (records, spans, pieces_of, offset, tail[ev_tcp], tail[ev_open])
        last: tuple[bytes, ...] | None = None
        append = None
        i, n_events = 0, len(events)
        while i < n_events:
            if fast is not None:
                i, self._id_at = fast(events, i, self._fast_context, fast_drain, self._id_pool, self._id_at)
                if i >= n_events:
                    break
            f = events[i]
            i += 1
            if type(f) is bytes:  # a record the compiled loop left to this one
                f = _UNPACK[len(f)](f)
            kind = f[2]
            if kind == ev_tcp:
                kts, cgroup_id, _, pid, tid, uid, comm, sock, start_ts, event, family, sport, dport, _, old, new, states, fd, saddr, daddr = f
            else:
                kts, cgroup_id, _, pid, tid, uid, comm = f[:7]
            container = container_of((pid, cgroup_id), ())
            if container is not last:  # a drain mostly holds runs of one container's events
                last = container
                if records is not None:
                    group = records.get(container)
                    if group is None:
                        group = records[container] = []
                    append = group.append
            key = (pid, tid, uid, comm, cgroup_id, kind, container)
            shared = common.get(key)
            if shared is None:
                shared = common[key] = self._shared(kind, pid, tid, uid, comm, cgroup_id, container)
            ts = kts + offset
            span = None
            if kind == ev_tcp:
                local = locals_.get((family, saddr)) or self._local(family, saddr)
                peer = peers.get((family, daddr)) or self._peer(family, daddr)
                lport = (ports.get(sport) or self._port(sport))[0]
                pport = (ports.get(dport) or self._port(dport))[1]
                shape = shapes.get((event, old, new, states)) or self._tcp_shape(event, old, new, states)
                duration = kts - start_ts
                v = varint(duration) if duration > 0 else b"\x00"
                sock_text = b"%x" % sock
                numbers = (duration_heads[len(v)] + v, socket_heads[len(sock_text)] + sock_text)
                if fd >= 0:
                    v = small[fd] if fd < 128 else varint(fd)
                    numbers += (fd_heads[len(v)] + v,)
                failed = event == tcp_connect and new == tcp_closed
                peer_text = b"%s:%d" % (peer[2], dport)
                text = event_text[event] + peer_text + b" failed" if failed else event_text[event] + peer_text
                n = len(text)
                body = b"\x2a" + small[n + 2] + b"\x0a" + small[n] + text if n < 126 else _body(text)
                attrs = (shared[0], local[0], tl, lport, peer[0], tl, pport, shape[0], tl, tl.join(numbers))
                severity = sev_info
                if with_spans and (event == tcp_close or failed):
                    outbound = states & (1 << d.TCP_SYN_SENT)  # went through SYN_SENT: we connected
                    span = (
                        (b"tcp connect " if outbound else b"tcp accept ") + peer_text,
                        SPAN_KIND_CLIENT if outbound else SPAN_KIND_SERVER,
                        start_ts + offset,
                        ts,
                        b"connection failed" if failed else b"",
                    )
                    span_attrs = b"".join((shared[1], local[1], ts_tag, lport, peer[1], ts_tag, pport, shape[1], ts_tag, ts_tag.join(numbers)))
            elif kind == ev_open:
                ret, flags, mode, raw_path = f[7], f[8], f[9], f[12]
                found = paths.get((cut := raw_path.partition(b"\0")[0], flags)) or self._path(cut, flags)
                if ret >= 0:
                    v = small[ret] if ret < 128 else varint(ret)
                    numbers = tl + open_fd_heads[len(v)] + v
                    body = found[2]
                else:
                    numbers, err = errors.get(ret) or self._error(ret)
                    body = _body(b"open %s: %s" % (found[1], err))
                if flags & o_creat:
                    numbers += tl + _int(_OPEN_MODE, mode)
                attrs = (shared[0], found[0], numbers)
                severity = sev_info
            else:
                severity, body, extra, span = write_one[kind](f, ts, offset, out)
                severity = _SEVERITY[severity]
                attrs = (shared[0], tl, tl.join(extra)) if extra else (shared[0],)
                if span is not None and with_spans:
                    span_attrs = shared[1] + ts_tag + ts_tag.join(extra) if extra else shared[1]
            head = b"\x09" + fixed64(ts & mask64) if ts else b""
            if span is not None and with_spans:
                trace_id, span_id = self._next_ids(n_events)
                message = self._span(span, trace_id, span_id, span_attrs)
                n = len(message)
                spans.setdefault(container, []).append(b"\x12" + (small[n] if n < 128 else varint(n)) + message)
                if records is None:
                    continue
                rec = b"".join((head, severity, body, *attrs, b"\x4a\x10", trace_id, b"\x52\x08", span_id, tail[kind]))
            elif records is None:
                continue
            else:
                rec = b"".join((head, severity, body, *attrs, tail[kind]))
            n = len(rec)
            append(b"\x12" + (small[n] if n < 128 else varint(n)) + rec)
        return out

    # -- what the rarer kinds add: (severity, body field, extra attribute pieces, span or None)

    def _exec(self, f: tuple, ts: int, offset: int, out: Drain) -> tuple:
        pid = f[3]
        ppid, old_pid, argv_len, argc, truncated, filename = f[7], f[8], f[9], f[10], f[11], _text(f[13])
        argv = d.parse_argv(f[14], argv_len)[:argc] if argc else []
        name = filename.decode()
        pairs: list[tuple[str, Any]] = [
            ("process.parent_pid", ppid or self._ppid_of(pid)),
            ("process.executable.path", name),
            ("process.executable.name", name.rsplit("/", 1)[-1]),
            ("process.command_args", argv),
        ]
        if truncated:
            pairs.append(("tapio.ebpf.exec.args_truncated", True))
        if old_pid != pid:
            pairs.append(("tapio.ebpf.exec.old_pid", old_pid))
        out.evicted += self._remember_exec(pid, filename, ts)
        return SEV_INFO, _body(b"exec " + filename), enc.kv_pieces(pairs), None

    def _exit(self, f: tuple, ts: int, offset: int, out: Drain) -> tuple:
        pid, cgroup_id, comm = f[3], f[1], _text(f[6])
        start_ts, ppid, code, sig = f[7], f[8], f[9], f[10]
        extra = []
        if ppid:
            extra.append(_int(_PARENT, ppid))
        if sig:
            name = signal_name(sig)
            extra.append(enc.kv_pieces([("tapio.ebpf.exit.signal", name)])[0])
            text = b"exit %s: killed by %s" % (comm, name.encode())
        elif code >= 0:
            extra.append(_int(_EXIT_CODE, code))
            text = b"exit %s: code %d" % (comm, code)
        else:
            text = b"exit " + comm
        exe, exec_ts = self._pending_exec.pop(pid, (b"", 0))
        if exe:
            extra.append(enc.str_piece("process.executable.path", exe))
        start = start_ts + offset if start_ts else exec_ts
        span = None
        if start:
            extra.append(_int(_LIFETIME, max(0, ts - start)))
            if out.spans is not None:
                failed = bool(sig) or code > 0
                span = (b"process " + (exe.rsplit(b"/", 1)[-1] if exe else comm), SPAN_KIND_INTERNAL, start, ts, text if failed else b"")
        out.exited.append((pid, cgroup_id))
        return SEV_INFO, _body(text), extra, span

    def _oom(self, f: tuple, ts: int, offset: int, out: Drain) -> tuple:
        pid, comm = f[3], _text(f[6])
        mark_ts, total_vm, anon, file_rss, shmem, pgtables, victim_uid, score_adj = f[7:15]
        pairs = [
            ("tapio.ebpf.oom.total_vm_kb", total_vm),
            ("tapio.ebpf.oom.anon_rss_kb", anon),
            ("tapio.ebpf.oom.file_rss_kb", file_rss),
            ("tapio.ebpf.oom.shmem_rss_kb", shmem),
            ("tapio.ebpf.oom.pgtables_kb", pgtables),
            ("tapio.ebpf.oom.score_adj", score_adj),
            ("tapio.ebpf.oom.victim_uid", victim_uid),
            ("tapio.ebpf.oom.marked_time_unix_nano", mark_ts + offset),
        ]
        return SEV_WARN, _body(b"OOM kill of %s (pid %d), anon rss %d kB" % (comm, pid, anon)), enc.kv_pieces(pairs), None

    def _signal(self, f: tuple, ts: int, offset: int, out: Drain) -> tuple:
        pid = f[3]
        sig, code, result, target_pid, target_comm = f[7], f[8], f[9], f[10], _text(f[13])
        name = signal_name(sig)
        pairs = [
            ("tapio.ebpf.signal.number", sig),
            ("tapio.ebpf.signal.name", name),
            ("tapio.ebpf.signal.target_pid", target_pid),
            ("tapio.ebpf.signal.target_comm", target_comm.decode()),
            ("tapio.ebpf.signal.code", code),
            ("tapio.ebpf.signal.result", result),
        ]
        return SEV_INFO, _body(b"signal %s from %d to %d" % (name.encode(), pid, target_pid)), enc.kv_pieces(pairs), None

    # -- shared pieces

    def _shared(self, kind: int, pid: int, tid: int, uid: int, comm: bytes, cgroup_id: int, container: tuple[bytes, ...]) -> tuple[bytes, bytes]:
        """The attributes every event of one task and kind shares, framed for a log record and for a span."""
        pieces = [
            _KIND_PIECE[kind],
            _int(_PID, pid),
            _int(_TID, tid),
            _int(_UID, uid),
            enc.str_piece("tapio.ebpf.comm", _text(comm)),
            _int(_CGROUP, cgroup_id),
            *container,
        ]
        found = self._common[(pid, tid, uid, comm, cgroup_id, kind, container)] = _framed(pieces)
        return found

    def _container_pieces(self, container: Container) -> tuple[bytes, ...]:
        found = self._containers.get(container)
        if found is None:
            pairs = [("container.id", container.id)]
            if container.runtime:
                pairs.append(("container.runtime.name", container.runtime))
            if container.pod_uid:
                pairs.append(("k8s.pod.uid", container.pod_uid))
            found = self._containers[container] = tuple(enc.str_piece(k, v.encode()) for k, v in pairs)
        return found

    def _address(self, family: int, raw: bytes) -> tuple[bytes, bytes, bytes]:
        """(network.local.address piece, network.peer.address piece, text as in a body) of a raw address."""
        key = (family, raw)
        found = self._addresses.get(key)
        if found is None:
            text = d.format_address(family, raw).encode()
            found = self._addresses[key] = (
                enc.str_piece("network.local.address", text),
                enc.str_piece("network.peer.address", text),
                b"[%s]" % text if family == d.AF_INET6 else text,
            )
        return found

    def _local(self, family: int, raw: bytes) -> tuple[bytes, bytes]:
        pieces = [_TRANSPORT, _NET_TYPE.get(family, _NET_TYPE_OTHER), self._address(family, raw)[0]]
        found = self._locals[(family, raw)] = _framed(pieces)
        return found

    def _peer(self, family: int, raw: bytes) -> tuple[bytes, bytes, bytes]:
        address = self._address(family, raw)
        found = self._peers[(family, raw)] = (*_framed([address[1]]), address[2])
        return found

    def _port(self, port: int) -> tuple[bytes, bytes]:
        found = self._ports[port] = (_int(_LPORT, port), _int(_PPORT, port))
        return found

    def _tcp_shape(self, event: int, old: int, new: int, states: int) -> tuple[bytes, bytes]:
        pairs = [
            ("tapio.ebpf.tcp.event", d.TCP_EVENT_NAMES[event]),
            ("tapio.ebpf.tcp.old_state", d.TCP_STATES.get(old, str(old))),
            ("tapio.ebpf.tcp.new_state", d.TCP_STATES.get(new, str(new))),
            ("tapio.ebpf.tcp.states", d.states_list(states)),
        ]
        found = self._tcp_states[(event, old, new, states)] = _framed(enc.kv_pieces(pairs))
        return found

    def _path(self, raw: bytes, flags: int) -> tuple[bytes, bytes, bytes]:
        path = _text(raw)
        pieces = [enc.str_piece("file.path", path), _int(_OPEN_FLAGS, flags), enc.str_piece("tapio.ebpf.open.flags_text", d.open_flags_text(flags).encode())]
        found = self._paths[(raw, flags)] = (_framed(pieces)[0], path, _body(b"open " + path))
        return found

    def _error(self, ret: int) -> tuple[bytes, bytes]:
        err = errno_name(-ret).encode()
        found = self._errors[ret] = (_TL + enc.str_piece("error.type", err) + _TL + _int(_OPEN_ERRNO, -ret), err)
        return found

    def _next_ids(self, events: int) -> tuple[bytes, bytes]:
        """A trace id and a span id from a pool drawn once per drain (enough for a span per event)."""
        at = self._id_at
        if at + _ID_BYTES > len(self._id_pool):
            self._id_pool, at = self._ids(_ID_BYTES * events), 0
        self._id_at = at + _ID_BYTES
        pool = self._id_pool
        return pool[at : at + 16], pool[at + 16 : at + _ID_BYTES]

    @staticmethod
    def _span(span: tuple, trace_id: bytes, span_id: bytes, attrs: bytes) -> bytes:
        name, kind, start, end, message = span
        end = max(start, end)
        parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id, _ld(b"\x2a", name), b"\x30" + _SMALL[kind]]
        if start:
            parts.append(b"\x39" + _FIXED64(start & _MASK64))
        if end:
            parts.append(b"\x41" + _FIXED64(end & _MASK64))
        parts.append(attrs)
        if message:
            parts.append(_ld(b"\x7a", _ld(b"\x12", message) + b"\x18" + _SMALL[STATUS_CODE_ERROR]))
        return b"".join(parts)

    def _remember_exec(self, pid: int, filename: bytes, ts: int) -> int:
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


def _framed(pieces: list[bytes]) -> tuple[bytes, bytes]:
    """Attribute pieces as the repeated attributes field of a log record and of a span."""
    return _TL + _TL.join(pieces), _TS + _TS.join(pieces)
