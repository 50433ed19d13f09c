"""The running ebpf receiver: drain the ring buffer under trio, hand OTLP batches on.

Invariants:
- The event loop never blocks on the kernel or the filesystem beyond one
  small /proc read per new process: the compile runs in a child process at
  start (see _loader); the steady state waits on the ring buffer's fd with
  `trio.lowlevel.wait_readable` and reads the records straight from its
  memory mapping (`_ringbuf`). Two things run in worker threads, each
  bounded by a deadline: a walk of the cgroup2 tree for a gone process's
  container (at most one at a time, `CGROUP_WALK_SECONDS`), and detaching
  the probes on shutdown (`DETACH_SECONDS`).
- One drain of at most `DRAIN_CHUNK` events → at most one batch per wired
  signal (a logs batch with one record per event, a traces batch with the
  spans that ended); a fuller ring is drained chunk by chunk, with a
  checkpoint between chunks so that a storm does not stall the event loop. The kernel
  cannot wait, so batches go with ``send_nowait``; a refused batch is counted
  by its items in ``tapio_ebpf_events_dropped_total{reason}``, never retried.
- What an event becomes is `_records`' business; containers are resolved
  here, once per (pid, cgroup id) of a drain. Records are written as OTLP
  bytes and handed on unparsed (`Batch.from_bytes` with a count): exporters
  send the bytes as they are, a stage that reads records parses them.
- A batch holds one resource per container (the host's attributes plus
  container.id, container.runtime.name, k8s.pod.uid) and one for host
  processes, in the order their first event came; each record keeps those
  attributes too, so k8sattributes finds the pod from the resource.
- Kernel loss and rate-limit counters are read once a second and added to
  self-telemetry as deltas, so the tapio_* counters equal the kernel's.
- Time: events carry CLOCK_BOOTTIME ns; `Program.boot_to_unix_ns`, measured
  once at start, turns them into unix ns (wall-clock steps after start are
  not followed).
- Pending span state (exec info by pid) is bounded by
  ``traces.max_pending``; evictions are counted.
- On shutdown the ring buffer is drained a last time (shielded, within the
  shutdown grace) and every probe is detached in a worker thread (shielded,
  within `DETACH_SECONDS`): detaching waits for the kernel (an RCU grace
  period per probe), the event loop does not.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import trio
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from tapio import otlpwire as enc
from tapio.component import Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER

from .._handoff import send_or_count
from . import _decode as d
from ._config import Config
from ._containers import REASONS, Container, ContainerResolver, walk_cgroup_tree
from ._loader import Program, cgroup2_root, open_program
from . import _records
from ._records import RecordWriter

SCOPE_NAME = "tapio.ebpf"
SCOPE_VERSION = "0.1.0"
#: how often the kernel's loss counters are read
COUNTER_POLL_SECONDS = 1.0
#: events handled between two checkpoints of the event loop (a few ms of work: ~2-3 µs an event with the compiled drain path, ~7.5 µs in Python)
DRAIN_CHUNK = 1024
#: longest wait for one walk of the cgroup2 tree (a worker thread); then the walk's results are not waited for
CGROUP_WALK_SECONDS = 2.0
#: longest wait for the probes to detach on shutdown (normally ~1.5 s)
DETACH_SECONDS = 10.0
#: resources kept encoded (one per container seen); emptied when full
RESOURCE_CACHE_SIZE = 4096
#: opentelemetry/proto/metrics/v1: AggregationTemporality
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

EVENT_KINDS = ("exec", "exit", "open", "tcp", "oom", "signal")


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
        #: the tree walks' worker threads: one at a time
        self._walk_limiter = trio.CapacityLimiter(1)
        self._writer = RecordWriter(max_pending=config.traces.max_pending, ppid_of=_ppid_from_proc)
        self._kernel_counters = [0] * 16
        self._events = {k: 0 for k in EVENT_KINDS}
        self._unresolved = {r: 0 for r in REASONS}
        self._dropped: dict[str, int] = {}
        self._start_unix_ns = time.time_ns()
        self._resource_attrs = [("host.name", socket.gethostname()), ("os.type", "linux"), ("service.name", "tapio")]
        self._resource_blob = enc.attributes(enc.T_ATTR_RESOURCE, self._resource_attrs)
        #: container attribute pieces -> resource attributes
        self._resources: dict[tuple[bytes, ...], bytes] = {}
        self._scope_blob = enc.scope(SCOPE_NAME, SCOPE_VERSION)
        self._ring_open = False
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
            settings.logger.info(
                "%s: tracing %s%s; %s",
                settings.id,
                ", ".join(program.enabled),
                f" (kernel features: {features})" if features else "",
                self.writer_summary(),
            )
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._counter_loop)
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    if config.flush_interval > 0:
                        await trio.sleep(config.flush_interval)
                    # A storm can leave tens of thousands of events: hand them on in
                    # chunks, letting the other components run between them.
                    while await self.drain(DRAIN_CHUNK) == DRAIN_CHUNK:
                        await trio.lowlevel.checkpoint()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    with trio.move_on_after(settings.shutdown_grace):
                        if self._ring_open:
                            await self.drain()
                            self._poll_counters()
                finally:
                    self._ring_open = False
                    self.program = None
                    await self._detach(program)

    def writer_summary(self) -> str:
        """How records are written: by the compiled loop, or in Python and why (the start summary says which)."""
        if self._writer.compiled:
            return "TCP and open records written by the compiled loop"
        return f"records written in Python: {_records.COMPILED_MISSING}"

    async def drain(self, limit: int = 1 << 20) -> int:
        """Consume what the ring buffer holds now (at most ``limit`` events) and hand it on; returns the events read."""
        assert self.program is not None
        raws = self.program.ring().read(limit)
        if raws:
            await self.deliver(raws)
        return len(raws)

    async def _detach(self, program: Program) -> None:
        """Close the program in a worker thread, waiting at most DETACH_SECONDS (call shielded).

        Each detach waits for an RCU grace period (~80 ms, ~1.5 s for all):
        off the event loop, so other components drain meanwhile. A close that
        takes longer goes on in its thread while shutdown proceeds; the
        kernel frees what is left when the process exits.
        """
        with trio.move_on_after(DETACH_SECONDS):
            await trio.to_thread.run_sync(program.close, abandon_on_cancel=True)
            return
        self._settings.logger.warning("%s: detaching the probes took over %.0fs; left to finish in the background", self._settings.id, DETACH_SECONDS)

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
            m.sum.aggregation_temporality = CUMULATIVE
            m.sum.is_monotonic = True
            for key, value in sorted(values.items()):
                p = m.sum.data_points.add(start_time_unix_nano=self._start_unix_ns, time_unix_nano=now, as_int=value)
                _put(p.attributes, label, key)
        return req

    # -- events to OTLP

    def _send(self, batch: Batch) -> None:
        send_or_count(self._output, batch, self._telemetry, "tapio_ebpf_events_dropped_total", self._dropped)

    async def deliver(self, raws: list[bytes]) -> None:
        """Turn raw ring-buffer records into at most one logs and one traces batch, and hand them on.

        Records that do not decode are counted as bad input and skipped.
        Containers are resolved once per (pid, cgroup id) of the drain; a
        walk of the cgroup2 tree, when one is needed, runs in a worker thread.
        """
        scan = self._writer.scan(raws)
        for reason, n in scan.bad.items():
            self._telemetry.bad_input(reason, n)
        events, keys = scan.events, scan.keys
        if not events:
            return
        for kind, n in scan.kinds.items():
            name = d.KIND_NAMES[kind]
            self._events[name] += n
            self._telemetry.add("tapio_ebpf_events_total", n, kind=name)
        containers = await self._containers(keys)
        wired = self._output.signals
        drain = self._writer.write(
            events,
            containers,
            offset=self.program.boot_to_unix_ns if self.program else 0,
            observed=time.time_ns(),
            logs=Signal.LOGS in wired,
            traces=Signal.TRACES in wired,
        )
        for pid, cgroup_id in drain.exited:
            self._resolver.forget_pid(pid, cgroup_id)
        if drain.evicted:
            self._telemetry.add("tapio_ebpf_spans_evicted_total", drain.evicted)
        # bytes written directly (see _records), handed on unparsed: a stage that reads the records parses them
        if drain.records:
            self._send(self._batch(Signal.LOGS, drain.records))
        if drain.spans:
            self._send(self._batch(Signal.TRACES, drain.spans))

    def _batch(self, signal: Signal, groups: dict[tuple[bytes, ...], list[bytes]]) -> Batch:
        """A batch of one export request: a resource per container (the host's attributes and the container's), joined once."""
        count = 0
        parts: list[bytes] = []
        for pieces, items in groups.items():
            count += len(items)
            parts.append(enc.request_head(self._resource_of(pieces), self._scope_blob, sum(map(len, items))))
            parts += items
        return Batch.from_bytes(signal, b"".join(parts), count)

    def _resource_of(self, pieces: tuple[bytes, ...]) -> bytes:
        """The resource attributes of a container's events: the host's plus its container.id, .runtime.name, k8s.pod.uid (cached)."""
        if not pieces:
            return self._resource_blob
        found = self._resources.get(pieces)
        if found is None:
            if len(self._resources) >= RESOURCE_CACHE_SIZE:
                self._resources.clear()
            found = self._resources[pieces] = self._resource_blob + enc.frame(enc.T_ATTR_RESOURCE, list(pieces))
        return found

    async def _containers(self, keys: dict[tuple[int, int], int]) -> dict[tuple[int, int], Container | None]:
        """The container of each (pid, cgroup id), with its events counted by reason when none is found."""
        resolver = self._resolver
        out: dict[tuple[int, int], Container | None] = {}
        unresolved: dict[str, int] = {}
        #: gone processes whose cgroup a tree walk may find: key -> (reason, events)
        walk: dict[tuple[int, int], tuple[str, int]] = {}
        for key, n in keys.items():
            found, reason = resolver.resolve(*key)
            if found is not None:
                out[key] = found
            elif reason != "host" and resolver.wants_walk(key[1]):
                walk[key] = (reason, n)
            else:
                unresolved[reason] = unresolved.get(reason, 0) + n
        if walk:
            wanted = {cgroup_id for _, cgroup_id in walk}
            resolver.learn_walk(await self._walk_cgroups(), wanted)
            for key, (reason, n) in walk.items():
                found = resolver.by_cgroup(key[1])
                if found is not None:
                    out[key] = found
                else:
                    unresolved[reason] = unresolved.get(reason, 0) + n
        for reason, n in unresolved.items():
            self._unresolved[reason] += n
            self._telemetry.add("tapio_ebpf_container_unresolved_total", n, reason=reason)
        return out

    async def _walk_cgroups(self) -> dict[int, Container]:
        """`walk_cgroup_tree` in a worker thread: it lists every cgroup directory, which takes milliseconds on a busy node."""
        root = self._resolver.cgroup2_root
        assert root is not None
        with trio.move_on_after(CGROUP_WALK_SECONDS):
            return await trio.to_thread.run_sync(walk_cgroup_tree, root, limiter=self._walk_limiter, abandon_on_cancel=True)
        self._settings.logger.warning("%s: walking %s for container cgroups took over %.0fs; gave up on this walk", self._settings.id, root, CGROUP_WALK_SECONDS)
        return {}


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
