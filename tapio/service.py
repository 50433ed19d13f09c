"""The runtime: wire the pipeline graph with bounded channels and run it under trio.

Invariants:
- Batches, never single records, cross channels, and every channel is
  bounded (`CHANNEL_CAPACITY` batches): a slow stage pushes back on the
  stages before it, up to the receivers.
- Start order is exporters → processors → receivers, each through
  ``nursery.start``; a component failing before ``started()`` stops the
  service with `ComponentStartError` naming it.
- Every link from one stage to the next holds the inlets (input channels)
  it sends into; an inlet closes, which is its instance's end of stream,
  when its last holder let go. A receiver lets go when it stops, a
  processor or connector when its run returned.
- Shutdown (`Service.shutdown`) cancels only the receivers; end of stream
  then flows downstream: each processor drains its input, flushes and
  returns, after which its output lets go; exporters drain and return.
  Everything left running when ``service.shutdown_timeout`` expires is
  cancelled (components flush under their own shielded grace).
- Reload (`Service.reload`): a component's identity is its node (kind, id,
  pipeline for processors), its config and, for receivers and connectors,
  the signals it hands on. An instance whose identity is unchanged keeps
  running and its links are re-pointed at the new graph (new holds are
  taken before old ones are let go, and a send in flight finishes into its
  old target first); the others are new instances, started exporters
  first, or removed ones, which drain like at shutdown. Reloads and
  shutdown are handled one at a time by the task running the graph.
- The runtime owns every channel. A component that fails while running is
  re-created on the same channels after a backoff (or stops the service,
  by config); its failures, restarts and starts are counted per component id.
- Counting: a receiver's accepted/refused items are counted where it hands
  batches on; a processor's incoming items where they enter its channel and
  its outgoing items where they leave it; exporters count what they sent.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

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
        self.mutating = mutating

    def admit(self, batch: Batch) -> None:
        if self._admit is not None:
            self._admit(batch)

    def has_room(self) -> bool:
        st = self._send.statistics()
        return st.current_buffer_used < st.max_buffer_size or st.tasks_waiting_receive > 0

    async def send(self, batch: Batch) -> None:
        if self.mutating:
            batch.forget_raw()  # the next stage changes records: their arrival bytes go stale
        await self._send.send(batch)
        if self._on_enter is not None:
            self._on_enter(batch)

    def send_nowait(self, batch: Batch) -> None:
        if self.mutating:
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


# ---------------------------------------------------------------- links: what a stage sends into


class _Inlet:
    """The input channel of one processor, exporter or connector instance.

    Every link that may send into it holds it; the channel closes (end of
    stream for its instance) when the last holder lets go. A link takes its
    holds before it lets go of old ones, so re-pointing links never closes
    an inlet that stays in the graph.
    """

    def __init__(self, stage: ChannelConsumer, send: trio.MemorySendChannel[Batch]) -> None:
        self.stage = stage
        self._send = send
        self._holders = 0
        self.closed = False

    def hold(self) -> None:
        assert not self.closed, "an inlet is held again after it closed"
        self._holders += 1

    async def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self.closed = True
            await self._send.aclose()


@dataclass(frozen=True)
class _Target:
    """Where a link sends (one channel, or a fan-out), and the inlets it must hold for that."""

    stage: Stage
    holds: tuple[_Inlet, ...]


class _Generation:
    """One target of a link, with the sends to it still in flight."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.sending = 0
        self.retired = False
        self._held = True

    async def release(self) -> None:
        if self._held:
            self._held = False
            for inlet in self.target.holds:
                await inlet.release()


class _Link:
    """A component's output toward one signal's pipelines; the runtime can re-point it while batches flow.

    A send in flight when the link is re-pointed completes into the old
    target, whose inlets are released after the last such send finished, so
    no batch is ever sent into a closed channel.
    """

    def __init__(self, target: _Target) -> None:
        for inlet in target.holds:
            inlet.hold()
        self._gen = _Generation(target)

    @property
    def signals(self) -> frozenset[Signal]:
        return self._gen.target.stage.signals

    def has_room(self) -> bool:
        return self._gen.target.stage.has_room()

    def admit(self, batch: Batch) -> None:
        self._gen.target.stage.admit(batch)

    async def send(self, batch: Batch) -> None:
        gen = self._gen
        gen.sending += 1
        try:
            await gen.target.stage.send(batch)
        finally:
            gen.sending -= 1
            if gen.retired and gen.sending == 0:
                with trio.CancelScope(shield=True):
                    await gen.release()

    def send_nowait(self, batch: Batch) -> None:
        self._gen.target.stage.send_nowait(batch)

    async def retarget(self, target: _Target) -> None:
        for inlet in target.holds:
            inlet.hold()
        old, self._gen = self._gen, _Generation(target)
        old.retired = True
        if old.sending == 0:
            await old.release()

    async def aclose(self) -> None:
        """The owner stopped sending: let go of what it holds (idempotent)."""
        await self._gen.release()


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


# ---------------------------------------------------------------- the service


@dataclass(eq=False)
class _Instance:
    """One running component as the supervisor sees it."""

    node: Node
    factory: Factory
    config: Any
    ports: Ports
    #: what must be equal for a reload to keep this instance running: its config,
    #: and for receivers and connectors the signals they hand on
    identity: tuple[Any, ...] = ()
    #: its input channel (processors, exporters, connectors)
    inlet: _Inlet | None = None
    #: its outputs by signal (receivers, processors, connectors)
    links: dict[Signal, _Link] = field(default_factory=dict)
    status: str = "created"  # created | starting | running | restarting | failed | stopped
    last_error: str = ""
    restarts: int = 0
    #: the component object currently running (replaced on restart)
    component: Any = None
    #: its `Admits.admit`, when it declares one
    admit: Callable[[Batch], None] | None = None
    #: cancelled to stop this instance alone (a receiver a reload removes)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: set once it stopped and let go of its links
    finished: trio.Event = field(default_factory=trio.Event)

    def reusable_as(self, identity: tuple[Any, ...]) -> bool:
        return self.identity == identity and not self.finished.is_set() and (self.inlet is None or not self.inlet.closed)

    def describe(self) -> str:
        return f"{self.node.kind.value} {self.node.id}{_in_pipeline(self.node)}"


@dataclass
class _Build:
    """The instances of one graph: reused ones (to re-point) and new ones (to start)."""

    instances: dict[str, _Instance] = field(default_factory=dict)
    #: new instances, in start order (exporters, processors, connectors, receivers)
    added: list[_Instance] = field(default_factory=list)
    #: reused instances' links and where they must point now
    retargets: list[tuple[_Link, _Target]] = field(default_factory=list)


@dataclass(frozen=True)
class ReloadReport:
    """What a reload changed, as ``kind id`` (``processor id in pipeline p``) descriptions."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: int = 0

    def summary(self) -> str:
        parts = [f"{what} {', '.join(items)}" for what, items in (("changed", self.changed), ("added", self.added), ("removed", self.removed)) if items]
        parts.append(f"{self.unchanged} component{'s' if self.unchanged != 1 else ''} unchanged")
        return "; ".join(parts)


class ReloadError(Exception):
    """A reload was not applied (a new component failed to start); the running graph is unchanged."""


@dataclass
class _ReloadRequest:
    pipelines: dict[PipelineID, Any]
    components: dict[Kind, dict[ComponentID, Any]]
    done: trio.Event = field(default_factory=trio.Event)
    report: ReloadReport | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    shutdown_timeout: float = 10.0
    on_component_failure: str = "restart"  # restart | stop
    restart_initial: float = 1.0
    restart_max: float = 30.0
    #: grace each component gets to flush when cancelled
    component_grace: float = 5.0


class Service:
    """Runs one pipeline graph until `shutdown` is called; then drains it. `reload` swaps in another graph.

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
        #: the instances of the current graph, by node key
        self.instances: dict[str, _Instance] = {}
        #: instances a reload removed that are still draining
        self._draining: list[_Instance] = []
        self._shutdown = trio.Event()
        # Reloads and the shutdown request are handled one at a time by `run`.
        self._requests_send, self._requests = trio.open_memory_channel[_ReloadRequest | None](math.inf)
        self._nurseries: dict[Kind, trio.Nursery] = {}
        self._ready = False
        self._stopping = False

    # -- health, for /healthz and /readyz

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    def failing(self) -> list[str]:
        """The components that are failing (restarting or failed), as ``kind:id`` (``kind:id@pipeline`` for processors)."""
        return [
            f"{i.node.kind.value}:{i.node.id}{'@' + str(i.node.pipeline) if i.node.pipeline else ''}"
            for i in (*self.instances.values(), *self._draining)
            if i.status in ("restarting", "failed")
        ]

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop receivers, drain the rest."""
        if not self._shutdown.is_set():
            self._shutdown.set()
            self._requests_send.send_nowait(None)

    async def reload(self, *, pipelines: dict[PipelineID, Any], components: dict[Kind, dict[ComponentID, Any]]) -> ReloadReport:
        """Replace the running graph by this one, keeping every component whose identity did not change.

        Call it while `run` runs (from any task). Reused components keep
        running (receivers keep their sockets) and are re-pointed at the new
        graph; new ones are started, downstream first; removed receivers are
        stopped, and removed processors, exporters and connectors drain what
        they hold and stop once nothing feeds them any more.

        Raises `ReloadError` if a new processor, exporter or connector fails
        to start: what had started is stopped and the old graph keeps running.
        A new receiver that fails to start is handled like a component
        failing while running (``on_component_failure``).
        """
        request = _ReloadRequest(pipelines, components)
        if self._shutdown.is_set():
            raise ReloadError("tapio is shutting down")
        self._requests_send.send_nowait(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.report is not None
        return request.report

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

    def _factory(self, node: Node, components: dict[Kind, dict[ComponentID, Any]]) -> tuple[Factory, Any]:
        factory = self._registry.get(node.kind, node.id.type)
        if factory is None:
            raise LookupError(f"no {node.kind.value} factory for type {node.id.type!r}")
        return factory, components[node.kind][node.id]

    def _build(self, graph: Graph, components: dict[Kind, dict[ComponentID, Any]], keep: Mapping[str, _Instance]) -> _Build:
        """The instances for ``graph``: those of ``keep`` whose identity is unchanged, new ones (with new channels) for the rest.

        New instances' links hold their targets from here on; reused
        instances' links are only listed with their new targets (`retargets`).
        """
        build = _Build()
        new: set[str] = set()

        def instance(node: Node, identity: Callable[[Any], tuple[Any, ...]]) -> _Instance:
            factory, cfg = self._factory(node, components)
            ident = identity(cfg)
            old = keep.get(node.key)
            if old is not None and old.reusable_as(ident):
                inst = old
            else:
                inst = _Instance(node, factory, cfg, Ports(), ident)
                new.add(node.key)
            build.instances[node.key] = inst
            return inst

        def listing(node: Node, role: str) -> list[PipelineID]:
            return [pid for pid, p in sorted(graph.pipelines.items()) if any(n.key == node.key for n in getattr(p, role))]

        def emits(node: Node) -> frozenset[Signal]:
            return frozenset(pid.signal for pid in listing(node, "receivers"))

        def open_inlet(inst: _Instance, signals: frozenset[Signal], **consumer: Any) -> None:
            send, recv = trio.open_memory_channel[Batch](CHANNEL_CAPACITY)
            inst.ports.input = recv
            inst.inlet = _Inlet(ChannelConsumer(send, signals, **consumer), send)

        exporters = [instance(n, lambda cfg: (cfg,)) for _, n in sorted(graph.exporters.items())]
        connectors = [instance(n, lambda cfg, n=n: (cfg, emits(n))) for _, n in sorted(graph.connectors.items())]
        for inst in (*exporters, *connectors):
            if inst.node.key in new:
                is_connector = inst.node.kind is Kind.CONNECTOR
                open_inlet(inst, frozenset(pid.signal for pid in listing(inst.node, "exporters")), mutating=is_connector and inst.factory.mutates_data)
                if not is_connector:
                    tel = self.telemetry.for_component("exporter", str(inst.node.id))
                    recv = inst.ports.input
                    tel.gauge("tapio_exporter_queue_size", lambda r=recv: r.statistics().current_buffer_used)
                    tel.gauge("tapio_exporter_queue_capacity", lambda r=recv: r.statistics().max_buffer_size)

        def link(inst: _Instance, sig: Signal, target: _Target) -> _Link:
            """A new instance's link for ``sig``; a reused one's, listed to be re-pointed at ``target``."""
            if inst.node.key in new:
                inst.links[sig] = _Link(target)
            else:
                build.retargets.append((inst.links[sig], target))
            return inst.links[sig]

        processors: list[_Instance] = []
        entries: dict[PipelineID, _Target] = {}
        mutating: dict[PipelineID, bool] = {}
        for pid, p in sorted(graph.pipelines.items()):
            sig = frozenset({p.signal})
            # The tail: fan in to each exporter (or connector) through its inlet.
            tail = [build.instances[e.key].inlet for e in p.exporters]
            stages = [i.stage for i in tail if i is not None]
            flags = [s.mutating for s in stages]
            downstream = _Target(stages[0] if len(stages) == 1 else FanoutConsumer(list(stages), sig, flags), tuple(i for i in tail if i is not None))
            pipeline_mutates = False
            chain: list[_Instance] = []
            for node in reversed(p.processors):
                inst = instance(node, lambda cfg: (cfg,))
                pipeline_mutates = pipeline_mutates or inst.factory.mutates_data
                out = link(inst, p.signal, downstream)
                if inst.node.key in new:
                    ptel = self.telemetry.for_component("processor", str(node.id), pipeline=str(pid), otel_signal=p.signal.value)
                    open_inlet(
                        inst,
                        sig,
                        on_enter=lambda b, t=ptel: t.add("tapio_processor_incoming_items_total", b.count),
                        admit=lambda b, i=inst: _admit(i, b),
                        mutating=inst.factory.mutates_data and not inst.factory.keeps_raw,
                    )
                    inst.ports.output = _CountingConsumer(out, lambda b, t=ptel: t.add("tapio_processor_outgoing_items_total", b.count))
                chain.append(inst)
                assert inst.inlet is not None
                downstream = _Target(inst.inlet.stage, (inst.inlet,))
            processors.extend(reversed(chain))
            entries[pid] = downstream
            mutating[pid] = pipeline_mutates

        def wire_output(inst: _Instance, counted: tuple[str, str]) -> None:
            """A receiver's or connector's links: by signal, to the entries of the pipelines that list it under receivers."""
            by_signal: dict[Signal, list[PipelineID]] = {}
            for pid in listing(inst.node, "receivers"):
                by_signal.setdefault(pid.signal, []).append(pid)
            for sig, pids in by_signal.items():
                stages: list[Stage] = [entries[pid].stage for pid in pids]
                stage = stages[0] if len(stages) == 1 else FanoutConsumer(stages, frozenset({sig}), [mutating[pid] for pid in pids])
                link(inst, sig, _Target(stage, tuple(i for pid in pids for i in entries[pid].holds)))
            if inst.node.key in new:
                tel = self.telemetry.for_component(inst.node.kind.value, str(inst.node.id))
                inst.ports.output = ReceiverConsumer(dict(inst.links), tel, *counted)

        for inst in connectors:
            wire_output(inst, ("connector_emitted", "connector_refused"))
        receivers = [instance(n, lambda cfg, n=n: (cfg, emits(n))) for _, n in sorted(graph.receivers.items())]
        for inst in receivers:
            wire_output(inst, ("receiver_accepted", "receiver_refused"))
        build.added = [i for i in (*exporters, *processors, *connectors, *receivers) if i.node.key in new]
        return build

    # -- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, report started, run (applying reloads) until `shutdown`, then drain and return.

        Raises `ComponentStartError` if a component fails to start (everything
        already started is stopped first), `ComponentFailedError` if one fails
        while running under the ``stop`` policy.
        """
        build = self._build(self.graph, self._components, {})
        self.instances = build.instances
        # Everything after startup runs under one deadline once shutdown begins.
        drain_scope = trio.CancelScope()
        with drain_scope:
            async with trio.open_nursery() as exporter_nursery:
                self._nurseries[Kind.EXPORTER] = exporter_nursery
                async with trio.open_nursery() as processor_nursery:
                    self._nurseries[Kind.PROCESSOR] = processor_nursery
                    async with trio.open_nursery() as connector_nursery:
                        self._nurseries[Kind.CONNECTOR] = connector_nursery
                        async with trio.open_nursery() as receiver_nursery:
                            self._nurseries[Kind.RECEIVER] = receiver_nursery
                            for inst in build.added:
                                await self._start(inst)
                            self._ready = True
                            task_status.started()
                            async for request in self._requests:
                                if request is None:
                                    break
                                await self._handle(request)
                            self._stopping = True
                            self._log.info("shutting down: stopping receivers, draining pipelines", extra={"kv": {"deadline_s": self.options.shutdown_timeout}})
                            drain_scope.deadline = trio.current_time() + self.options.shutdown_timeout
                            # End of stream from the receivers: each lets go of its pipelines when it stopped;
                            # processors drain, flush and close their outputs; a connector ends when every
                            # pipeline feeding it did, and then ends the pipelines it feeds.
                            receiver_nursery.cancel_scope.cancel()
        self._stopping = True
        while True:  # reloads asked for while shutting down are not applied
            try:
                request = self._requests.receive_nowait()
            except trio.WouldBlock:
                break
            if request is not None:
                request.error = ReloadError("tapio is shutting down")
                request.done.set()
        if drain_scope.cancelled_caught:
            self._log.warning("shutdown deadline of %gs expired; in-flight data may be lost", self.options.shutdown_timeout)

    async def _start(self, inst: _Instance, *, retry_start: bool = False) -> None:
        await self._nurseries[inst.node.kind].start(self._run_instance, inst, retry_start)

    async def _run_instance(self, inst: _Instance, retry_start: bool, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise one instance; however it ends, let go of its links (its end of stream downstream)."""
        try:
            with inst.scope:
                await self._supervise(inst, retry_start, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                for out in inst.links.values():
                    await out.aclose()
            inst.finished.set()
            if inst in self._draining:
                self._draining.remove(inst)
                if inst.node.key not in self.instances:  # removed, not replaced: its gauges would report a channel that is gone
                    self.telemetry.remove_gauges({inst.node.kind.value: str(inst.node.id)})

    # -- reloading

    async def _handle(self, request: _ReloadRequest) -> None:
        try:
            request.report = await self._apply(request.pipelines, request.components)
        except ReloadError as exc:
            request.error = exc
        except BaseException as exc:  # the service stops (a component failed under the stop policy)
            request.error = ReloadError(f"tapio stopped while reloading: {_describe(exc)}")
            raise
        finally:
            request.done.set()

    async def _apply(self, pipelines: dict[PipelineID, Any], components: dict[Kind, dict[ComponentID, Any]]) -> ReloadReport:
        graph = build_graph(pipelines, components.get(Kind.CONNECTOR, {}))
        old = self.instances
        build = self._build(graph, components, old)
        removed = [i for key, i in old.items() if build.instances.get(key) is not i]
        # 1. New processors, exporters and connectors start before anything running is touched,
        #    so a start failure leaves the old graph exactly as it was.
        started: list[_Instance] = []
        try:
            for inst in build.added:
                if inst.node.kind is not Kind.RECEIVER:
                    await self._start(inst)
                    started.append(inst)
        except ComponentStartError as exc:
            for inst in started:
                inst.scope.cancel()
            for inst in started:
                await inst.finished.wait()
            for inst in build.added:
                for out in inst.links.values():
                    await out.aclose()
            raise ReloadError(str(exc)) from exc
        # 2. What is kept now feeds the new graph; what it fed before is let go once sends in flight finished.
        self.graph, self._components, self.instances = graph, components, build.instances
        for out, target in build.retargets:
            await out.retarget(target)
        # 3. Removed receivers stop (letting go of what they fed); the other removed
        #    components drain and stop once nothing feeds them any more.
        self._draining.extend(i for i in removed if i.node.kind is not Kind.RECEIVER and not i.finished.is_set())
        for inst in removed:
            if inst.node.kind is Kind.RECEIVER:
                inst.scope.cancel()
                await inst.finished.wait()
        # 4. New receivers start last, into the new graph (a changed one can bind the port the old one freed).
        #    One that cannot start is supervised like a component failing while running.
        for inst in build.added:
            if inst.node.kind is Kind.RECEIVER:
                await self._start(inst, retry_start=self.options.on_component_failure == "restart")
        return _report(old, build.instances)

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

    async def _supervise(self, inst: _Instance, retry_start: bool = False, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the component, re-creating it after a failure (backoff) or stopping the service, by policy.

        A failure before the first ``started()`` raises `ComponentStartError`,
        unless ``retry_start`` (a receiver a reload added): then it reports
        started and retries like after a failure while running.
        """
        node = inst.node
        labels = {node.kind.value: str(node.id)}
        if node.pipeline is not None:
            labels["pipeline"] = str(node.pipeline)
        backoff = self.options.restart_initial
        first = True
        failure: BaseException | None = None
        started_at = trio.current_time()
        while True:
            if failure is not None:
                inst.status = "restarting" if self.options.on_component_failure == "restart" else "failed"
                inst.last_error = _describe(failure)
                self.telemetry.add("tapio_component_failures_total", 1, labels)
                self._log.error(
                    "%s %s failed %s: %s", node.kind.value, node.id, "to start" if inst.component is None else "while running", inst.last_error,
                    extra={"kv": {"component": str(node.id), "kind": node.kind.value}},
                )
                if self.options.on_component_failure == "stop":
                    raise ComponentFailedError(node, failure) from failure
                # Reset the backoff after a long healthy run.
                if trio.current_time() - started_at > self.options.restart_max:
                    backoff = self.options.restart_initial
                self._log.info("restarting %s %s in %gs", node.kind.value, node.id, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.options.restart_max)
                inst.restarts += 1
                self.telemetry.add("tapio_component_restarts_total", 1, labels)
                failure = None
            inst.status = "starting"
            started_at = trio.current_time()
            try:
                component = inst.factory.create(self._settings(inst), inst.config, inst.ports)
                inst.component = component
                inst.admit = component.admit if isinstance(component, Admits) else None
                async with trio.open_nursery() as n:
                    await n.start(component.run)
                    inst.status = "running"
                    self.telemetry.add("tapio_component_starts_total", 1, labels)
                    if first:
                        first = False
                        task_status.started()
                    started_at = trio.current_time()
            except Exception as exc:
                if first and not retry_start:
                    inst.status = "failed"
                    raise ComponentStartError(node, exc) from exc
                if first:
                    first = False
                    inst.component = None
                    task_status.started()
                failure = exc
                continue
            # run returned: end of stream (processors, exporters) or a receiver that finished.
            inst.status = "stopped"
            return


def _report(old: Mapping[str, _Instance], new: Mapping[str, _Instance]) -> ReloadReport:
    changed = [i.describe() for key, i in new.items() if key in old and old[key] is not i]
    added = [i.describe() for key, i in new.items() if key not in old]
    removed = [i.describe() for key, i in old.items() if key not in new]
    unchanged = sum(1 for key, i in new.items() if old.get(key) is i)
    return ReloadReport(tuple(added), tuple(removed), tuple(changed), unchanged)


def _admit(inst: _Instance, batch: Batch) -> None:
    """Ask the running instance (looked up now, so a restarted one is asked) to admit a batch."""
    if inst.admit is not None:
        inst.admit(batch)


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
    reload: Callable[[], "Config"] | None = None,
    watch: tuple[Sequence[str], float] | None = None,
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

    ``reload`` re-reads the configuration (blocking; raises `ConfigError`):
    with it, SIGHUP (when handling signals) and, with ``watch`` (paths, poll
    interval in seconds), a change to one of those files reload the
    configuration live (`tapio.reload.Reloader`).

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
        if reload is not None:
            from tapio.reload import Reloader

            # before the service reports ready, so a SIGHUP from then on reloads
            reloader = Reloader(service, cfg, reload, telemetry)
            if handle_signals:
                await nursery.start(reloader.on_sighup)
            if watch is not None:
                nursery.start_soon(reloader.watch, *watch)
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
