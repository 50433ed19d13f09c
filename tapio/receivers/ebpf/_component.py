"""The running ebpf receiver: drain the ring buffer under trio, hand OTLP batches on.

Invariants:
- No threads: the compile runs in a child process at start (see _loader);
  the steady state waits on the ring buffer's fd with
  `trio.lowlevel.wait_readable` and reads the records straight from its
  memory mapping (`_ringbuf`), without blocking.
- One drain of at most `DRAIN_CHUNK` events → at most one batch per wired
  signal (a logs batch with one record per event, a traces batch with the
  spans that ended); a fuller ring is drained chunk by chunk, with a
  checkpoint between chunks so that a storm does not stall the event loop. The kernel
  cannot wait, so batches go with ``send_nowait``; a refused batch is counted
  by its items in ``tapio_ebpf_events_dropped_total{reason}``, never retried.
- Records are written as OTLP bytes (`tapio.otlpwire`) and parsed once into the
  batch, which keeps the bytes: exporters send them without re-serializing.
  Attributes shared by one task's events are encoded once and cached.
- A batch holds one resource per container (the host's attributes plus
  container.id, container.runtime.name, k8s.pod.uid) and one for host
  processes, in the order their first event came; each record keeps those
  attributes too. Grouping here costs ~0.6 µs an event and spares
  k8sattributes regrouping by record (~11 µs an event:
  bench/bench_k8sattributes.py, ``ebpf_layout_us_per_record``).
- Kernel loss and rate-limit counters are read once a second and added to
  self-telemetry as deltas, so the tapio_* counters equal the kernel's.
- Time: events carry CLOCK_BOOTTIME ns; `Program.boot_to_unix_ns`, measured
  once at start, turns them into unix ns (wall-clock steps after start are
  not followed).
- Pending span state (exec info by pid) is bounded by
  ``traces.max_pending``; evictions are counted.
- On shutdown the ring buffer is drained a last time (shielded, without
  waiting) and every probe is detached, in a worker thread: detaching
  waits for the kernel (an RCU grace period per probe), the event loop
  does not.
"""

from __future__ import annotations

import os
import random
import signal as signal_module
import socket
import time
from collections import OrderedDict
from typing import Any

import trio
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER

from . import _decode as d
from tapio import otlpwire as enc
from ._config import Config
from ._containers import REASONS, ContainerResolver
from ._loader import Program, cgroup2_root, open_program

SCOPE_NAME = "tapio.ebpf"
SCOPE_VERSION = "0.1.0"
#: how often the kernel's loss counters are read
COUNTER_POLL_SECONDS = 1.0
SEV_INFO, SEV_WARN = 9, 13
#: opentelemetry/proto/trace/v1: Span.SpanKind, Status.StatusCode
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 1, 2, 3
STATUS_CODE_ERROR = 2
#: tasks whose shared attributes are kept ready to copy; the cache is dropped when full
COMMON_CACHE_SIZE = 4096
#: events handled between two checkpoints of the event loop (~15 ms of work at ~13 µs an event)
DRAIN_CHUNK = 1024

EVENT_KINDS = ("exec", "exit", "open", "tcp", "oom", "signal")

_ERRNO_NAMES = {n: name for name, n in vars(__import__("errno")).items() if name.startswith("E") and isinstance(n, int)}


def _signal_name(sig: int) -> str:
    try:
        return signal_module.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


def _put(attrs: Any, key: str, value: Any) -> None:
    kv = attrs.add(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, str):
        kv.value.string_value = value
    else:
        kv.value.array_value.values.extend(_string_values(value))


def _string_values(values: list[str]) -> list[Any]:
    return [AnyValue(string_value=v) for v in values]


class EbpfReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the ebpf receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._telemetry = settings.telemetry
        #: the compiled program while running (tests read its counters and maps)
        self.program: Program | None = None
        root = cgroup2_root()
        self._resolver = ContainerResolver(
            max_entries=config.container_cache_size,
            root_cgroup_id=os.stat(root).st_ino if root else 1,
            cgroup2_root=root,
        )
        self._pending_exec: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._kernel_counters = [0] * 16
        self._events = {k: 0 for k in EVENT_KINDS}
        self._unresolved = {r: 0 for r in REASONS}
        self._dropped: dict[str, int] = {}
        self._start_unix_ns = time.time_ns()
        self._resource_attrs = [("host.name", socket.gethostname()), ("os.type", "linux"), ("service.name", "tapio")]
        self._resource_blob = enc.attributes(enc.T_ATTR_RESOURCE, self._resource_attrs)
        self._scope_blob = enc.scope(SCOPE_NAME, SCOPE_VERSION)
        self._ring_open = False
        self._unresolved_now: dict[str, int] = {}
        self._common_cache: dict[tuple, list[bytes]] = {}
        self._resource_cache: dict[Any, bytes] = {}
        self._declare_metrics()

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, config = self._settings, self._config
        program = await open_program(config)
        self.program = program
        try:
            for kind, why in program.disabled.items():
                settings.logger.warning("%s: %s events disabled: %s", settings.id, kind, why)
            program.ring()
            self._ring_open = True
            fd = program.ring_fd
            self._start_unix_ns = time.time_ns()
            features = ", ".join(f"{name}: {'yes' if ok is True else ok}" for name, ok in program.features.items())
            settings.logger.info("%s: tracing %s%s", settings.id, ", ".join(program.enabled), f" (kernel features: {features})" if features else "")
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._counter_loop)
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    if config.flush_interval > 0:
                        await trio.sleep(config.flush_interval)
                    # A storm can leave tens of thousands of events: hand them on in
                    # chunks, letting the other components run between them.
                    while self.drain(DRAIN_CHUNK) == DRAIN_CHUNK:
                        await trio.lowlevel.checkpoint()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    if self._ring_open:
                        self.drain()
                        self._poll_counters()
                finally:
                    self._ring_open = False
                    self.program = None
                    # Each detach waits for an RCU grace period (~80 ms, ~1.5 s for
                    # all): off the event loop, so other components drain meanwhile.
                    await trio.to_thread.run_sync(program.close)

    def drain(self, limit: int = 1 << 20) -> int:
        """Consume what the ring buffer holds now (at most ``limit`` events) and hand it on; returns the events read."""
        assert self.program is not None
        raws = self.program.ring().read(limit)
        if raws:
            self.handle(raws)
        return len(raws)

    # -- telemetry

    def _declare_metrics(self) -> None:
        t = self._telemetry
        t.declare("tapio_ebpf_events_total", COUNTER, "Kernel events read from the ring buffer, by kind.")
        t.declare("tapio_ebpf_events_lost_total", COUNTER, "Kernel events lost because the ring buffer was full, by kind.")
        t.declare("tapio_ebpf_events_rate_limited_total", COUNTER, "Kernel events dropped in the kernel by the per-cgroup rate limit, by kind.")
        t.declare("tapio_ebpf_events_dropped_total", COUNTER, "Records (log records, spans) dropped because the pipeline could not take them, by signal and reason.")
        t.declare("tapio_ebpf_container_unresolved_total", COUNTER, "Events whose container id could not be found, by reason.")
        t.declare("tapio_ebpf_spans_evicted_total", COUNTER, "Processes forgotten between exec and exit because traces.max_pending was reached.")

    async def _counter_loop(self) -> None:
        interval = float(self._config.metrics_interval)
        next_emit = trio.current_time() + interval if interval > 0 else None
        while True:
            await trio.sleep(min(COUNTER_POLL_SECONDS, interval) if interval > 0 else COUNTER_POLL_SECONDS)
            self._poll_counters()
            if next_emit is not None and trio.current_time() >= next_emit:
                next_emit = trio.current_time() + interval
                if Signal.METRICS in self._output.signals:
                    self._send(Batch.of(Signal.METRICS, self.metrics_request()))

    def _poll_counters(self) -> None:
        if self.program is None:
            return
        now = self.program.counters()
        for slot, value in enumerate(now):
            delta = value - self._kernel_counters[slot]
            if delta <= 0:
                continue
            if slot < 8:
                self._telemetry.add("tapio_ebpf_events_lost_total", delta, kind=d.KIND_NAMES.get(slot, "other"))
            else:
                self._telemetry.add("tapio_ebpf_events_rate_limited_total", delta, kind=d.KIND_NAMES.get(slot - 8, "other"))
        self._kernel_counters = now

    def kernel_counters(self) -> dict[str, dict[str, int]]:
        """The kernel's cumulative ``lost`` and ``rate_limited`` counts by kind, as last read."""
        c = self._kernel_counters
        return {
            "lost": {name: c[num] for num, name in d.KIND_NAMES.items()},
            "rate_limited": {name: c[8 + num] for num, name in d.KIND_NAMES.items()},
        }

    def metrics_request(self) -> ExportMetricsServiceRequest:
        """Cumulative sums since start: events by kind, lost and rate-limited events, drops, unresolved containers."""
        now = time.time_ns()
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        for k, v in self._resource_attrs:
            _put(rm.resource.attributes, k, v)
        sm = rm.scope_metrics.add()
        sm.scope.name, sm.scope.version = SCOPE_NAME, SCOPE_VERSION
        counters = self.kernel_counters()
        series = [
            ("tapio.ebpf.events", "Kernel events read, by kind.", "kind", self._events),
            ("tapio.ebpf.events.lost", "Kernel events lost to a full ring buffer, by kind.", "kind", counters["lost"]),
            ("tapio.ebpf.events.rate_limited", "Kernel events dropped by the per-cgroup rate limit, by kind.", "kind", counters["rate_limited"]),
            ("tapio.ebpf.records.dropped", "Records the pipeline could not take, by reason.", "reason", self._dropped),
            ("tapio.ebpf.container.unresolved", "Events without a container id, by reason.", "reason", self._unresolved),
        ]
        for name, description, label, values in series:
            m = sm.metrics.add(name=name, description=description, unit="{event}")
            m.sum.aggregation_temporality = 2  # cumulative
            m.sum.is_monotonic = True
            for key, value in sorted(values.items()):
                p = m.sum.data_points.add(start_time_unix_nano=self._start_unix_ns, time_unix_nano=now, as_int=value)
                _put(p.attributes, label, key)
        return req

    # -- events to OTLP

    def _send(self, batch: Batch) -> None:
        try:
            self._output.send_nowait(batch)
        except (trio.WouldBlock, Refused) as exc:
            reason = "pipeline_full" if isinstance(exc, trio.WouldBlock) else "refused"
            self._dropped[reason] = self._dropped.get(reason, 0) + batch.count
            self._telemetry.add("tapio_ebpf_events_dropped_total", batch.count, reason=reason, signal=batch.signal.value)

    def handle(self, raws: list[bytes]) -> None:
        """Turn raw ring-buffer records into at most one logs and one traces batch, and hand them on.

        Records that do not decode are counted as bad input and skipped.
        """
        wired = self._output.signals
        #: items by container (None: host processes)
        records: dict[Any, list[bytes]] | None = {} if Signal.LOGS in wired else None
        spans: dict[Any, list[bytes]] | None = {} if Signal.TRACES in wired else None
        offset = self.program.boot_to_unix_ns if self.program else 0
        observed = time.time_ns()
        kinds = {k: 0 for k in EVENT_KINDS}
        for raw in raws:
            try:
                ev = d.parse_event(raw)
            except d.DecodeError as exc:
                self._telemetry.bad_input(str(exc).split(" of ")[0][:40])
                continue
            kinds[d.KIND_NAMES[ev.h.kind]] += 1
            self._event(ev, offset, observed, records, spans)
        for k, n in kinds.items():
            if n:
                self._events[k] += n
                self._telemetry.add("tapio_ebpf_events_total", n, kind=k)
        unresolved, self._unresolved_now = self._unresolved_now, {}
        for reason, n in unresolved.items():
            self._unresolved[reason] += n
            self._telemetry.add("tapio_ebpf_container_unresolved_total", n, reason=reason)
        # one parse of bytes written directly (see tapio.otlpwire); the batch keeps them for exporters
        if records:
            self._send(Batch.from_bytes(Signal.LOGS, self._request(records)))
        if spans:
            self._send(Batch.from_bytes(Signal.TRACES, self._request(spans)))

    def _request(self, groups: dict[Any, list[bytes]]) -> bytes:
        """One export request with a resource per container (`enc.request` writes one resource; requests concatenate)."""
        return b"".join(enc.request(self._container_resource(c), self._scope_blob, items) for c, items in groups.items())

    def _container_resource(self, container: Any) -> bytes:
        """The resource attributes of a container's events: the host's and the container's (encoded once, cached)."""
        if container is None:
            return self._resource_blob
        found = self._resource_cache.get(container)
        if found is None:
            pairs = [("container.id", container.id)]
            if container.runtime:
                pairs.append(("container.runtime.name", container.runtime))
            if container.pod_uid:
                pairs.append(("k8s.pod.uid", container.pod_uid))
            if len(self._resource_cache) >= COMMON_CACHE_SIZE:
                self._resource_cache.clear()
            found = self._resource_cache[container] = self._resource_blob + enc.attributes(enc.T_ATTR_RESOURCE, pairs)
        return found

    def _event(
        self, ev: d.Event, offset: int, observed: int, records: dict[Any, list[bytes]] | None, spans: dict[Any, list[bytes]] | None
    ) -> None:
        h = ev.h
        container, reason = self._resolver.resolve(h.pid, h.cgroup_id)
        if container is None:
            self._unresolved_now[reason] = self._unresolved_now.get(reason, 0) + 1
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
                err = _ERRNO_NAMES.get(-ev.ret, str(-ev.ret))
                extra += [("error.type", err), ("tapio.ebpf.open.errno", -ev.ret)]
                body = f"open {ev.path}: {err}"
            if ev.flags & 0o100:
                extra.append(("tapio.ebpf.open.mode", ev.mode))
        elif isinstance(ev, d.ExecEvent):
            extra = [
                ("process.parent_pid", ev.ppid or _ppid_from_proc(h.pid)),
                ("process.executable.path", ev.filename),
                ("process.executable.name", ev.filename.rsplit("/", 1)[-1]),
                ("process.command_args", ev.argv),
            ]
            if ev.args_truncated:
                extra.append(("tapio.ebpf.exec.args_truncated", True))
            if ev.old_pid != h.pid:
                extra.append(("tapio.ebpf.exec.old_pid", ev.old_pid))
            body = f"exec {ev.filename}"
            self._remember_exec(h.pid, ev.filename, ts)
        elif isinstance(ev, d.ExitEvent):
            if ev.ppid:
                extra.append(("process.parent_pid", ev.ppid))
            if ev.exit_signal:
                extra.append(("tapio.ebpf.exit.signal", _signal_name(ev.exit_signal)))
                body = f"exit {h.comm}: killed by {_signal_name(ev.exit_signal)}"
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
            self._resolver.forget_pid(h.pid, h.cgroup_id)
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
            failed = ev.event == d.TCP_CONNECT and ev.newstate == 7
            peer = f"[{ev.daddr}]:{ev.dport}" if ev.family == d.AF_INET6 else f"{ev.daddr}:{ev.dport}"
            body = f"tcp {event} {peer}" + (" failed" if failed else "")
            if spans is not None and (ev.event == d.TCP_CLOSE or failed):
                outbound = ev.states_seen & (1 << 2)  # went through SYN_SENT: we connected
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
                ("tapio.ebpf.signal.name", _signal_name(ev.sig)),
                ("tapio.ebpf.signal.target_pid", ev.target_pid),
                ("tapio.ebpf.signal.target_comm", ev.target_comm),
                ("tapio.ebpf.signal.code", ev.code),
                ("tapio.ebpf.signal.result", ev.result),
            ]
            body = f"signal {_signal_name(ev.sig)} from {h.pid} to {ev.target_pid}"

        pieces = self._common_attributes(h, kind, container) + enc.kv_pieces(extra)
        trace_id = span_id = b""
        if span is not None and spans is not None:
            name, span_kind, start, end, failed, message = span
            trace_id, span_id = random.randbytes(16), random.randbytes(8)
            spans.setdefault(container, []).append(
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
            records.setdefault(container, []).append(
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

    def _common_attributes(self, h: d.Header, kind: str, container: Any) -> list[bytes]:
        """The attributes every event of one task and kind shares, encoded once (`otlpwire.kv_pieces`; a new list each call)."""
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

    def _remember_exec(self, pid: int, filename: str, ts: int) -> None:
        limit = self._config.traces.max_pending
        if limit <= 0:
            return
        self._pending_exec[pid] = (filename, ts)
        self._pending_exec.move_to_end(pid)
        while len(self._pending_exec) > limit:
            self._pending_exec.popitem(last=False)
            self._telemetry.add("tapio_ebpf_spans_evicted_total", 1)


def _ppid_from_proc(pid: int) -> int:
    """The parent pid from /proc when the kernel side did not see the fork (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    try:
        return int(stat.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0
