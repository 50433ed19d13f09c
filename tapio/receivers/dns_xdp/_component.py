"""The running dns-xdp receiver: attach, drain the ring buffer, expire unanswered queries, hand OTLP batches on.

Invariants:
- No threads but the netlink and map-sweep calls (worker threads, one at
  a time each, with deadlines): the ring buffer is read straight from its
  memory mapping after `trio.lowlevel.wait_readable` on its fd (or on the
  drain ticker's), and link events are read from a non-blocking netlink socket.
- Each query is reported at most once: answered (the kernel matched its
  response and deleted it) or unanswered (the sweeper deleted it after
  ``query_timeout``); the one whose delete succeeds reports.
- An unanswered query is reported only where the response path is
  observed (`Attachments.response_path_observed`); the others are counted
  (``tapio_dns_xdp_unanswered_total{observed="false"}``) and forgotten.
- One drain of at most `DRAIN_CHUNK` events → at most one logs batch and
  one traces batch, handed on with ``send_nowait`` (the kernel cannot
  wait); a refused batch is counted by its items, never retried. Records
  are written as OTLP bytes (`tapio.otlpwire`) and handed on unparsed.
- An event waits at most ``flush_interval`` in the ring (plus a drain's
  time). While the ring keeps filling, a drain costs one wakeup: a tick of
  a periodic timerfd (`Ticker`), cheaper to wait on than ``trio.sleep``; a
  wakeup of the event loop costs more CPU (~0.15 ms on a busy node) than
  fifty records. The ring's fd is waited on again once a period passes
  with nothing in the ring.
- Kernel counters are read once a second and added to self-telemetry as
  deltas, so the tapio_* counters equal the kernel's.
- Shutdown drains the ring a last time and detaches from every interface
  (XDP and TC attachments outlive the process otherwise), shielded.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from tapio.component import Ports, Settings
from tapio.pdata import Batch, Signal
from tapio import otlpwire as enc
from tapio.telemetry import COUNTER, GAUGE

from .._handoff import send_or_count
from . import _decode as d
from . import _netlink as nl
from ._attach import Attachments
from ._bpfsys import Ticker
from ._config import Config
from ._loader import Program, open_program
from ._stats import DnsStats

SCOPE = ("tapio.dns_xdp", "0.1.0")
COUNTER_POLL_SECONDS = 1.0
DRAIN_CHUNK = 1024
SEV_INFO, SEV_WARN = 9, 13
SPAN_KIND_CLIENT = 3
STATUS_CODE_ERROR = 2
#: response codes that make a span an error (NXDOMAIN is an answer, not a failure)
ERROR_RCODES = frozenset({1, 2, 4, 5})
#: bounded caches of rendered values, emptied when full
TEXT_CACHE_SIZE = 8192

_RESPONSE_MATCH = (
    (d.CNT_MATCHED, "matched"),
    (d.CNT_UNMATCHED, "unmatched"),
    (d.CNT_DUPLICATE, "duplicate"),
    (d.CNT_MISMATCHED, "mismatched"),
    (d.CNT_LATE, "late"),
)


_FIXED64 = struct.Struct("<Q").pack
#: field tags: LogRecord.attributes (6), Span.attributes (9), ScopeLogs.log_records / ScopeSpans.spans (2)
_T_LOG, _T_SPAN, _T_ITEM = enc.T_ATTR_LOG, enc.T_ATTR_SPAN, b"\x12"
_SMALL = [bytes((i,)) for i in range(128)]
#: the int attributes written per record: what precedes the value's varint in a piece, by varint length
_PORT_HEADS, _ID_HEADS, _LATENCY_HEADS = (enc.int_piece_heads(k) for k in ("client.port", "tapio.dns_xdp.id", "tapio.dns_xdp.latency_ns"))
#: an item with a 2-byte length (ScopeLogs.log_records, field 2) and a log record's first field, its time (field 1, fixed64)
_RECORD_START = struct.Struct("<BBBBQ").pack
#: an item with a 2-byte length (ScopeSpans.spans, field 2) and a span's first field's tag and length (trace_id, 16 bytes)
_SPAN_START = struct.Struct("<BBBBB").pack
#: a span's start and end times (fields 7 and 8, fixed64)
_SPAN_TIMES = struct.Struct("<BQBQ").pack
_TRACE_ID_TAG, _SPAN_ID_TAG = b"\x4a\x10", b"\x52\x08"  # LogRecord.trace_id (9), span_id (10)
#: bytes of a trace id and a span id
_ID_BYTES = 24


#: LogRecord.event_name (field 12) by whether the query was answered
_EVENT_NAMES = {answered: b"\x62" + enc.varint(len(n)) + n for answered, n in ((True, b"tapio.dns_xdp.answered"), (False, b"tapio.dns_xdp.response"))}


def _span_head(qtype: str) -> bytes:
    """A span's name and kind."""
    return enc.span(trace_id=b"", span_id=b"", name=f"DNS {qtype}", kind=SPAN_KIND_CLIENT, start_time_unix_nano=0, end_time_unix_nano=0, attrs=b"")


def _span_tail(error: str) -> bytes:
    """A span's status: an error with the rcode's name as its message, or none."""
    return enc.span(
        trace_id=b"", span_id=b"", name="", kind=0, start_time_unix_nano=0, end_time_unix_nano=0, attrs=b"",
        status_code=STATUS_CODE_ERROR if error else 0, status_message=error,
    )


@dataclass(slots=True, eq=False)
class _Shape:
    """What records that differ only in their times, client port and DNS id share, rendered once."""

    answered: bool
    rcode: str
    #: where an answered query's latency is counted (None for a response without its query)
    histogram: Any
    #: this drain's latencies (answered) or records (response only), counted at its end; one list
    #: for all the shapes of a histogram (or of a response-only rcode), so a drain counts few of them
    pending: list[int]
    #: a LogRecord's fields before the per-record attributes (severity, body, the shared attributes
    #: and the next one's tag), and after the observed time (event name)
    log_head: bytes
    log_tail: bytes
    #: a Span's: name and kind; the shared attributes and the next one's tag; status
    span_head: bytes
    span_attrs: bytes
    span_tail: bytes
    #: a record's bytes less its per-record attributes (and trace and span ids): time, tags, observed time
    log_size: int = field(init=False)
    #: a span's less its per-record attributes: ids, times, tags
    span_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.log_size = 9 + len(self.log_head) + (2 if self.answered else 1) + 9 + len(self.log_tail)
        self.span_size = 2 + 16 + 2 + 8 + len(self.span_head) + 18 + len(self.span_attrs) + 2 + len(self.span_tail)


class DnsXdpReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the dns-xdp receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._telemetry = settings.telemetry
        #: while running (tests read them)
        self.program: Program | None = None
        self.attachments: Attachments | None = None
        self._kernel = [0] * d.CNT_SLOTS
        self._inflight_now = 0
        self._dropped: dict[str, int] = {}
        self._resource_attrs = [("host.name", socket.gethostname()), ("os.type", "linux"), ("service.name", "tapio")]
        self._resource_blob = enc.attributes(enc.T_ATTR_RESOURCE, self._resource_attrs)
        self._scope_blob = enc.scope(*SCOPE)
        self.stats = DnsStats(config.max_servers, time.time_ns())
        self._names: dict[bytes, str] = {}
        self._addresses: dict[tuple[int, bytes], str] = {}
        self._ifnames: dict[int, str] = {}
        self._common: dict[tuple, tuple[tuple[bytes, ...], bytes, bytes]] = {}
        self._codes: dict[tuple, tuple[str, str, bool, bytes, bytes]] = {}
        #: rcode -> the drain's responses without their query (see _Shape.pending)
        self._response_pending: dict[str, list[int]] = {}
        self._shapes: dict[bytes, _Shape] = {}
        self._ring_open = False
        self._declare_metrics()

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, config = self._settings, self._config
        program = await open_program(config)
        self.program = program
        monitor: socket.socket | None = None
        ticker: Ticker | None = None
        attachments = Attachments(config, program, settings.logger, self._count_attach)
        try:
            ticker = Ticker()
            netns = nl.netns_path(config.network_namespace) if config.network_namespace else ""
            # subscribe before listing, so that no interface appears unseen in between
            monitor = nl.open_link_monitor(netns)
            links = await attachments.open()
            self.attachments = attachments
            self._ifnames = {link.index: link.name for link in links}
            self._telemetry.gauge("tapio_dns_xdp_interfaces_attached", lambda: len(attachments.attached))
            self._telemetry.gauge("tapio_dns_xdp_inflight", lambda: self._inflight_now)
            program.ring()
            self._ring_open = True
            if not attachments.attached:
                settings.logger.warning("%s: no interface matches %s yet; waiting for one to appear", settings.id, config.interfaces)
            else:
                settings.logger.info(
                    "%s: watching DNS on %s (%s)", settings.id, ", ".join(a.name for a in attachments.attached.values()), attachments._mode_text()
                )
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._link_loop, monitor, attachments)
                nursery.start_soon(self._sweep_loop, attachments)
                nursery.start_soon(self._counter_loop)
                assert ticker is not None
                fd, ring, wait = program.ring_fd, program.ring(), float(config.flush_interval)
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    if wait <= 0:
                        await self._drain_all()
                        continue
                    # while queries keep coming: one wakeup a drain (a tick), the ring's fd waited
                    # on again only once a period has passed with nothing in the ring
                    ticker.start(wait)
                    await self._tick(ticker)
                    await self._drain_all()
                    while True:
                        await self._tick(ticker)
                        if not ring.pending():
                            break
                        await self._drain_all()
                    ticker.stop()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    if self._ring_open:
                        self.drain()
                        self._poll_counters()
                finally:
                    self._ring_open = False
                    try:
                        with trio.move_on_after(max(settings.shutdown_grace, 5.0)):
                            await attachments.detach_all()
                    finally:
                        self.attachments = None
                        self.program = None
                        if monitor is not None:
                            monitor.close()
                        if ticker is not None:
                            ticker.close()
                        program.close()

    def drain(self, limit: int = 1 << 20) -> int:
        """Read what the ring buffer holds now (at most ``limit`` events) and hand it on; returns the events read."""
        assert self.program is not None
        raws = self.program.ring().read(limit)
        if raws:
            self.handle(raws)
        return len(raws)

    @staticmethod
    async def _tick(ticker: Ticker) -> None:
        await trio.lowlevel.wait_readable(ticker.fd)
        ticker.ticks()

    async def _drain_all(self) -> None:
        """Drain the ring in chunks of `DRAIN_CHUNK`, letting the other tasks run between them."""
        while self.drain(DRAIN_CHUNK) == DRAIN_CHUNK:
            await trio.lowlevel.checkpoint()

    async def _link_loop(self, monitor: socket.socket, attachments: Attachments) -> None:
        while True:
            await trio.lowlevel.wait_readable(monitor)
            events: list[nl.LinkEvent] = []
            resync = False
            while True:
                try:
                    data = monitor.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:  # ENOBUFS: the kernel dropped events; list everything again
                    self._settings.logger.warning("%s: interface events overran (%s); listing interfaces again", self._settings.id, exc.strerror)
                    resync = True
                    continue
                try:
                    events.extend(nl.parse_link_messages(data))
                except nl.NetlinkError as exc:
                    self._telemetry.bad_input("netlink_message")
                    self._settings.logger.warning("%s: skipped a netlink message: %s", self._settings.id, exc)
            if resync:
                links = await attachments.links()
                self._ifnames = {link.index: link.name for link in links}
                self._common.clear()  # rendered attributes may carry an old name
                self._shapes.clear()
                await attachments.sync(links)
                continue
            for ev in events:
                if ev.present and self._ifnames.get(ev.index) != ev.name:
                    self._ifnames[ev.index] = ev.name
                    # rendered attributes may carry the old name
                    self._common.clear()
                    self._shapes.clear()
                await attachments.on_link(ev)

    async def _sweep_loop(self, attachments: Attachments) -> None:
        """Expire queries older than query_timeout; report those whose response path is observed."""
        assert self.program is not None
        timeout_ns = int(self._config.query_timeout * 1e9)
        interval = min(1.0, self._config.query_timeout / 4)
        inflight = self.program.inflight()
        limiter = trio.CapacityLimiter(1)
        while True:
            await trio.sleep(interval)
            with trio.fail_after(10):
                items = await trio.to_thread.run_sync(inflight.items, limiter=limiter, abandon_on_cancel=True)
            self._inflight_now = len(items)
            now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            expired = []
            for key, value in items:
                ts, _ = d.QUERY_TS.unpack_from(value)
                if now_boot - ts >= timeout_ns:
                    try:
                        expired.append(d.parse_query(key, value))
                    except d.DecodeError as exc:
                        self._telemetry.bad_input("inflight_entry")
                        self._settings.logger.warning("%s: %s", self._settings.id, exc)
                        inflight.delete(key)
            if expired:
                await self.expire(expired, attachments)

    async def expire(self, queries: list[d.Query], attachments: Attachments) -> None:
        assert self.program is not None
        inflight = self.program.inflight()
        offset = self.program.boot_to_unix_ns
        observed_now = time.time_ns()
        records: list[bytes] | None = [] if Signal.LOGS in self._output.signals else None
        spans: list[bytes] | None = [] if Signal.TRACES in self._output.signals else None
        timeout_ns = int(self._config.query_timeout * 1e9)
        for q in queries:
            if not inflight.delete(q.key):
                continue  # its response arrived meanwhile: the kernel reports it
            server = self._address(q.family, q.server)
            seen = await attachments.response_path_observed(q.ifindex, q.family, q.server, server, trio.current_time())
            self._telemetry.add("tapio_dns_xdp_unanswered_total", 1, observed="true" if seen else "false")
            if not seen:
                continue
            qtype = d.qtype_text(q.qtype)
            self.stats.unanswered_query(server, qtype)
            name = self._name(q.name)
            start = q.ts + offset
            pieces = self._common_pieces(q.family, q.client, q.server, q.server_port, q.proto, q.ifindex, 0, q.hook, 0) + enc.kv_pieces(
                [
                    ("dns.question.name", name),
                    ("dns.question.type", qtype),
                    ("client.port", q.client_port),
                    ("tapio.dns_xdp.id", q.id),
                    ("tapio.dns_xdp.status", "unanswered"),
                    ("error.type", "timeout"),
                    ("tapio.dns_xdp.question.class", d.qclass_text(q.qclass)),
                    ("tapio.dns_xdp.query.flags", d.flag_names(q.flags)),
                    *([("tapio.dns_xdp.vlan.id", q.vlan)] if q.vlan else []),
                ]
            )
            body = f"DNS {qtype} {name}: no response within {self._config.query_timeout:g}s"
            self._emit(records, spans, pieces, start, start + timeout_ns, observed_now, SEV_WARN, body, f"DNS {qtype}", True, "no response", "tapio.dns_xdp.unanswered")
        self._send(records, spans)
        self._telemetry.add("tapio_dns_xdp_events_total", len(queries), kind="unanswered")

    # -- telemetry

    def _declare_metrics(self) -> None:
        t = self._telemetry
        t.declare("tapio_dns_xdp_packets_total", COUNTER, "UDP and TCP packets to or from a DNS port that the kernel program parsed.")
        t.declare("tapio_dns_xdp_queries_total", COUNTER, "Queries the kernel remembered to match with their response; repeated: a query already remembered (a retransmission, or one packet seen twice).")
        t.declare("tapio_dns_xdp_responses_total", COUNTER, "Responses seen by the kernel program, by how they matched a query.")
        t.declare("tapio_dns_xdp_events_total", COUNTER, "Events reported, by kind (answered, response_only, unanswered).")
        t.declare("tapio_dns_xdp_events_lost_total", COUNTER, "Responses lost in the kernel because the ring buffer was full.")
        t.declare("tapio_dns_xdp_skipped_total", COUNTER, "Packets the kernel program skipped without parsing, by reason (fragment, tcp_segment).")
        t.declare("tapio_dns_xdp_unanswered_total", COUNTER, "Queries that expired without a response, by whether the response path is observed (only those are reported).")
        t.declare("tapio_dns_xdp_records_dropped_total", COUNTER, "Records dropped because the pipeline could not take them, by signal and reason.")
        t.declare("tapio_dns_xdp_attach_total", COUNTER, "Interfaces not attached, by reason (busy, unsupported, link_type, error), and stale attachments removed (stale_removed) or left uninspected without CAP_SYS_ADMIN (stale_unverified).")
        t.declare("tapio_dns_xdp_interfaces_attached", GAUGE, "Interfaces the programs are attached to now.")
        t.declare("tapio_dns_xdp_inflight", GAUGE, "Queries the kernel waits on for a response, at the last sweep.")

    def _count_attach(self, reason: str, n: int) -> None:
        self._telemetry.add("tapio_dns_xdp_attach_total", n, reason=reason)

    async def _counter_loop(self) -> None:
        interval = float(self._config.metrics_interval)
        next_emit = trio.current_time() + interval if interval > 0 else None
        while True:
            await trio.sleep(min(COUNTER_POLL_SECONDS, interval) if interval > 0 else COUNTER_POLL_SECONDS)
            self._poll_counters()
            if next_emit is not None and trio.current_time() >= next_emit:
                next_emit = trio.current_time() + interval
                if Signal.METRICS in self._output.signals:
                    self._send_batch(Batch.of(Signal.METRICS, self.stats.request(self._resource_attrs, SCOPE, time.time_ns())))

    def _poll_counters(self) -> None:
        if self.program is None:
            return
        now = self.program.counters()
        old, self._kernel = self._kernel, now
        delta = [n - o for n, o in zip(now, old)]
        t = self._telemetry
        t.add("tapio_dns_xdp_packets_total", delta[d.CNT_PACKETS])
        t.add("tapio_dns_xdp_queries_total", delta[d.CNT_QUERIES], outcome="remembered")
        t.add("tapio_dns_xdp_queries_total", delta[d.CNT_QUERY_REPEATED], outcome="repeated")
        for slot, match in _RESPONSE_MATCH:
            t.add("tapio_dns_xdp_responses_total", delta[slot], match=match)
        t.add("tapio_dns_xdp_events_lost_total", delta[d.CNT_LOST])
        t.add("tapio_dns_xdp_skipped_total", delta[d.CNT_FRAGMENT], reason="fragment")
        t.add("tapio_dns_xdp_skipped_total", delta[d.CNT_TCP_SKIPPED], reason="tcp_segment")
        for i, reason in enumerate(d.BAD_REASONS):
            if delta[d.CNT_BAD + i] > 0:
                t.bad_input(reason, delta[d.CNT_BAD + i])
        self.stats.malformed = {reason: now[d.CNT_BAD + i] for i, reason in enumerate(d.BAD_REASONS) if now[d.CNT_BAD + i]}

    def kernel_counters(self) -> dict[str, int]:
        """The kernel's cumulative counters as last read, by name (for tests and benchmarks)."""
        c = self._kernel
        out = {
            "packets": c[d.CNT_PACKETS],
            "queries": c[d.CNT_QUERIES],
            "queries_repeated": c[d.CNT_QUERY_REPEATED],
            "responses": c[d.CNT_RESPONSES],
            "lost": c[d.CNT_LOST],
            "fragments": c[d.CNT_FRAGMENT],
            "tcp_skipped": c[d.CNT_TCP_SKIPPED],
        }
        out.update({match: c[slot] for slot, match in _RESPONSE_MATCH})
        out.update({reason: c[d.CNT_BAD + i] for i, reason in enumerate(d.BAD_REASONS)})
        return out

    # -- events to OTLP

    def _send_batch(self, batch: Batch) -> None:
        send_or_count(self._output, batch, self._telemetry, "tapio_dns_xdp_records_dropped_total", self._dropped)

    def _hand_on(self, signal: Signal, parts: list[bytes], size: int, count: int) -> None:
        """One export request of ``count`` items whose bytes, ``size`` in all, are ``parts[1:]`` (``parts[0]`` is its head's place)."""
        parts[0] = enc.request_head(self._resource_blob, self._scope_blob, size)
        # written here, so handed on unparsed: a stage that reads the records parses them
        self._send_batch(Batch.from_bytes(signal, b"".join(parts), count))

    def _send(self, records: list[bytes] | None, spans: list[bytes] | None) -> None:
        if records:
            self._hand_on(Signal.LOGS, [b"", *records], sum(map(len, records)), len(records))
        if spans:
            self._hand_on(Signal.TRACES, [b"", *spans], sum(map(len, spans)), len(spans))

    def handle(self, raws: list[bytes]) -> None:
        """Turn ring-buffer records into at most one logs and one traces batch, and hand them on.

        Hot path. Everything a record says but its two times, client port and
        DNS id (names, addresses, codes, counts, interfaces) repeats from query
        to query of a client, so it is rendered once into a `_Shape` (text and
        encoded attributes) cached by those bytes of the record; per record only
        the varying four are encoded, as parts of the drain's one request (its
        items' lengths computed, not measured), and the latency is put aside
        for the shape's histogram, which counts the drain's in one go.
        """
        rows = d.event_rows(raws)
        if rows is None:  # a record of another size: counted; the others go on
            for raw in raws:
                if len(raw) != d.EVENT.size:
                    self._new_shape(raw)
            raws = [raw for raw in raws if len(raw) == d.EVENT.size]
            rows = d.event_rows(raws)
            assert rows is not None
        wired = self._output.signals
        logs = Signal.LOGS in wired
        traces = Signal.TRACES in wired
        offset = self.program.boot_to_unix_ns if self.program else 0
        observed = b"\x59" + _FIXED64(time.time_ns())
        # parts[0]: the request's head, once the size is known
        log_parts: list[bytes] = [b""]
        span_parts: list[bytes] = [b""]
        log_size = span_size = spans_made = 0
        ids = random.randbytes(_ID_BYTES * len(raws)) if traces else b""
        at = 0
        touched: list[_Shape] = []
        shapes = self._shapes
        tl, ts, varint, small = _T_LOG, _T_SPAN, enc.varint, _SMALL
        port_heads, id_heads, latency_heads = _PORT_HEADS, _ID_HEADS, _LATENCY_HEADS
        port3, id3, latency3, latency4 = port_heads[3], id_heads[3], latency_heads[3], latency_heads[4]
        record_start, span_start, span_times = _RECORD_START, _SPAN_START, _SPAN_TIMES
        trace_tag, span_tag = _TRACE_ID_TAG, _SPAN_ID_TAG
        for raw, (query_ts, response_ts, ends, client_port, server_port, dns_id, rest) in zip(raws, rows):
            key = (ends, server_port, rest)
            shape = shapes.get(key)
            if shape is None:
                shape = self._new_shape(raw, key)
                if shape is None:
                    continue
            pending = shape.pending
            if not pending:
                touched.append(shape)
            # the client port's and the DNS id's pieces: 16-bit values, their varints written out here
            # (most take 3 bytes: ephemeral ports, random ids)
            n = client_port
            if n >= 0x4000:
                port = port3 + bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
            else:
                port = port_heads[1] + small[n] if n < 0x80 else port_heads[2] + bytes((n & 0x7F | 0x80, n >> 7))
            n = dns_id
            if n >= 0x4000:
                id_ = id3 + bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
            else:
                id_ = id_heads[1] + small[n] if n < 0x80 else id_heads[2] + bytes((n & 0x7F | 0x80, n >> 7))
            end = response_ts + offset
            if shape.answered:
                latency = response_ts - query_ts if response_ts > query_ts else 0
                pending.append(latency)
                n = latency
                if 0x4000 <= n < 0x10000000:  # 16 µs to 268 ms: 3 or 4 bytes
                    if n < 0x200000:
                        lat = latency3 + bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
                    else:
                        lat = latency4 + bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
                else:
                    v = varint(n)
                    lat = latency_heads[len(v)] + v
                start = query_ts + offset
                varying = len(port) + len(id_) + len(lat)
                if traces:
                    trace_id, span_id = ids[at : at + 16], ids[at + 16 : at + _ID_BYTES]
                    at += _ID_BYTES
                    n = shape.span_size + varying
                    if 0x80 <= n < 0x4000:
                        span_size += n + 3
                        first = span_start(0x12, n & 0x7F | 0x80, n >> 7, 0x0A, 0x10)
                    else:  # a name escaped into a long text: a longer length prefix
                        first = b"\x12" + varint(n) + b"\x0a\x10"
                        span_size += n + len(first) - 2
                    span_parts += (
                        first, trace_id, b"\x12\x08", span_id, shape.span_head, span_times(0x39, start, 0x41, end if end > start else start),
                        shape.span_attrs, port, ts, id_, ts, lat, shape.span_tail,
                    )
                    spans_made += 1
                    # the log record after its length and time; it carries its span's ids
                    record = (shape.log_head, port, tl, id_, tl, lat, trace_tag, trace_id, span_tag, span_id, observed, shape.log_tail)
                    varying += 28
                else:
                    record = (shape.log_head, port, tl, id_, tl, lat, observed, shape.log_tail)
            else:
                pending.append(0)
                start = end
                record = (shape.log_head, port, tl, id_, observed, shape.log_tail)
                varying = len(port) + len(id_)
            if logs:
                n = shape.log_size + varying
                if 0x80 <= n < 0x4000:
                    log_size += n + 3
                    first = record_start(0x12, n & 0x7F | 0x80, n >> 7, 0x09, start)
                else:
                    first = b"\x12" + varint(n) + b"\x09" + _FIXED64(start)
                    log_size += n + len(first) - 9
                log_parts.append(first)
                log_parts += record
        answered = response_only = 0
        stats = self.stats
        for shape in touched:
            pending = shape.pending
            if shape.answered:
                answered += len(pending)
                shape.histogram.add_many(pending)
            else:
                response_only += len(pending)
                stats.response_only(shape.rcode, len(pending))
            pending.clear()
        if answered:
            self._telemetry.add("tapio_dns_xdp_events_total", answered, kind="answered")
        if response_only:
            self._telemetry.add("tapio_dns_xdp_events_total", response_only, kind="response_only")
        if logs and answered + response_only:
            self._hand_on(Signal.LOGS, log_parts, log_size, answered + response_only)
        if spans_made:
            self._hand_on(Signal.TRACES, span_parts, span_size, spans_made)

    def _new_shape(self, raw: bytes, key: tuple | None = None) -> "_Shape | None":
        """The shape of a record, cached under ``key``; None if it does not decode (counted and logged)."""
        try:
            shape = self._shape(raw, Signal.TRACES in self._output.signals)
        except d.DecodeError as exc:
            self._telemetry.bad_input("ring_record")
            self._settings.logger.warning("%s: skipped a ring-buffer record: %s", self._settings.id, exc)
            return None
        if key is not None:
            if len(self._shapes) >= TEXT_CACHE_SIZE:
                self._shapes.clear()
            self._shapes[key] = shape
        return shape

    def _shape(self, raw: bytes, traces: bool = True) -> "_Shape":
        """Decode a record and render what it shares with other queries of its kind (raises DecodeError).

        Its attributes are three cached blocks, in this order: the
        client/server/interface ones, the question name, and the codes and
        counts (type, rcode, flags, counts, size, status ...) that many names share.
        The span's parts only with ``traces`` (a receiver's wiring does not change).
        """
        ev = d.parse_event(raw)
        name = self._name(ev.name)
        answered = ev.kind == d.KIND_ANSWERED
        vlan = ev.query_vlan or ev.response_vlan
        key = (ev.qtype, ev.flags, ev.ancount, ev.nscount, ev.arcount, ev.size, answered, ev.qclass, vlan)
        codes = self._codes.get(key)
        if codes is None:
            codes = self._codes_of(key)
        qtype, rcode_name, failed, codes_log, codes_span = codes
        if answered:
            _, common_log, common_span = self._common_block(
                ev.family, ev.client, ev.server, ev.server_port, ev.proto, ev.query_ifindex, ev.response_ifindex, ev.query_hook, ev.response_hook
            )
            body = f"DNS {qtype} {name}: {rcode_name}"
        else:
            _, common_log, common_span = self._common_block(ev.family, ev.client, ev.server, ev.server_port, ev.proto, 0, ev.response_ifindex, 0, ev.response_hook)
            body = f"DNS {qtype} {name}: {rcode_name} (query not seen)"
        name_piece = enc.str_piece("dns.question.name", name.encode())
        server = self._address(ev.family, ev.server)
        event_name = _EVENT_NAMES[answered]
        histogram = self.stats.histogram(server, qtype, rcode_name) if answered else None
        return _Shape(
            answered=answered,
            rcode=rcode_name,
            histogram=histogram,
            pending=histogram.pending if histogram is not None else self._response_pending.setdefault(rcode_name, []),
            log_head=enc.log_record(
                time_unix_nano=0, observed_time_unix_nano=0, severity_number=SEV_WARN if failed else SEV_INFO, severity_text="WARN" if failed else "INFO",
                body=body, attrs=b"".join((common_log, _T_LOG, name_piece, codes_log)), event_name="",
            ) + _T_LOG,
            log_tail=event_name,
            span_head=_span_head(qtype) if traces else b"",
            span_attrs=b"".join((common_span, _T_SPAN, name_piece, codes_span, _T_SPAN)) if traces else b"",
            span_tail=_span_tail(rcode_name if failed else "") if traces else b"",
        )

    def _codes_of(self, key: tuple) -> tuple[str, str, bool, bytes, bytes]:
        """(type, rcode, failed, attributes framed for a log record, for a span) of a (qtype, flags, counts, size, answered, class, vlan)."""
        qtype_num, flags, ancount, nscount, arcount, size, answered, qclass, vlan = key
        qtype = d.qtype_text(qtype_num)
        rcode = flags & 0x0F
        rcode_name = d.rcode_text(rcode)
        failed = rcode in ERROR_RCODES
        pairs: list[tuple[str, Any]] = [
            ("dns.question.type", qtype),
            ("dns.response_code", rcode_name),
            ("tapio.dns_xdp.answer_count", ancount),
            ("tapio.dns_xdp.authority_count", nscount),
            ("tapio.dns_xdp.additional_count", arcount),
            ("tapio.dns_xdp.response.flags", d.flag_names(flags)),
            ("tapio.dns_xdp.response.size", size),
            ("tapio.dns_xdp.status", "answered" if answered else "response_only"),
        ]
        if failed:
            pairs.append(("error.type", rcode_name))
        if qclass != 1:
            pairs.append(("tapio.dns_xdp.question.class", d.qclass_text(qclass)))
        opcode = flags >> 11 & 0x0F
        if opcode:
            pairs.append(("tapio.dns_xdp.opcode", d.opcode_text(opcode)))
        if vlan:
            pairs.append(("tapio.dns_xdp.vlan.id", vlan))
        pieces = enc.kv_pieces(pairs)
        if len(self._codes) >= TEXT_CACHE_SIZE:
            self._codes.clear()
        found = self._codes[key] = (qtype, rcode_name, failed, enc.frame(_T_LOG, pieces), enc.frame(_T_SPAN, pieces))
        return found

    def _emit(
        self, records: list[bytes] | None, spans: list[bytes] | None, pieces: list[bytes], start: int, end: int, observed: int,
        severity: int, body: str, span_name: str, failed: bool, message: str, event_name: str,
    ) -> None:
        trace_id = span_id = b""
        if spans is not None:
            trace_id, span_id = random.randbytes(16), random.randbytes(8)
            spans.append(
                enc.item(
                    enc.span(
                        trace_id=trace_id, span_id=span_id, name=span_name, kind=SPAN_KIND_CLIENT,
                        start_time_unix_nano=start, end_time_unix_nano=max(start, end), attrs=enc.frame(enc.T_ATTR_SPAN, pieces),
                        status_code=STATUS_CODE_ERROR if failed else 0, status_message=message if failed else "",
                    )
                )
            )
        if records is not None:
            records.append(
                enc.item(
                    enc.log_record(
                        time_unix_nano=start, observed_time_unix_nano=observed, severity_number=severity,
                        severity_text="WARN" if severity == SEV_WARN else "INFO", body=body, attrs=enc.frame(enc.T_ATTR_LOG, pieces),
                        event_name=event_name, trace_id=trace_id, span_id=span_id,
                    )
                )
            )

    def _common_pieces(
        self, family: int, client: bytes, server: bytes, server_port: int, proto: int, q_if: int, r_if: int, q_hook: int, r_hook: int
    ) -> list[bytes]:
        """The attributes a client/server/interface combination shares, encoded once (a new list each call)."""
        return list(self._common_block(family, client, server, server_port, proto, q_if, r_if, q_hook, r_hook)[0])

    def _common_block(
        self, family: int, client: bytes, server: bytes, server_port: int, proto: int, q_if: int, r_if: int, q_hook: int, r_hook: int
    ) -> tuple[tuple[bytes, ...], bytes, bytes]:
        """`_common_pieces`, and framed as a log record's attributes and a span's (cached)."""
        key = (family, client, server, server_port, proto, q_if, r_if, q_hook, r_hook)
        found = self._common.get(key)
        if found is None:
            pairs: list[tuple[str, Any]] = [
                ("client.address", self._address(family, client)),
                ("server.address", self._address(family, server)),
                ("server.port", server_port),
                ("network.transport", d.TRANSPORTS.get(proto, str(proto))),
                ("network.type", "ipv4" if family == 4 else "ipv6"),
            ]
            if q_if:
                pairs += [("network.interface.name", self._ifname(q_if)), ("tapio.dns_xdp.query.hook", d.HOOKS.get(q_hook, str(q_hook)))]
            if r_if:
                pairs += [("tapio.dns_xdp.response.interface", self._ifname(r_if)), ("tapio.dns_xdp.response.hook", d.HOOKS.get(r_hook, str(r_hook)))]
            if len(self._common) >= TEXT_CACHE_SIZE:
                self._common.clear()
            pieces = enc.kv_pieces(pairs)
            found = self._common[key] = (tuple(pieces), enc.frame(_T_LOG, pieces), enc.frame(_T_SPAN, pieces))
        return found

    def _name(self, wire: bytes) -> str:
        found = self._names.get(wire)
        if found is None:
            if len(self._names) >= TEXT_CACHE_SIZE:
                self._names.clear()
            found = self._names[wire] = d.name_text(wire)
        return found

    def _address(self, family: int, raw: bytes) -> str:
        key = (family, raw)
        found = self._addresses.get(key)
        if found is None:
            if len(self._addresses) >= TEXT_CACHE_SIZE:
                self._addresses.clear()
            found = self._addresses[key] = d.address_text(family, raw)
        return found

    def _ifname(self, index: int) -> str:
        return self._ifnames.get(index) or f"if{index}"
