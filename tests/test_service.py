"""The runtime wires the graph, counts, supervises and drains — with real channels and tasks.

The components here are tiny test components written for these tests (a
source that emits what the test pushes, a pass-through or hoarding
processor, a recording exporter); everything else is the real runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tapio.component import ComponentID, Factory, Kind, PipelineID, Refused, Registry
from tapio.pdata import Batch, Signal
from tapio.service import ComponentFailedError, ComponentStartError, RuntimeOptions, Service
from tapio.telemetry import Telemetry
from tapio.testing.batches import log_batch, numbered

ALL = frozenset(Signal)


@dataclass(frozen=True, kw_only=True)
class Empty:
    def validate(self) -> list[str]:
        return []


class World:
    """Shared state between a test and its components."""

    def __init__(self) -> None:
        self.sources: dict[str, trio.MemorySendChannel] = {}
        self.exported: dict[str, list[Batch]] = {}
        self.exporter_gate = trio.Event()
        self.exporter_gate.set()
        self.fail_start: set[str] = set()
        self.fail_after: dict[str, int] = {}
        self.runs: dict[str, int] = {}
        self.flushed: list[str] = []
        self.changed = trio.Event()
        self.admitting = True

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, predicate, timeout: float = 10) -> None:
        # Woken by the test components; also re-checks every 10 ms for state
        # the runtime changes on its own (component status during a restart).
        with trio.fail_after(timeout):
            while not predicate():
                with trio.move_on_after(0.01):
                    await self.changed.wait()


def make_registry(world: World) -> Registry:
    class Source:
        def __init__(self, settings, config, ports):
            self.id, self.ports = str(settings.id), ports

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            world.runs[self.id] = world.runs.get(self.id, 0) + 1
            world.poke()
            if self.id in world.fail_start:
                raise OSError(f"cannot open {self.id}'s source")
            send, recv = trio.open_memory_channel(100)
            world.sources[self.id] = send
            task_status.started()
            async for item in recv:
                if item == "boom":
                    raise RuntimeError("source exploded")
                if isinstance(item, tuple) and item[0] == "nowait":
                    try:
                        self.ports.output.send_nowait(item[1])
                    except trio.WouldBlock:
                        world.flushed.append("refused")
                        world.poke()
                    continue
                await self.ports.output.send(item)
                world.poke()

    class Hoard:
        """Keeps everything until end of stream or cancellation, then flushes (like a batch processor)."""

        def __init__(self, settings, config, ports):
            self.ports, self.grace = ports, settings.shutdown_grace

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            held: list[Batch] = []
            try:
                async for b in self.ports.input:
                    held.append(b)
                    world.poke()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(self.grace):
                    if held:
                        await self.ports.output.send(Batch.concat(held))
                    world.flushed.append("hoard")

    class Pass:
        def __init__(self, settings, config, ports):
            self.ports, self.id = ports, str(settings.id)

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            world.runs[self.id] = world.runs.get(self.id, 0) + 1
            world.poke()
            task_status.started()
            n = 0
            async for b in self.ports.input:
                n += 1
                if world.fail_after.get(self.id) == n:
                    world.fail_after.pop(self.id)
                    raise RuntimeError("processor exploded")
                await self.ports.output.send(b)

    class Mutate(Pass):
        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            async for b in self.ports.input:
                for r in b.requests:
                    for rl in r.resource_logs:
                        rl.resource.attributes.add(key="mutated").value.bool_value = True
                await self.ports.output.send(b)

    class Gate(Pass):
        """Admits batches only while world.admitting is true (like a memory limiter)."""

        def admit(self, batch):
            if not world.admitting:
                batch.done(False)
                raise Refused("over the limit")

    class Record:
        def __init__(self, settings, config, ports):
            self.ports, self.id, self.tel = ports, str(settings.id), settings.telemetry

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            if self.id in world.fail_start:
                raise OSError(f"cannot connect {self.id}")
            task_status.started()
            async for b in self.ports.input:
                await world.exporter_gate.wait()
                world.exported.setdefault(self.id, []).append(b)
                self.tel.signal_add("exporter_sent", b.signal, b.count)
                b.done(True)
                world.poke()

    def f(kind, type_, cls, mutates=False):
        return Factory(type=type_, kind=kind, config_class=Empty, signals=ALL, create=cls, description=type_, mutates_data=mutates)

    return Registry([
        f(Kind.RECEIVER, "src", Source),
        f(Kind.PROCESSOR, "hoard", Hoard),
        f(Kind.PROCESSOR, "pass", Pass),
        f(Kind.PROCESSOR, "mutate", Mutate, mutates=True),
        f(Kind.PROCESSOR, "gate", Gate),
        f(Kind.EXPORTER, "rec", Record),
    ])


@dataclass
class P:
    receivers: list
    processors: list
    exporters: list


def cid(s: str) -> ComponentID:
    return ComponentID.parse(s)


def make_service(world: World, pipelines: dict[str, tuple[list[str], list[str], list[str]]], **opts) -> Service:
    pl = {PipelineID.parse(k): P([cid(x) for x in r], [cid(x) for x in p], [cid(x) for x in e]) for k, (r, p, e) in pipelines.items()}
    comps: dict[Kind, dict] = {Kind.RECEIVER: {}, Kind.PROCESSOR: {}, Kind.EXPORTER: {}}
    for p in pl.values():
        for kind, ids in ((Kind.RECEIVER, p.receivers), (Kind.PROCESSOR, p.processors), (Kind.EXPORTER, p.exporters)):
            for i in ids:
                comps[kind][i] = Empty()
    return Service(pipelines=pl, components=comps, registry=make_registry(world), telemetry=Telemetry(), options=RuntimeOptions(**opts))


async def test_fan_out_fan_in_and_counters(nursery):
    world = World()
    svc = make_service(world, {
        "logs": (["src"], ["pass"], ["rec"]),
        "logs/copy": (["src", "src/2"], [], ["rec", "rec/2"]),
    })
    await nursery.start(svc.run)
    for i in range(5):
        await world.sources["src"].send(log_batch(numbered(10, f"a{i}")))
    await world.sources["src/2"].send(log_batch(numbered(3, "x")))
    # src feeds 2 pipelines -> rec gets 5 twice; src/2 feeds logs/copy only -> rec and rec/2 get it.
    await world.wait_until(lambda: sum(b.count for b in world.exported.get("rec", [])) == 103
                           and sum(b.count for b in world.exported.get("rec/2", [])) == 53)
    tel = svc.telemetry
    assert tel.value("tapio_receiver_accepted_log_records_total", receiver="src") == 50
    assert tel.value("tapio_receiver_accepted_log_records_total", receiver="src/2") == 3
    assert tel.value("tapio_processor_incoming_items_total", processor="pass", pipeline="logs") == 50
    assert tel.value("tapio_processor_outgoing_items_total", processor="pass", pipeline="logs") == 50
    assert tel.value("tapio_exporter_sent_log_records_total", exporter="rec") == 103
    svc.shutdown()


async def test_shutdown_drains_buffered_batches_in_order():
    world = World()
    svc = make_service(world, {"logs": (["src"], ["hoard", "pass"], ["rec"])})
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        for i in range(20):
            await world.sources["src"].send(log_batch(numbered(1, f"r{i}")))
        await world.wait_until(lambda: svc.telemetry.value("tapio_processor_incoming_items_total", processor="hoard") == 20)
        assert "rec" not in world.exported  # still hoarded
        svc.shutdown()
    # run returned: everything hoarded reached the exporter, in order
    bodies = [lr.body.string_value for b in world.exported["rec"] for r in b.requests
              for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]
    assert bodies == [f"r{i}0" for i in range(20)]
    assert world.flushed == ["hoard"]


@pytest.mark.parametrize("timeout", [3.0, 20.0])
async def test_shutdown_timeout_bounds_a_stuck_exporter(autojump_clock, caplog, timeout):
    world = World()
    world.exporter_gate = trio.Event()  # never set: the exporter never finishes the batch it took
    svc = make_service(world, {"logs": (["src"], ["pass"], ["rec"])}, shutdown_timeout=timeout)
    # fail_after: a deadline that is not enforced fails the test instead of hanging it
    with caplog.at_level("WARNING", logger="tapio.service"), trio.fail_after(timeout + 60):
        async with trio.open_nursery() as n:
            await n.start(svc.run)
            await world.sources["src"].send(log_batch(numbered(1, "x")))
            await world.wait_until(lambda: svc.telemetry.value("tapio_processor_outgoing_items_total", processor="pass") == 1)
            await trio.testing.wait_all_tasks_blocked()
            began = trio.current_time()
            svc.shutdown()
        elapsed = trio.current_time() - began
    # run returned when the deadline expired, not before (the exporter was stuck) and not after
    assert elapsed == pytest.approx(timeout)
    assert "rec" not in world.exported
    assert [r.getMessage() for r in caplog.records if r.name == "tapio.service"] == [
        f"shutdown deadline of {timeout:g}s expired; in-flight data may be lost"
    ]


async def test_shutdown_without_a_stuck_stage_does_not_wait_for_the_deadline(autojump_clock, caplog):
    world = World()
    svc = make_service(world, {"logs": (["src"], ["pass"], ["rec"])}, shutdown_timeout=20.0)
    with caplog.at_level("WARNING", logger="tapio.service"):
        async with trio.open_nursery() as n:
            await n.start(svc.run)
            await world.sources["src"].send(log_batch(numbered(1, "x")))
            began = trio.current_time()
            svc.shutdown()
        elapsed = trio.current_time() - began
    assert elapsed < 1.0
    assert [b.count for b in world.exported["rec"]] == [1]
    assert not [r for r in caplog.records if r.name == "tapio.service"]


async def test_component_failing_at_start_is_named_and_stops_service():
    world = World()
    world.fail_start.add("src/bad")
    svc = make_service(world, {"logs": (["src", "src/bad"], ["pass"], ["rec"])})
    with pytest.RaisesGroup(pytest.RaisesExc(ComponentStartError, match=r"receiver src/bad failed to start: cannot open src/bad's source"), flatten_subgroups=True):
        async with trio.open_nursery() as n:
            await n.start(svc.run)


async def test_failing_exporter_at_start_names_exporter():
    world = World()
    world.fail_start.add("rec/down")
    svc = make_service(world, {"logs": (["src"], [], ["rec/down"])})
    with pytest.RaisesGroup(pytest.RaisesExc(ComponentStartError, match=r"exporter rec/down failed to start"), flatten_subgroups=True):
        await svc.run()
    assert "src" not in world.runs  # receivers never started


async def test_component_failing_while_running_is_restarted(nursery, autojump_clock):
    world = World()
    svc = make_service(world, {"logs": (["src"], ["pass"], ["rec"])}, restart_initial=1.0)
    await nursery.start(svc.run)
    world.fail_after["pass"] = 2
    for i in range(4):
        await world.sources["src"].send(log_batch(numbered(1, "x")))
    await world.wait_until(lambda: world.runs.get("pass") == 2 and len(world.exported.get("rec", [])) >= 3, timeout=30)
    assert svc.telemetry.value("tapio_component_restarts_total", processor="pass") == 1
    assert svc.failing() == []
    # a receiver that fails while running is restarted too and reports failing meanwhile
    await world.sources["src"].send("boom")
    await world.wait_until(lambda: world.runs.get("src") == 2, timeout=30)
    assert svc.telemetry.value("tapio_component_failures_total", receiver="src") == 1
    svc.shutdown()


async def test_failure_policy_stop():
    world = World()
    svc = make_service(world, {"logs": (["src"], ["pass"], ["rec"])}, on_component_failure="stop")
    with pytest.RaisesGroup(pytest.RaisesExc(ComponentFailedError, match="processor pass in pipeline logs failed: processor exploded"), flatten_subgroups=True):
        async with trio.open_nursery() as n:
            await n.start(svc.run)
            world.fail_after["pass"] = 1
            await world.sources["src"].send(log_batch(numbered(1, "x")))


async def test_backpressure_and_refusal_are_counted(nursery):
    world = World()
    world.exporter_gate = trio.Event()  # exporter stuck
    svc = make_service(world, {"logs": (["src"], [], ["rec"])})
    await nursery.start(svc.run)
    for _ in range(40):
        await world.sources["src"].send(("nowait", log_batch(numbered(2, "x"))))
    await world.wait_until(lambda: world.flushed.count("refused") > 0)
    await trio.testing.wait_all_tasks_blocked()
    accepted = svc.telemetry.value("tapio_receiver_accepted_log_records_total", receiver="src")
    refused = svc.telemetry.value("tapio_receiver_refused_log_records_total", receiver="src")
    assert accepted + refused == 80
    assert 0 < accepted < 80
    assert svc.telemetry.value("tapio_exporter_queue_size", exporter="rec") >= 1
    world.exporter_gate.set()
    await world.wait_until(lambda: sum(b.count for b in world.exported.get("rec", [])) == accepted)
    svc.shutdown()


async def test_mutating_pipeline_gets_a_copy(nursery):
    world = World()
    svc = make_service(world, {
        "logs/a": (["src"], ["mutate"], ["rec"]),
        "logs/b": (["src"], ["pass"], ["rec/2"]),
        "logs/c": (["src"], ["mutate"], ["rec/3"]),
    })
    await nursery.start(svc.run)
    done: list[bool] = []
    b = log_batch(numbered(1, "x"))
    b.on_done.append(done.append)
    await world.sources["src"].send(b)
    await world.wait_until(lambda: all(world.exported.get(e) for e in ("rec", "rec/2", "rec/3")))

    def mutated(e):
        return [kv.key for r in world.exported[e][0].requests for rl in r.resource_logs for kv in rl.resource.attributes]

    assert mutated("rec") == ["mutated"]
    assert mutated("rec/3") == ["mutated"]
    assert mutated("rec/2") == []  # the pass-through pipeline never sees another pipeline's changes
    assert done == [True]  # once, after all three exporters were done
    svc.shutdown()


def test_graph_renders(tmp_path):
    from tapio.graph import build_graph, to_dot, to_mermaid

    pl = {PipelineID.parse("logs"): P([cid("otlp")], [cid("batch")], [cid("file"), cid("debug")]),
          PipelineID.parse("traces"): P([cid("otlp")], [], [cid("file")])}
    g = build_graph(pl)
    assert len(g.receivers) == 1 and len(g.exporters) == 2
    m = to_mermaid(g)
    assert m.startswith("flowchart LR")
    assert "receiver_otlp -->|logs| processor_logs_batch" in m
    assert "receiver_otlp -->|traces| exporter_file" in m
    d = to_dot(g)
    assert '"receiver:otlp" -> "processor:logs batch" [label="logs"];' in d
    assert d.count("->") == 4


def test_graph_keys_and_ids_never_collide():
    from tapio.graph import build_graph, to_dot, to_mermaid

    # pipeline logs/batch + processor x, and pipeline logs + processor batch/x; ids that sanitize alike; a quote
    pl = {PipelineID.parse("logs/batch"): P([cid("otlp")], [cid("x")], [cid("file")]),
          PipelineID.parse("logs"): P([cid("otlp")], [cid("batch/x"), cid("q/a-b"), cid("q/a_b")], [cid('file/"q"')])}
    g = build_graph(pl)
    keys = [n.key for p in g.pipelines.values() for n in p.processors]
    assert len(set(keys)) == len(keys) == 4
    m = to_mermaid(g)
    node_ids = [line.split("(")[0].strip() for line in m.splitlines() if line.startswith("    ")]
    assert len(set(node_ids)) == 4
    assert '"' not in m.split('exporter file/')[1].split('"/]')[0]  # the quote in the id is escaped
    d = to_dot(g)
    assert '"exporter:file/\\"q\\""' in d


async def test_restart_is_visible_in_metrics_and_healthz(nursery):
    """A component failing while running shows in /healthz and, once restarted, in /metrics."""
    import httpx

    from tapio import selftelemetry
    from tapio.testing.process import metric_sum, parse_metrics

    world = World()
    svc = make_service(world, {"logs": (["src"], ["pass"], ["rec"])}, restart_initial=0.5)
    health = selftelemetry.Health(lambda: svc.ready, svc.failing)
    port = await nursery.start(selftelemetry.serve, svc.telemetry, health, "127.0.0.1", 0)
    await nursery.start(svc.run)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/readyz")).status_code == 200
        await world.sources["src"].send("boom")
        await world.wait_until(lambda: svc.failing() == ["receiver:src"])
        r = await client.get("/healthz")
        assert r.status_code == 503 and r.json()["failing"] == ["receiver:src"]
        await world.wait_until(lambda: world.runs.get("src") == 2 and svc.failing() == [])
        metrics = parse_metrics((await client.get("/metrics")).text)
        assert metric_sum(metrics, "tapio_component_restarts_total", receiver="src") == 1
        assert metric_sum(metrics, "tapio_component_failures_total", receiver="src") == 1
        assert (await client.get("/healthz")).status_code == 200
    svc.shutdown()


async def test_refusal_by_a_processor_reaches_the_receiver_before_any_pipeline_gets_the_batch(nursery):
    world = World()
    svc = make_service(world, {
        "logs/a": (["src"], ["pass"], ["rec"]),
        "logs/b": (["src"], ["gate", "pass"], ["rec/2"]),
        "logs/c": (["src/2"], ["pass", "gate"], ["rec/3"]),
    })
    await nursery.start(svc.run)
    recv = svc.instances["receiver:src"].ports.output
    world.admitting = False
    done: list[bool] = []
    b = log_batch(numbered(3, "x"))
    b.on_done.append(done.append)
    with pytest.raises(Refused):
        await recv.send(b)
    assert done == [False]
    # nothing entered either pipeline: no partial fan-out
    assert svc.telemetry.value("tapio_processor_incoming_items_total") == 0
    assert svc.telemetry.value("tapio_receiver_refused_log_records_total", receiver="src") == 3
    world.admitting = True
    await recv.send(log_batch(numbered(2, "x")))
    await world.wait_until(lambda: len(world.exported.get("rec", [])) == 1 and len(world.exported.get("rec/2", [])) == 1)
    assert svc.telemetry.value("tapio_receiver_accepted_log_records_total", receiver="src") == 2
    # deeper in a pipeline a refusal drops the batch (its sources told) without failing the processor before it
    world.admitting = False
    late: list[bool] = []
    b = log_batch(numbered(4, "x"))
    b.on_done.append(late.append)
    await world.sources["src/2"].send(b)
    await world.wait_until(lambda: late == [False])
    assert svc.failing() == [] and world.runs["pass"] == 3  # three pass instances, none restarted
    svc.shutdown()


async def test_arrival_bytes_pass_through_unless_a_processor_changes_records(nursery):
    world = World()
    svc = make_service(world, {"logs/a": (["src"], ["mutate"], ["rec"]), "logs/b": (["src"], ["pass"], ["rec/2"])})
    await nursery.start(svc.run)
    data = log_batch(numbered(2, "x")).to_bytes()
    await world.sources["src"].send(Batch.from_bytes(Signal.LOGS, data))
    await world.wait_until(lambda: world.exported.get("rec") and world.exported.get("rec/2"))
    untouched, changed = world.exported["rec/2"][0], world.exported["rec"][0]
    assert untouched.to_bytes() == data  # passed through as it arrived
    reparsed = Signal.LOGS.request_class.FromString(changed.to_bytes())
    assert [kv.key for kv in reparsed.resource_logs[0].resource.attributes] == ["mutated"]
    svc.shutdown()


def test_batch_keeps_arrival_bytes_through_concat_share_and_split():
    from tapio.processors.batch import split_batch

    a, b = log_batch(numbered(3, "a")), log_batch(numbered(2, "b"))
    ba, bb = Batch.from_bytes(Signal.LOGS, a.to_bytes()), Batch.from_bytes(Signal.LOGS, b.to_bytes())
    joined = Batch.concat([ba, Batch.of(Signal.LOGS, log_batch(numbered(1, "c")).requests[0]), bb])
    assert joined.raw[0] is ba.raw[0] and joined.raw[1] is None and joined.raw[2] is bb.raw[0]
    assert Signal.LOGS.request_class.FromString(joined.to_bytes()) == joined.merged()
    parts = split_batch(joined, [3, 1, 2])
    assert parts[0].raw == [ba.raw[0]] and parts[2].raw == [bb.raw[0]]
    cut = split_batch(joined, [2, 4])
    assert cut[0].raw == [None]  # a cut request is new: serialized when needed
    def bodies(data: bytes) -> list[str]:
        req = Signal.LOGS.request_class.FromString(data)
        return [lr.body.string_value for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records]

    assert bodies(b"".join(p.to_bytes() for p in cut)) == bodies(joined.to_bytes()) == ["a0", "a1", "a2", "c0", "b0", "b1"]
    joined.requests.append(log_batch(numbered(1, "x")).requests[0])  # out of step: arrival bytes no longer trusted
    assert Signal.LOGS.request_class.FromString(joined.to_bytes()) == joined.merged()


def test_a_batch_handed_on_unparsed_is_parsed_only_when_its_requests_are_read():
    from tapio.processors.batch import split_batch

    a, b = log_batch(numbered(3, "a")).to_bytes(), log_batch(numbered(2, "b")).to_bytes()
    ua, ub = Batch.from_bytes(Signal.LOGS, a, 3), Batch.from_bytes(Signal.LOGS, b, 2)
    joined = Batch.concat([ua, ub])
    assert joined.unparsed and joined.count == 5 and joined.raw == [a, b]
    assert joined.to_bytes() == a + b and split_batch(joined, [5]) == [joined]
    share = joined.share()
    assert share.unparsed and share.request_bytes() == [a, b]
    assert joined.unparsed  # nothing above needed the messages
    assert joined.requests == [Signal.LOGS.request_class.FromString(a), Signal.LOGS.request_class.FromString(b)]
    assert not joined.unparsed and joined.raw == [a, b] and share.unparsed
    parts = split_batch(share, [2, 3])  # a cut needs the messages
    assert [p.count for p in parts] == [2, 3] and not share.unparsed
    mixed = Batch.concat([Batch.from_bytes(Signal.LOGS, a, 3), Batch.of(Signal.LOGS, log_batch(numbered(1, "c")).requests[0])])
    assert not mixed.unparsed and len(mixed.requests) == 2 and mixed.raw == [a, None]
    forgot = Batch.from_bytes(Signal.LOGS, b, 2)
    forgot.forget_raw()
    assert forgot.raw == [] and len(forgot.requests) == 1 and forgot.to_bytes() == b
    with pytest.raises(AttributeError):
        forgot.no_such_field  # noqa: B018


async def test_a_fan_out_cut_short_still_reports_done_exactly_once(autojump_clock):
    # A sender's deadline (an OTLP client's timeout) or shutdown can cancel a
    # fan-out after some pipelines got their share: the batch's sources must
    # still hear once, when the shares sent are done, that it was not all delivered.
    from tapio.service import ChannelConsumer, FanoutConsumer

    sig = frozenset({Signal.LOGS})
    send_a, recv_a = trio.open_memory_channel(1)
    send_b, recv_b = trio.open_memory_channel(0)  # nobody receives: this share never gets in
    fan = FanoutConsumer([ChannelConsumer(send_a, sig), ChannelConsumer(send_b, sig)], sig)
    done: list[bool] = []
    b = log_batch(numbered(2, "x"))
    b.on_done.append(done.append)
    with trio.move_on_after(1) as scope:
        await fan.send(b)
    assert scope.cancelled_caught
    share_a = recv_a.receive_nowait()
    assert done == []  # the share that got in is still on its way
    share_a.done(True)
    assert done == [False]
    with pytest.raises(trio.WouldBlock):
        recv_b.receive_nowait()


def test_a_shared_batch_grows_without_changing_the_original():
    # fan-out hands read-only consumers shares of one batch; adding to one share must not reach the others
    original = Batch.from_bytes(Signal.LOGS, log_batch(numbered(2, "a")).to_bytes())
    share = original.share()
    extra = log_batch(numbered(1, "b"))
    share.append(extra.requests[0])
    share.count += extra.count
    assert len(original.requests) == 1 and len(original.raw) == 1 and original.count == 2
    assert len(share.requests) == 2 and share.requests[0] is original.requests[0]
    assert Signal.LOGS.request_class.FromString(original.to_bytes()) == original.requests[0]
