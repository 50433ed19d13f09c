"""The runtime: wire the pipeline graph with bounded channels and run it under trio.

Invariants:
- Batches, never single records, cross channels, and every channel is
  bounded (`CHANNEL_CAPACITY` batches): a slow stage pushes back on the
  stages before it, up to the receivers.
- Start order is exporters → processors → receivers, each through
  ``nursery.start``; a component failing before ``started()`` stops the
  service with `ComponentStartError` naming it.
- Shutdown (`Service.shutdown`) cancels only the receivers. The runtime then
  closes the pipelines' entry channels; end of stream flows downstream:
  each processor drains its input, flushes and returns, after which its
  output is closed; exporters drain and return. Everything left running
  when ``service.shutdown_timeout`` expires is cancelled (components flush
  under their own shielded grace).
- The runtime owns every channel. A component that fails while running is
  re-created on the same channels after a backoff (or stops the service,
  by config); its failures and restarts are counted per component id.
- Counting: a receiver's accepted/refused items are counted where it hands
  batches on; a processor's incoming items where they enter its channel and
  its outgoing items where they leave it; exporters count what they sent.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import trio

from tapio.component import Admits, ComponentID, Factory, Kind, PipelineID, Ports, Refused, Registry, Settings, Stage
from tapio.graph import Graph, Node, build_graph
from tapio.pdata import Batch, DoneCountdown, Signal
from tapio.telemetry import ComponentTelemetry, Telemetry

if TYPE_CHECKING:
    from tapio.config import Config

log = logging.getLogger("tapio.service")

#: Capacity of every inter-stage channel, in batches. Small, because batches
#: are large (a batch processor's output is ~8k items): a deeper queue only
#: adds memory and latency before backpressure reaches the receivers.
CHANNEL_CAPACITY = 16


class ComponentStartError(Exception):
    """A component failed during startup; names it."""

    def __init__(self, node: Node, cause: BaseException) -> None:
        self.node = node
        self.cause = cause
        super().__init__(f"{node.kind.value} {node.id}{_in_pipeline(node)} failed to start: {_describe(cause)}")


class StartupError(Exception):
    """Something the runtime itself starts (an extension, the self-telemetry server) failed to start."""


class ComponentFailedError(Exception):
    """A component failed while running and the failure policy is ``stop``."""

    def __init__(self, node: Node, cause: BaseException) -> None:
        self.node = node
        self.cause = cause
        super().__init__(f"{node.kind.value} {node.id}{_in_pipeline(node)} failed: {_describe(cause)}")


def _in_pipeline(node: Node) -> str:
    return f" in pipeline {node.pipeline}" if node.pipeline is not None else ""


def _describe(exc: BaseException) -> str:
    """The leaf messages of an exception (groups flattened)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc)
    return text if text else type(exc).__name__


# ---------------------------------------------------------------- consumers


class ChannelConsumer:
    """The entry to one channel; ``on_enter`` is called with every batch that entered.

    ``admit``, when given, is asked before a batch is handed on (by whoever
    wraps this consumer: `ReceiverConsumer`, a processor's output) and may
    raise `Refused` — e.g. a memory limiter over its soft limit — so that the
    refusal reaches the receiver, which can ask its client to retry.
    """

    def __init__(
        self,
        send: trio.MemorySendChannel[Batch],
        signals: frozenset[Signal],
        on_enter: Callable[[Batch], None] | None = None,
        admit: Callable[[Batch], None] | None = None,
        mutating: bool = False,
    ) -> None:
        self._send = send
        self.signals = signals
        self._on_enter = on_enter
        self._admit = admit
        self._mutating = mutating

    def admit(self, batch: Batch) -> None:
        if self._admit is not None:
            self._admit(batch)

    def has_room(self) -> bool:
        st = self._send.statistics()
        return st.current_buffer_used < st.max_buffer_size or st.tasks_waiting_receive > 0

    async def send(self, batch: Batch) -> None:
        if self._mutating:
            batch.forget_raw()  # the next stage changes records: their arrival bytes go stale
        await self._send.send(batch)
        if self._on_enter is not None:
            self._on_enter(batch)

    def send_nowait(self, batch: Batch) -> None:
        if self._mutating:
            batch.forget_raw()
        self._send.send_nowait(batch)
        if self._on_enter is not None:
            self._on_enter(batch)

    async def aclose(self) -> None:
        await self._send.aclose()


class FanoutConsumer:
    """Hands each batch to several consumers in turn.

    Consumers marked in ``mutating`` change records in place: each gets a
    deep copy, except that when all of them mutate the last keeps the original. ``on_done`` callbacks
    run once, after every consumer finished with its share; a send cut short
    (cancelled) reports the shares it did not hand on as not delivered.
    """

    def __init__(self, consumers: list[Stage], signals: frozenset[Signal], mutating: list[bool] | None = None, on_enter: Callable[[Batch], None] | None = None) -> None:
        self._consumers = consumers
        self.signals = signals
        self._mutating = mutating or [False] * len(consumers)
        self._on_enter = on_enter

    def _shares(self, batch: Batch) -> list[Batch]:
        n = len(self._consumers)
        if n == 1:
            return [batch]
        # Read-only consumers share the original; then every mutator needs its own
        # copy. With no read-only consumer, the last mutator may keep the original.
        keeps_original = -1 if not all(self._mutating) else n - 1
        shares = []
        for i in range(n):
            if self._mutating[i] and i != keeps_original:
                shares.append(batch.copy())
            else:
                shares.append(batch.share())
        if batch.on_done:
            join = DoneCountdown(batch.on_done, n)
            batch.on_done = []
            for s in shares:
                s.on_done.append(join.part_done)
        return shares

    def admit(self, batch: Batch) -> None:
        # Every consumer is asked before any is sent to: a refusal never leaves a partial fan-out.
        for consumer in self._consumers:
            consumer.admit(batch)

    async def send(self, batch: Batch) -> None:
        shares = self._shares(batch)
        for i, (consumer, share) in enumerate(zip(self._consumers, shares)):
            try:
                await consumer.send(share)
            except BaseException:
                # Cut short (cancelled, channel closed): the shares not handed on
                # report not delivered, so the sources still hear exactly once.
                # (A single share is the batch itself: its sender still owns it.)
                if len(shares) > 1:
                    for unsent in shares[i:]:
                        unsent.done(False)
                raise
        if self._on_enter is not None:
            self._on_enter(batch)

    def has_room(self) -> bool:
        return all(c.has_room() for c in self._consumers)

    def send_nowait(self, batch: Batch) -> None:
        # Check every consumer first so a refusal never leaves a partial fan-out.
        if not self.has_room():
            raise trio.WouldBlock
        for consumer, share in zip(self._consumers, self._shares(batch)):
            consumer.send_nowait(share)
        if self._on_enter is not None:
            self._on_enter(batch)

    async def aclose(self) -> None:
        for c in self._consumers:
            await c.aclose()


class ReceiverConsumer:
    """A receiver's (or connector's) output: routes batches by signal to its pipelines; counts accepted and refused items."""

    def __init__(self, routes: dict[Signal, Stage], telemetry: ComponentTelemetry, accepted: str = "receiver_accepted", refused: str = "receiver_refused") -> None:
        self._routes = routes
        self.signals = frozenset(routes)
        self._tel = telemetry
        self._accepted = accepted
        self._refused = refused

    def _route(self, batch: Batch) -> Stage:
        route = self._routes.get(batch.signal)
        if route is None:
            self._tel.signal_add(self._refused, batch.signal, batch.count)
            raise ValueError(f"no pipeline takes {batch.signal} from this receiver (wired: {', '.join(sorted(s.value for s in self.signals)) or 'none'})")
        return route

    async def send(self, batch: Batch) -> None:
        route = self._route(batch)
        try:
            route.admit(batch)
            await route.send(batch)
        except BaseException:
            self._tel.signal_add(self._refused, batch.signal, batch.count)
            raise
        self._tel.signal_add(self._accepted, batch.signal, batch.count)

    def send_nowait(self, batch: Batch) -> None:
        route = self._route(batch)
        try:
            route.admit(batch)
            route.send_nowait(batch)
        except (trio.WouldBlock, Refused):
            self._tel.signal_add(self._refused, batch.signal, batch.count)
            raise
        self._tel.signal_add(self._accepted, batch.signal, batch.count)


# ---------------------------------------------------------------- the service


class _Closes(Protocol):
    async def aclose(self) -> None: ...


@dataclass
class _Instance:
    """One running component as the supervisor sees it."""

    node: Node
    factory: Factory
    config: Any
    ports: Ports
    status: str = "created"  # created | starting | running | restarting | failed | stopped
    last_error: str = ""
    restarts: int = 0
    #: the component object currently running (replaced on restart)
    component: Any = None
    #: its `Admits.admit`, when it declares one
    admit: Callable[[Batch], None] | None = None
    #: closed by the supervisor after the component's run returned normally
    close_after: list[_Closes] = field(default_factory=list)


@dataclass(frozen=True)
class RuntimeOptions:
    shutdown_timeout: float = 10.0
    on_component_failure: str = "restart"  # restart | stop
    restart_initial: float = 1.0
    restart_max: float = 30.0
    #: grace each component gets to flush when cancelled
    component_grace: float = 5.0


class Service:
    """Runs one pipeline graph until `shutdown` is called; then drains it.

    Args:
        pipelines: ``service.pipelines`` (PipelineID → object with receivers/processors/exporters lists)
        components: the validated config of every component by kind and id
        registry: the factories
        telemetry: where counters go (and the health state is read from)
        extensions: the started extensions by id, handed to every component as ``Settings.extensions``
    """

    def __init__(
        self,
        *,
        pipelines: dict[PipelineID, Any],
        components: dict[Kind, dict[ComponentID, Any]],
        registry: Registry,
        telemetry: Telemetry,
        options: RuntimeOptions = RuntimeOptions(),
        extensions: Mapping[ComponentID, Any] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.graph: Graph = build_graph(pipelines, components.get(Kind.CONNECTOR, {}))
        self._components = components
        self._registry = registry
        self.telemetry = telemetry
        self.options = options
        self._extensions: Mapping[ComponentID, Any] = dict(extensions or {})
        self._log = logger
        self.instances: dict[str, _Instance] = {}
        self._shutdown = trio.Event()
        self._ready = False
        self._stopping = False
        self._receiver_fed: list[_Release] = []

    # -- health, for /healthz and /readyz

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    def failing(self) -> list[str]:
        """The components that are failing (restarting or failed), as ``kind:id`` (``kind:id@pipeline`` for processors)."""
        return [
            f"{i.node.kind.value}:{i.node.id}{'@' + str(i.node.pipeline) if i.node.pipeline else ''}"
            for i in self.instances.values()
            if i.status in ("restarting", "failed")
        ]

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop receivers, drain the rest."""
        self._shutdown.set()

    def running(self) -> dict[tuple[Kind, ComponentID], Any]:
        """The started receivers and exporters by ``(kind, id)`` (for the start banner: the ports they bound)."""
        out: dict[tuple[Kind, ComponentID], Any] = {}
        for kind, nodes in ((Kind.RECEIVER, self.graph.receivers), (Kind.EXPORTER, self.graph.exporters)):
            for cid, node in nodes.items():
                inst = self.instances.get(node.key)
                if inst is not None and inst.component is not None:
                    out[(kind, cid)] = inst.component
        return out

    # -- wiring

    def _factory(self, node: Node) -> tuple[Factory, Any]:
        factory = self._registry.get(node.kind, node.id.type)
        if factory is None:
            raise LookupError(f"no {node.kind.value} factory for type {node.id.type!r}")
        return factory, self._components[node.kind][node.id]

    def _wire(self) -> tuple[list[_Instance], list[_Instance], list[_Instance], list[_Instance]]:
        """Instances with their channels: exporters, processors, connectors, receivers (the start order)."""
        exporters: list[_Instance] = []
        connectors: list[_Instance] = []
        inputs: dict[str, trio.MemorySendChannel[Batch]] = {}  # by node key: exporters' and connectors' input channels
        for group, nodes in ((exporters, self.graph.exporters), (connectors, self.graph.connectors)):
            for cid, node in sorted(nodes.items()):
                factory, cfg = self._factory(node)
                send, recv = trio.open_memory_channel[Batch](CHANNEL_CAPACITY)
                inputs[node.key] = send
                group.append(_Instance(node, factory, cfg, Ports(input=recv)))
                tel = self.telemetry.for_component(node.kind.value, str(cid))
                if node.kind is Kind.EXPORTER:
                    tel.gauge("tapio_exporter_queue_size", lambda r=recv: r.statistics().current_buffer_used)
                    tel.gauge("tapio_exporter_queue_capacity", lambda r=recv: r.statistics().max_buffer_size)
        tail_mutates = {inst.node.key: inst.factory.mutates_data for inst in connectors}

        processors: list[_Instance] = []
        entries: dict[PipelineID, _Entry] = {}
        mutating: dict[PipelineID, bool] = {}
        for pid, p in sorted(self.graph.pipelines.items()):
            sig = frozenset({p.signal})
            # The tail: fan in to each exporter (or connector) through a clone of its channel.
            flags = [tail_mutates.get(e.key, False) for e in p.exporters]
            tail_parts = [ChannelConsumer(inputs[e.key].clone(), sig, mutating=m) for e, m in zip(p.exporters, flags)]
            downstream: Stage = tail_parts[0] if len(tail_parts) == 1 else FanoutConsumer(tail_parts, sig, flags)
            pipeline_mutates = False
            for node in reversed(p.processors):
                factory, cfg = self._factory(node)
                pipeline_mutates = pipeline_mutates or factory.mutates_data
                send, recv = trio.open_memory_channel[Batch](CHANNEL_CAPACITY)
                ptel = self.telemetry.for_component("processor", str(node.id), pipeline=str(pid), otel_signal=p.signal.value)
                output = _CountingConsumer(downstream, lambda b, t=ptel: t.add("tapio_processor_outgoing_items_total", b.count))
                inst = _Instance(node, factory, cfg, Ports(input=recv, output=output), close_after=[output])
                processors.append(inst)
                downstream = ChannelConsumer(
                    send,
                    sig,
                    lambda b, t=ptel: t.add("tapio_processor_incoming_items_total", b.count),
                    admit=lambda b, i=inst: _admit(i, b),
                    mutating=factory.mutates_data and not factory.keeps_raw,
                )
            feeders = int(any(n.kind is Kind.RECEIVER for n in p.receivers)) + sum(n.kind is Kind.CONNECTOR for n in p.receivers)
            entries[pid] = _Entry(downstream, feeders)
            mutating[pid] = pipeline_mutates
        for send in inputs.values():
            send.close()  # only the pipelines' clones keep exporter and connector channels open
        processors.reverse()

        def output_of(node: Node, tel: ComponentTelemetry, counted: tuple[str, str]) -> tuple[ReceiverConsumer, list[_Closes]]:
            """A receiver's or connector's output: routes by signal to the pipelines that list it under receivers."""
            routes: dict[Signal, Stage] = {}
            by_signal: dict[Signal, list[PipelineID]] = {}
            for pid, p in sorted(self.graph.pipelines.items()):
                if any(r.key == node.key for r in p.receivers):
                    by_signal.setdefault(p.signal, []).append(pid)
            for sig, pids in by_signal.items():
                targets: list[Stage] = [_Shared(entries[pid]) for pid in pids]
                routes[sig] = targets[0] if len(targets) == 1 else FanoutConsumer(targets, frozenset({sig}), [mutating[pid] for pid in pids])
            releases: list[_Closes] = [_Release(entries[pid]) for pids in by_signal.values() for pid in pids]
            return ReceiverConsumer(routes, tel, *counted), releases

        for inst in connectors:
            tel = self.telemetry.for_component("connector", str(inst.node.id))
            inst.ports.output, inst.close_after = output_of(inst.node, tel, ("connector_emitted", "connector_refused"))
        receivers: list[_Instance] = []
        for rid, node in sorted(self.graph.receivers.items()):
            factory, cfg = self._factory(node)
            tel = self.telemetry.for_component("receiver", str(rid))
            out, _ = output_of(node, tel, ("receiver_accepted", "receiver_refused"))
            receivers.append(_Instance(node, factory, cfg, Ports(output=out)))
        # what the receivers feed ends once they all stopped: `run` releases their share
        self._receiver_fed = [_Release(entries[pid]) for pid, p in self.graph.pipelines.items() if any(n.kind is Kind.RECEIVER for n in p.receivers)]
        return exporters, processors, connectors, receivers

    # -- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, report started, run until `shutdown`, then drain and return.

        Raises `ComponentStartError` if a component fails to start (everything
        already started is stopped first), `ComponentFailedError` if one fails
        while running under the ``stop`` policy.
        """
        exporters, processors, connectors, receivers = self._wire()
        for inst in (*exporters, *processors, *connectors, *receivers):
            self.instances[inst.node.key] = inst
        # Everything after startup runs under one deadline once shutdown begins.
        drain_scope = trio.CancelScope()
        with drain_scope:
            async with trio.open_nursery() as exporter_nursery:
                for inst in exporters:
                    await self._start(exporter_nursery, inst)
                async with trio.open_nursery() as processor_nursery:
                    for inst in processors:
                        await self._start(processor_nursery, inst)
                    async with trio.open_nursery() as connector_nursery:
                        for inst in connectors:
                            await self._start(connector_nursery, inst)
                        try:
                            async with trio.open_nursery() as receiver_nursery:
                                for inst in receivers:
                                    await self._start(receiver_nursery, inst)
                                self._ready = True
                                task_status.started()
                                await self._shutdown.wait()
                                self._stopping = True
                                self._log.info("shutting down: stopping receivers, draining pipelines", extra={"kv": {"deadline_s": self.options.shutdown_timeout}})
                                drain_scope.deadline = trio.current_time() + self.options.shutdown_timeout
                                receiver_nursery.cancel_scope.cancel()
                        finally:
                            self._stopping = True
                            # End of stream from the receivers: processors drain, flush and close their
                            # outputs; a connector ends when every pipeline feeding it did, and then ends
                            # the pipelines it feeds (the graph has no cycles, so this terminates).
                            with trio.CancelScope(shield=True):
                                for release in self._receiver_fed:
                                    await release.aclose()
        if drain_scope.cancelled_caught:
            self._log.warning("shutdown deadline of %gs expired; in-flight data may be lost", self.options.shutdown_timeout)

    async def _start(self, nursery: trio.Nursery, inst: _Instance) -> None:
        await nursery.start(self._supervise, inst)

    def _settings(self, inst: _Instance) -> Settings:
        node = inst.node
        labels: dict[str, str] = {}
        if node.pipeline is not None:
            labels = {"pipeline": str(node.pipeline), "otel_signal": node.pipeline.signal.value}
        tel = self.telemetry.for_component(node.kind.value, str(node.id), **labels)
        logger = logging.getLogger(f"tapio.{node.kind.value}.{node.id}")
        return Settings(
            id=node.id,
            kind=node.kind,
            telemetry=tel,
            logger=logger,
            pipeline=node.pipeline,
            extensions=self._extensions,
            shutdown_grace=self.options.component_grace,
        )

    async def _supervise(self, inst: _Instance, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        node = inst.node
        labels = {node.kind.value: str(node.id)}
        if node.pipeline is not None:
            labels["pipeline"] = str(node.pipeline)
        backoff = self.options.restart_initial
        first = True
        while True:
            inst.status = "starting"
            started_at = trio.current_time()
            try:
                component = inst.factory.create(self._settings(inst), inst.config, inst.ports)
                inst.component = component
                inst.admit = component.admit if isinstance(component, Admits) else None
                async with trio.open_nursery() as n:
                    await n.start(component.run)
                    inst.status = "running"
                    if first:
                        first = False
                        task_status.started()
                    started_at = trio.current_time()
            except Exception as exc:
                if first:
                    inst.status = "failed"
                    raise ComponentStartError(node, exc) from exc
                inst.status = "restarting" if self.options.on_component_failure == "restart" else "failed"
                inst.last_error = _describe(exc)
                self.telemetry.add("tapio_component_failures_total", 1, labels)
                self._log.error(
                    "%s %s failed while running: %s", node.kind.value, node.id, inst.last_error,
                    extra={"kv": {"component": str(node.id), "kind": node.kind.value}},
                )
                if self.options.on_component_failure == "stop":
                    raise ComponentFailedError(node, exc) from exc
                # Reset the backoff after a long healthy run.
                if trio.current_time() - started_at > self.options.restart_max:
                    backoff = self.options.restart_initial
                self._log.info("restarting %s %s in %gs", node.kind.value, node.id, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.options.restart_max)
                inst.restarts += 1
                self.telemetry.add("tapio_component_restarts_total", 1, labels)
                continue
            # run returned: end of stream (processors, exporters) or a receiver that finished.
            inst.status = "stopped"
            with trio.CancelScope(shield=True):
                for c in inst.close_after:
                    await c.aclose()
            return


def _admit(inst: _Instance, batch: Batch) -> None:
    """Ask the running instance (looked up now, so a restarted one is asked) to admit a batch."""
    if inst.admit is not None:
        inst.admit(batch)


class _Shared:
    """A pipeline entry shared by several receivers: never closed by them (the service closes entries)."""

    def __init__(self, inner: Stage) -> None:
        self._inner = inner
        self.signals = inner.signals

    def has_room(self) -> bool:
        return self._inner.has_room()

    def admit(self, batch: Batch) -> None:
        self._inner.admit(batch)

    async def send(self, batch: Batch) -> None:
        await self._inner.send(batch)

    def send_nowait(self, batch: Batch) -> None:
        self._inner.send_nowait(batch)

    async def aclose(self) -> None:
        return None


class _Entry(_Shared):
    """A pipeline's entry, closed once every one of its ``feeders`` released it.

    The feeders are its receivers (one share for all of them: the service
    releases it after they stopped) and each connector that hands on into it
    (released when that connector's run returned).
    """

    def __init__(self, inner: Stage, feeders: int) -> None:
        super().__init__(inner)
        self._open = feeders

    async def release(self) -> None:
        self._open -= 1
        if self._open == 0:
            await self._inner.aclose()


class _Release:
    """One feeder's share of an `_Entry`: ``aclose`` releases it (once)."""

    def __init__(self, entry: _Entry) -> None:
        self._entry: _Entry | None = entry

    async def aclose(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            await entry.release()


class _CountingConsumer:
    """A processor's output: asks the next stage to admit each batch, hands it on, calls ``count``."""

    def __init__(self, inner: Stage, count: Callable[[Batch], None]) -> None:
        self._inner = inner
        self._count = count
        self.signals = inner.signals

    def has_room(self) -> bool:
        return self._inner.has_room()

    def admit(self, batch: Batch) -> None:
        self._inner.admit(batch)

    # A refusal deeper in a pipeline cannot reach the receiver any more: the
    # refusing stage has counted the batch and told its sources (done(False)),
    # so the processor handing it on just goes on with the next batch.

    async def send(self, batch: Batch) -> None:
        try:
            self._inner.admit(batch)
        except Refused:
            return
        await self._inner.send(batch)
        self._count(batch)

    def send_nowait(self, batch: Batch) -> None:
        try:
            self._inner.admit(batch)
        except Refused:
            return
        self._inner.send_nowait(batch)
        self._count(batch)

    async def aclose(self) -> None:
        await self._inner.aclose()


# ---------------------------------------------------------------- a whole configuration


@dataclass(frozen=True)
class Started:
    """What `run_config` reports once everything runs and listens."""

    service: Service
    #: the started extensions by id
    extensions: Mapping[ComponentID, Any]
    #: the port the self-telemetry server bound (None when it is off)
    metrics_port: int | None


def runtime_options(cfg: "Config") -> RuntimeOptions:
    svc = cfg.service
    return RuntimeOptions(
        shutdown_timeout=float(svc.shutdown_timeout),
        on_component_failure=svc.on_component_failure,
        restart_initial=float(svc.restart_backoff.initial),
        restart_max=float(svc.restart_backoff.max),
    )


async def run_config(
    cfg: "Config",
    registry: Registry,
    *,
    telemetry: Telemetry | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Started] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a loaded configuration: extensions, the pipelines, self-telemetry; until told to stop.

    Start order: the extensions in ``service.extensions`` order, the
    self-telemetry server (so /healthz and /readyz answer during startup),
    then the pipelines (`Service.run`); `Started` is reported once all of
    them run, so the ports components report are the bound ones. With
    ``handle_signals``, the first SIGINT/SIGTERM begins a graceful shutdown
    (receivers stop, pipelines drain) and a second stops at once; cancelling
    this call stops at once too. Returns after the pipelines drained; the
    extensions stop last, so what draining writes to storage still lands.

    Raises `StartupError` when an extension or the self-telemetry server
    cannot start, and what `Service.run` raises.
    """
    from tapio import selftelemetry
    from tapio.units import parse_listen_address

    telemetry = telemetry if telemetry is not None else Telemetry()
    svc_cfg = cfg.service
    async with trio.open_nursery() as nursery:
        extensions: dict[ComponentID, Any] = {}
        for eid in svc_cfg.extensions:
            extensions[eid] = await _start_extension(nursery, registry, eid, cfg.extensions[eid], telemetry)
        service = Service(
            pipelines=svc_cfg.pipelines,
            components={Kind.RECEIVER: cfg.receivers, Kind.PROCESSOR: cfg.processors, Kind.EXPORTER: cfg.exporters, Kind.CONNECTOR: cfg.connectors},
            registry=registry,
            telemetry=telemetry,
            options=runtime_options(cfg),
            extensions=extensions,
        )
        metrics_port = None
        if svc_cfg.telemetry.metrics.address:
            # first, so /healthz and /readyz answer while the components start
            host, port = parse_listen_address(svc_cfg.telemetry.metrics.address)
            health = selftelemetry.Health(lambda: service.ready, service.failing)
            try:
                metrics_port = await nursery.start(selftelemetry.serve, telemetry, health, host, port)
            except OSError as e:
                raise StartupError(f"self-telemetry cannot listen on {host}:{port}: {e.strerror or e}") from e
        if handle_signals:
            nursery.start_soon(_watch_signals, service, nursery.cancel_scope)
        await nursery.start(_run_service, service, nursery.cancel_scope)
        task_status.started(Started(service, extensions, metrics_port))


async def _start_extension(nursery: trio.Nursery, registry: Registry, eid: ComponentID, config: Any, telemetry: Telemetry) -> Any:
    factory = registry.get(Kind.EXTENSION, eid.type)
    if factory is None:
        raise LookupError(f"no extension factory for type {eid.type!r}")
    settings = Settings(
        id=eid,
        kind=Kind.EXTENSION,
        telemetry=telemetry.for_component("extension", str(eid)),
        logger=logging.getLogger(f"tapio.extension.{eid}"),
    )
    try:
        return await nursery.start(factory.create(settings, config, Ports()).run)
    except Exception as exc:
        raise StartupError(f"extension {eid} failed to start: {_describe(exc)}") from exc


async def _run_service(service: Service, cancel_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the pipelines; once they drained, stop what else runs beside them (signals, self-telemetry, extensions)."""
    await service.run(task_status=task_status)
    log.info("stopped")
    cancel_scope.cancel()


async def _watch_signals(service: Service, cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info("received %s: shutting down (send it again to stop at once)", signal.Signals(signum).name)
                service.shutdown()
            else:
                log.warning("received %s again: stopping at once", signal.Signals(signum).name)
                cancel_scope.cancel()
                return
