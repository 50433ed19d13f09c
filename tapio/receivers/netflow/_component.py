"""The running netflow receiver: UDP sockets under trio, the sans-IO collector, batches out.

Invariants:
- Every socket is bound before ``task_status.started()``; a bind failure is
  raised plainly, naming the config key and the address.
- No threads on the hot path: each socket has one task that waits with
  `trio.lowlevel.wait_readable` and reads what is waiting without blocking,
  at most `DRAIN_DATAGRAMS` datagrams between two checkpoints. What one
  drain decoded leaves as at most one logs batch per `max_batch_records`.
- Batches are handed on with ``await send``: a full pipeline stops the
  reading and the socket's receive buffer absorbs the burst; what the kernel
  then drops is read from the socket (SO_MEMINFO) once a second and counted.
- Log records are written only when a logs pipeline is wired, and hold only
  the configured attributes (`_records`); traffic totals are kept either way.
- Templates are persisted (when ``storage`` is set) by one task of their
  own: the socket tasks only mark them changed. On start, persisted
  templates are put back before the first datagram is read; on shutdown
  the last changes are written under a shielded deadline.
- Bad input never stops the receiver: each malformed datagram is counted by
  exporter and reason, and logged (at most once a minute per exporter and
  reason) with what was wrong.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Any

import trio
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER
from tapio.units import with_port

from . import _encode as enc
from ._config import Config, parse_endpoint
from ._parser import (
    FLOW_TYPES,
    Collector,
    DataRecords,
    HeldDropped,
    Malformed,
    SequenceGap,
    TemplateUpdate,
    TemplateWithdrawn,
    UnknownTemplate,
    parse_template_key,
    template_key,
)
from ._records import RecordBuilder, protocol_name
from ._sflow import InterfaceCounters
from ._templates import Template

SCOPE_NAME = "tapio.netflow"
SCOPE_VERSION = "0.1.0"
#: datagrams read between two checkpoints of the event loop (~1-2 ms of decoding)
DRAIN_DATAGRAMS = 64
#: the largest UDP payload
MAX_DATAGRAM = 65535
#: how often the kernel's drop counters are read
DROP_POLL_SECONDS = 1.0
#: a repeated malformed-datagram warning per exporter and reason is logged at most this often
WARN_EVERY_SECONDS = 60.0
SO_MEMINFO = 55  # Linux: struct of u32 counters; index 8 is drops (SK_MEMINFO_DROPS)
SO_RCVBUFFORCE = 33
_SK_MEMINFO_DROPS = 8

METRICS = {
    "tapio_netflow_datagrams_total": "Datagrams received, by exporter (the UDP source address).",
    "tapio_netflow_flows_total": "Flow records decoded, by exporter and flow type.",
    "tapio_netflow_malformed_datagrams_total": "Datagrams that broke their format (the rest of each was skipped), by exporter and reason.",
    "tapio_netflow_unknown_template_total": "Data sets that arrived before their template (held, see held_sets_dropped), by exporter.",
    "tapio_netflow_held_sets_dropped_total": "Held data sets whose template never came, by exporter and reason (expired, overflow).",
    "tapio_netflow_sequence_gaps_total": "Times a session's sequence number skipped ahead, by exporter.",
    "tapio_netflow_sequence_missed_total": "Sequence numbers skipped: flows (v5), export packets (v9), data records (IPFIX), datagrams (sFlow), by exporter.",
    "tapio_netflow_records_dropped_total": "Log records the pipeline refused, by reason.",
    "tapio_netflow_socket_drops_total": "Datagrams the kernel dropped because a socket's receive buffer was full, by listener.",
    "tapio_netflow_template_store_errors_total": "Templates that could not be written to or read from storage.",
}


def _exporter_text(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


class NetflowReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the netflow receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._telemetry = settings.telemetry
        self.collector = Collector(max_held_sets=config.hold.max_sets, held_timeout=float(config.hold.timeout))
        self.builder = RecordBuilder(config.output())
        #: (config key, bound host:port) of each listener, once started
        self._bound: list[tuple[str, str]] = []
        self._sockets: list[tuple[socket.socket, str]] = []
        self._dirty: dict[str, bytes | None] = {}
        self._dirty_event = trio.Event()
        self._checkpoints: Any = None
        #: storage keys of the templates stored
        self._stored: set[str] = set()
        self._start_ns = time.time_ns()
        #: exporter -> protocol number -> [bytes, packets, flows]
        self.totals: dict[str, dict[int, list[int]]] = {}
        #: datagrams by exporter and flows by (exporter, version) not yet added to telemetry (see `_flush_counts`)
        self._datagrams: dict[str, int] = {}
        self._flows: dict[tuple[str, int], int] = {}
        #: (exporter, reason) -> count, for the metrics signal
        self.errors: dict[tuple[str, str], int] = {}
        self.interfaces: dict[tuple[str, int], InterfaceCounters] = {}
        self._kernel_drops: dict[int, int] = {}
        self._warned: dict[tuple[str, str], float] = {}
        self._resource = enc.resource([("service.name", "tapio"), ("host.name", socket.gethostname())])
        self._scope = enc.scope(SCOPE_NAME, SCOPE_VERSION)
        for name, help_text in METRICS.items():
            self._telemetry.declare(name, COUNTER, help_text)

    @property
    def bound_endpoints(self) -> dict[str, str]:
        """Config key path -> the ``host:port`` bound, for `tapio run`'s start banner."""
        return dict(self._bound)

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, config = self._settings, self._config
        try:
            if config.storage is not None:
                self._checkpoints = settings.storage(config.storage).checkpoints(str(settings.id))
                await self._restore_templates()
            for key, endpoint in config.listeners():
                self._open_listener(key, endpoint)
            shown = ", ".join(f"{k.split('.')[1]} {v}" for k, v in self._bound)
            settings.logger.info("%s: receiving flows on %s (%d socket%s each)", settings.id, shown, config.sockets, "" if config.sockets == 1 else "s")
            async with trio.open_nursery() as nursery:
                for sock, key in self._sockets:
                    nursery.start_soon(self._serve, sock)
                nursery.start_soon(self._poll_drops)
                if config.metrics_interval > 0 and Signal.METRICS in self._output.signals:
                    nursery.start_soon(self._metrics_loop)
                if self._checkpoints is not None:
                    nursery.start_soon(self._persist_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            for sock, _ in self._sockets:
                sock.close()
            self._sockets = []
            if self._checkpoints is not None and self._dirty:
                with trio.CancelScope(shield=True), trio.move_on_after(settings.shutdown_grace):
                    await self._persist_now()

    def _open_listener(self, key: str, endpoint: str) -> None:
        host, port = parse_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host or not host else socket.AF_INET
        bind_host = host or "::"
        for n in range(self._config.sockets):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6 and not host:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                if self._config.sockets > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                self._set_receive_buffer(sock)
                sock.bind((bind_host, port))
            except OSError as exc:
                sock.close()
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                error = OSError(f"{self._settings.id}: cannot listen on {endpoint} ({key}): {reason}")
                error.errno = exc.errno
                raise error from None
            sock.setblocking(False)
            port = sock.getsockname()[1]  # with port 0, the other sockets join the one picked
            self._sockets.append((sock, key))
            if n == 0:
                self._bound.append((key, with_port(endpoint, port)))

    def _set_receive_buffer(self, sock: socket.socket) -> None:
        size = int(self._config.receive_buffer_size)
        if not size:
            return
        # the kernel doubles what it is asked (bookkeeping); ask for half so the buffer holds `size`
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size // 2)
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size // 2)  # capped by net.core.rmem_max

    # -- the hot path

    async def _serve(self, sock: socket.socket) -> None:
        recv = sock.recvfrom
        feed = self.collector.feed
        handle = self._handle
        datagrams = self._datagrams
        wired_logs = Signal.LOGS in self._output.signals
        limit = self._config.max_batch_records
        while True:
            await trio.lowlevel.wait_readable(sock)
            items: list[bytes] = []
            drained = False
            while not drained:
                for _ in range(DRAIN_DATAGRAMS):
                    try:
                        data, addr = recv(MAX_DATAGRAM)
                    except BlockingIOError:
                        drained = True
                        break
                    except OSError:  # e.g. ICMP errors reported on the socket
                        continue
                    now_ns = time.time_ns()
                    exporter = _exporter_text(addr[0])
                    datagrams[exporter] = datagrams.get(exporter, 0) + 1
                    handle(feed(data, exporter, now_ns / 1e9), items if wired_logs else None, now_ns, len(data))
                    if len(items) >= limit:
                        self._flush_counts()
                        await self._send_logs(items)
                        items = []
                self._flush_counts()
                if items and (drained or len(items) >= limit // 2):
                    await self._send_logs(items)
                    items = []
                elif not drained:
                    await trio.lowlevel.checkpoint()

    def _flush_counts(self) -> None:
        """Add the datagrams and flows counted since the last call to telemetry (once per drain, not per datagram)."""
        tel = self._telemetry
        for exporter, n in self._datagrams.items():
            tel.add("tapio_netflow_datagrams_total", n, exporter=exporter)
        for (exporter, version), n in self._flows.items():
            tel.add("tapio_netflow_flows_total", n, exporter=exporter, type=FLOW_TYPES.get(version, "unknown"))
        self._datagrams.clear()
        self._flows.clear()

    def _handle(self, events: list, items: list[bytes] | None, now_ns: int, size: int) -> None:
        """Turn one datagram's events into records, totals and counters."""
        builder = self.builder
        observed = None
        for ev in events:
            kind = type(ev)
            if kind is DataRecords:
                if ev.template.options or not ev.rows:
                    continue
                session = ev.session
                exporter = session.exporter
                compiled = builder.compiled(ev.template)
                totals = self.totals.get(exporter)
                if totals is None:
                    totals = self.totals[exporter] = {}
                compiled.tally(ev.rows, totals, builder.rate(ev), session.sampling)
                key = (exporter, session.version)
                self._flows[key] = self._flows.get(key, 0) + len(ev.rows)
                if items is not None:
                    if observed is None:
                        observed = enc.observed_time_field(now_ns)
                    compiled.encode(ev.rows, items, builder.context(ev, now_ns, observed, compiled))
            elif kind is TemplateUpdate:
                self._mark(template_key(ev.session, ev.template.id), ev.template.to_bytes())
            elif kind is TemplateWithdrawn:
                self._withdrawn(ev)
            elif kind is UnknownTemplate:
                self._count_error("tapio_netflow_unknown_template_total", ev.session.exporter, "unknown_template")
            elif kind is HeldDropped:
                self._count_error("tapio_netflow_held_sets_dropped_total", ev.session.exporter, f"held_{ev.reason}", ev.sets, reason=ev.reason)
            elif kind is SequenceGap:
                self._count_error("tapio_netflow_sequence_gaps_total", ev.session.exporter, "sequence_gap")
                self._count_error("tapio_netflow_sequence_missed_total", ev.session.exporter, "sequence_missed", ev.missing)
            elif kind is Malformed:
                self._malformed(ev, size)
            elif kind is InterfaceCounters:
                self.interfaces[(ev.session.exporter, ev.if_index)] = ev

    def _count_error(self, metric: str, exporter: str, name: str, n: int = 1, **labels: str) -> None:
        self._telemetry.add(metric, n, exporter=exporter, **labels)
        self.errors[(exporter, name)] = self.errors.get((exporter, name), 0) + n

    def _malformed(self, ev: Malformed, size: int) -> None:
        self._count_error("tapio_netflow_malformed_datagrams_total", ev.exporter, "malformed", reason=ev.reason)
        self._telemetry.bad_input(ev.reason)
        now = time.monotonic()
        key = (ev.exporter, ev.reason)
        if now - self._warned.get(key, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
            self._warned[key] = now
            self._settings.logger.warning(
                "%s: malformed %d-byte datagram from %s (%s): %s; skipped and counted (repeats of this are logged once a minute)",
                self._settings.id, size, ev.exporter, ev.reason, ev.detail,
            )

    async def _send_logs(self, items: list[bytes]) -> None:
        batch = Batch.from_bytes(Signal.LOGS, enc.logs_request(self._resource, self._scope, items))
        try:
            await self._output.send(batch)
        except Refused:
            self._telemetry.add("tapio_netflow_records_dropped_total", batch.count, reason="refused")

    # -- templates in storage

    def _mark(self, key: str, value: bytes | None) -> None:
        if self._checkpoints is None:
            return
        self._dirty[key] = value
        self._dirty_event.set()

    def _withdrawn(self, ev: TemplateWithdrawn) -> None:
        if self._checkpoints is None:
            return
        if ev.template_id >= 256:
            self._mark(template_key(ev.session, ev.template_id), None)
            return
        # a withdrawal of all (data or options) templates: mark every stored one of this session that is gone now
        prefix = template_key(ev.session, 0)[:-1]
        for key in list(self._stored):
            if key.startswith(prefix) and int(key.rsplit("|", 1)[1]) not in ev.session.templates:
                self._mark(key, None)

    async def _restore_templates(self) -> None:
        stored = await self._checkpoints.aitems()
        self._stored = set(stored)
        restored = 0
        for key, value in stored.items():
            try:
                exporter, version, domain, _ = parse_template_key(key)
                self.collector.restore(exporter, version, domain, Template.from_bytes(value))
                restored += 1
            except (ValueError, struct.error):
                self._telemetry.add("tapio_netflow_template_store_errors_total", 1)
                self._settings.logger.warning("%s: stored template %r cannot be read; ignored", self._settings.id, key)
        if restored:
            self._settings.logger.info("%s: %d templates restored from storage", self._settings.id, restored)

    async def _persist_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            await self._persist_now()

    async def _persist_now(self) -> None:
        dirty, self._dirty = self._dirty, {}
        puts = {k: v for k, v in dirty.items() if v is not None}
        try:
            if puts:
                await self._checkpoints.aput_many(puts)
            for key in (k for k, v in dirty.items() if v is None):
                await self._checkpoints.adelete(key)
        except Exception as exc:  # storage trouble must not stop the flows; counted and logged
            self._telemetry.add("tapio_netflow_template_store_errors_total", len(dirty))
            self._settings.logger.warning("%s: cannot store %d templates: %s", self._settings.id, len(dirty), exc)
            return
        self._stored.update(puts)
        self._stored.difference_update(k for k, v in dirty.items() if v is None)

    # -- kernel drops and metrics

    async def _poll_drops(self) -> None:
        while True:
            await trio.sleep(DROP_POLL_SECONDS)
            self.poll_drops()

    def poll_drops(self) -> None:
        for sock, key in self._sockets:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 64)
            except OSError:
                return
            values = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
            if len(values) <= _SK_MEMINFO_DROPS:
                return
            drops = values[_SK_MEMINFO_DROPS]
            delta = drops - self._kernel_drops.get(sock.fileno(), 0)
            if delta > 0:
                self._telemetry.add("tapio_netflow_socket_drops_total", delta, listener=key.split(".")[1])
            self._kernel_drops[sock.fileno()] = drops

    async def _metrics_loop(self) -> None:
        while True:
            await trio.sleep(float(self._config.metrics_interval))
            try:
                await self._output.send(Batch.of(Signal.METRICS, self.metrics_request()))
            except Refused:
                pass  # the next interval carries the same cumulative totals

    def metrics_request(self) -> ExportMetricsServiceRequest:
        """Cumulative sums since start: traffic by exporter and protocol, error counters, sFlow interface counters."""
        now = time.time_ns()
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.add(key="service.name").value.string_value = "tapio"
        rm.resource.attributes.add(key="host.name").value.string_value = socket.gethostname()
        sm = rm.scope_metrics.add()
        sm.scope.name, sm.scope.version = SCOPE_NAME, SCOPE_VERSION

        def series(name: str, description: str, unit: str) -> Any:
            m = sm.metrics.add(name=name, description=description, unit=unit)
            m.sum.aggregation_temporality = 2  # cumulative
            m.sum.is_monotonic = True
            return m.sum

        def point(s: Any, value: int, **attrs: Any) -> None:
            p = s.data_points.add(start_time_unix_nano=self._start_ns, time_unix_nano=now, as_int=value)
            for k, v in attrs.items():
                a = p.attributes.add(key=k)
                if isinstance(v, int):
                    a.value.int_value = v
                else:
                    a.value.string_value = v

        traffic = [
            series("tapio.netflow.bytes", "Bytes of the flows received, by exporter and protocol.", "By"),
            series("tapio.netflow.packets", "Packets of the flows received, by exporter and protocol.", "{packet}"),
            series("tapio.netflow.flows", "Flow records received, by exporter and protocol.", "{flow}"),
        ]
        for exporter, by_proto in sorted(self.totals.items()):
            for proto, values in sorted(by_proto.items()):
                for s, v in zip(traffic, values):
                    point(s, v, **{"flow.sampler_address": exporter, "network.transport": protocol_name(proto)})
        if self.errors:
            errors = series("tapio.netflow.errors", "Malformed datagrams, unknown templates, dropped held sets, sequence gaps and misses, by exporter and kind.", "{event}")
            for (exporter, name), v in sorted(self.errors.items()):
                point(errors, v, **{"flow.sampler_address": exporter, "error.type": name})
        if self.interfaces:
            io = series("tapio.netflow.interface.io", "Interface bytes an sFlow agent counted, by direction.", "By")
            packets = series("tapio.netflow.interface.packets", "Interface packets an sFlow agent counted, by direction.", "{packet}")
            errs = series("tapio.netflow.interface.errors", "Interface errors an sFlow agent counted, by direction.", "{error}")
            dropped = series("tapio.netflow.interface.dropped", "Interface discards an sFlow agent counted, by direction.", "{packet}")
            for (agent, index), c in sorted(self.interfaces.items()):
                for direction, o, p, e, d in (
                    ("receive", c.in_octets, c.in_packets, c.in_errors, c.in_discards),
                    ("transmit", c.out_octets, c.out_packets, c.out_errors, c.out_discards),
                ):
                    attrs = {"flow.sampler_address": agent, "network.interface.index": index, "network.io.direction": direction}
                    point(io, o, **attrs)
                    point(packets, p, **attrs)
                    point(errs, e, **attrs)
                    point(dropped, d, **attrs)
        return req
