"""Live reload of a real ``tapio run``: SIGHUP and ``--watch``, with a real OTLP client sending throughout.

Everything is real: the tapio process, its OTLP/HTTP listener, the file
exporters' files, /metrics. The client posts OTLP protobuf requests over
one keep-alive connection; the receiver answers only once a request is
delivered (``acknowledge: delivered``), so every 200 must be on disk.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from tapio import otlpjson
from tapio.component import Kind, PipelineID, Registry
from tapio.connectors.forward import factory as forward_factory
from tapio.pdata import Signal
from tapio.service import ReloadError, ReloadReport, RuntimeOptions, Service
from tapio.telemetry import Telemetry
from tapio.testing.batches import log_batch, log_bodies
from tapio.testing.process import TapioProcess, free_port, metric_sum
from tests.test_service import Empty, P, World, cid, make_registry


def write(path: Path, *, http: int, metrics: int, batch: str = "{timeout: 50ms}", exporters: str = "[file/a]",
          receiver_extra: str = "", extra: str = "") -> Path:
    out = path.parent
    path.write_text(f"""
receivers:
  otlp:
    acknowledge: delivered
    protocols:
      http: {{endpoint: "127.0.0.1:{http}"}}{receiver_extra}
processors:
  batch: {batch}
exporters:
  file/a: {{path: "{out}/a.jsonl", flush_interval: 0s}}
  file/b: {{path: "{out}/b.jsonl", flush_interval: 0s}}
{extra}
service:
  pipelines:
    logs: {{receivers: [otlp], processors: [batch], exporters: {exporters}}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    return path


def bodies(path: Path) -> set[str]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        req = otlpjson.decode(Signal.LOGS, line.encode())
        out.update(lr.body.string_value for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records)
    return out


class Sender:
    """Posts numbered OTLP/HTTP log requests on one keep-alive connection until stopped; records what was acknowledged."""

    RECORDS = 5

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/logs"
        self.acked: list[int] = []
        self.failures: list[str] = []
        self.connections: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sender":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)

    def records(self, i: int) -> list[str]:
        return [f"r{i}-{j}" for j in range(self.RECORDS)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                req = Signal.LOGS.request_class()
                sl = req.resource_logs.add().scope_logs.add()
                for body in self.records(i):
                    sl.log_records.add().body.string_value = body
                try:
                    with client.stream("POST", self.url, content=req.SerializeToString(), headers={"content-type": "application/x-protobuf"}) as r:
                        r.read()
                        stream = r.extensions.get("network_stream")
                        if stream is not None:
                            self.connections.add(stream.get_extra_info("sockname"))
                except httpx.TransportError as exc:
                    self.failures.append(f"request {i}: {exc!r}")
                else:
                    if r.status_code == 200:
                        self.acked.append(i)
                    else:
                        self.failures.append(f"request {i}: HTTP {r.status_code} {r.text}")
                i += 1

    def acked_count(self) -> int:
        return len(self.acked)


def starts(t: TapioProcess, **labels: str) -> float:
    return metric_sum(t.metrics(), "tapio_component_starts_total", **labels)


def reloads(t: TapioProcess, result: str) -> float:
    return metric_sum(t.metrics(), "tapio_config_reloads_total", result=result)


def sighup_and_wait(t: TapioProcess, result: str) -> None:
    before = reloads(t, result)
    t.signal(signal.SIGHUP)
    t.wait_for(lambda: reloads(t, result) == before + 1, 30, f"a reload counted as {result}")


def test_reload_adds_an_exporter_changes_a_processor_and_removes_an_exporter_losing_nothing(tmp_path):
    http, metrics = free_port(), free_port()
    cfg = write(tmp_path / "pipelines.yaml", http=http, metrics=metrics)
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        with Sender(http) as client:
            t.wait_for(lambda: client.acked_count() >= 50, 30, "50 acknowledged requests")
            # 1. a changed processor and an added exporter
            write(cfg, http=http, metrics=metrics, batch="{timeout: 20ms}", exporters="[file/a, file/b]")
            sighup_and_wait(t, "applied")
            first_reload_done = len(client.acked)
            assert starts(t, receiver="otlp") == 1  # kept: same socket, never restarted
            assert starts(t, exporter="file/a") == 1
            assert starts(t, processor="batch") == 2  # replaced
            assert starts(t, exporter="file/b") == 1
            t.wait_for(lambda: client.acked_count() >= first_reload_done + 50, 30, "50 more acknowledged requests")
            # 2. an exporter removed
            write(cfg, http=http, metrics=metrics, batch="{timeout: 20ms}", exporters="[file/b]")
            sighup_and_wait(t, "applied")
            second_reload_done = len(client.acked)
            t.wait_for(lambda: client.acked_count() >= second_reload_done + 50, 30, "50 more acknowledged requests")
        assert starts(t, receiver="otlp") == 1 and starts(t, processor="batch") == 2
        assert "configuration reloaded: changed processor batch in pipeline logs; added exporter file/b; 2 components unchanged" in t.stderr
        assert "configuration reloaded: removed exporter file/a; 3 components unchanged" in t.stderr
        t.signal(signal.SIGTERM)
        assert t.wait_exit() == 0, t.stderr

    assert client.failures == []
    assert len(client.connections) == 1, client.connections  # one keep-alive connection throughout: the listener was never closed
    a, b = bodies(tmp_path / "a.jsonl"), bodies(tmp_path / "b.jsonl")
    lost = [i for i in client.acked if not set(client.records(i)) <= a | b]
    assert not lost, f"{len(lost)} acknowledged requests in neither file, e.g. {lost[:5]}"
    early = client.acked[:50]
    assert all(set(client.records(i)) <= a for i in early)
    late = client.acked[second_reload_done:]
    assert late and all(set(client.records(i)) <= b and not set(client.records(i)) & a for i in late)


def test_an_invalid_reload_is_refused_with_its_file_and_line_and_the_old_graph_keeps_serving(tmp_path):
    http, metrics = free_port(), free_port()
    cfg = write(tmp_path / "pipelines.yaml", http=http, metrics=metrics)
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        with Sender(http) as client:
            t.wait_for(lambda: client.acked_count() >= 20, 30, "20 acknowledged requests")
            good = cfg.read_text()
            cfg.write_text(good.replace("batch: {timeout: 50ms}", "batch: {timeout: 50ms, send_batch_sise: 10}"))
            sighup_and_wait(t, "refused")
            line = next(n for n, text in enumerate(cfg.read_text().splitlines(), 1) if "send_batch_sise" in text)
            assert f"{cfg}:{line}:" in t.stderr and "processors.batch.send_batch_sise: unknown key 'send_batch_sise'" in t.stderr
            assert "reload refused: the configuration has 1 error; the running configuration stays" in t.stderr
            # a change only a restart can apply is refused too
            cfg.write_text(good.replace(f"127.0.0.1:{metrics}", f"127.0.0.1:{free_port()}"))
            sighup_and_wait(t, "refused")
            assert "reload refused: service.telemetry.metrics.address cannot change while tapio runs; restart tapio" in t.stderr
            # a new exporter that cannot start: the reload is rolled back
            cfg.write_text(good.replace(f'"{tmp_path}/b.jsonl"', '"/proc/tapio-cannot-write-here/b.jsonl"').replace("[file/a]", "[file/a, file/b]"))
            sighup_and_wait(t, "failed")
            assert "reload failed: exporter file/b failed to start" in t.stderr
            refused_at = len(client.acked)
            t.wait_for(lambda: client.acked_count() >= refused_at + 20, 30, "20 more acknowledged requests after the refusals")
            assert t.metrics().get('tapio_config_reloads_total{result="applied"}', 0) == 0
            for labels in ({"receiver": "otlp"}, {"processor": "batch"}, {"exporter": "file/a"}):
                assert starts(t, **labels) == 1, labels
            assert starts(t, exporter="file/b") == 0
            assert httpx.get(t.url + "/readyz", timeout=5).status_code == 200
        t.signal(signal.SIGTERM)
        assert t.wait_exit() == 0, t.stderr
    assert client.failures == []
    a = bodies(tmp_path / "a.jsonl")
    assert all(set(client.records(i)) <= a for i in client.acked)


def test_a_changed_receiver_moves_to_its_new_port_and_watch_reloads_without_a_signal_keeping_set_values(tmp_path):
    http, metrics, new_http = free_port(), free_port(), free_port()
    cfg = write(tmp_path / "pipelines.yaml", http=http, metrics=metrics)
    # --set is applied again on every reload: batch stays unchanged (30ms, not the file's 50ms)
    with TapioProcess([cfg], metrics_port=metrics, args=["--watch", "0.2", "--set", "processors::batch::timeout=30ms"]) as t:
        t.wait_ready()
        r = httpx.post(f"http://127.0.0.1:{http}/v1/logs", content=b"", headers={"content-type": "application/x-protobuf"}, timeout=5)
        assert r.status_code == 200
        write(cfg, http=new_http, metrics=metrics)
        t.wait_for(lambda: reloads(t, "applied") == 1, 30, "the watch to reload the changed file")
        assert "a config file changed: reloading the configuration" in t.stderr
        assert "configuration reloaded: changed receiver otlp; 2 components unchanged" in t.stderr
        assert starts(t, receiver="otlp") == 2 and starts(t, exporter="file/a") == 1
        r = httpx.post(f"http://127.0.0.1:{new_http}/v1/logs", content=b"", headers={"content-type": "application/x-protobuf"}, timeout=5)
        assert r.status_code == 200
        try:
            httpx.post(f"http://127.0.0.1:{http}/v1/logs", content=b"", timeout=2)
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError(f"the old port {http} still answers after the receiver moved")
        t.signal(signal.SIGTERM)
        assert t.wait_exit() == 0, t.stderr


# ---------------------------------------------------------------- the runtime's reload, in process


@dataclass(frozen=True, kw_only=True)
class Tuned:
    """A config that differs by value, so a reload sees a changed component."""

    n: int = 0


def graph(pipelines: dict[str, tuple[list[str], list[str], list[str]]], configs: dict[str, object] | None = None, connectors: tuple[str, ...] = ()):
    """``service.pipelines`` and the component configs for `Service`/`Service.reload` (every config `Empty` unless given)."""
    configs = configs or {}
    conn = {cid(c) for c in connectors}
    pl = {PipelineID.parse(k): P([cid(x) for x in r], [cid(x) for x in p], [cid(x) for x in e]) for k, (r, p, e) in pipelines.items()}
    comps: dict[Kind, dict] = {Kind.RECEIVER: {}, Kind.PROCESSOR: {}, Kind.EXPORTER: {}, Kind.CONNECTOR: {c: forward_factory.config_class() for c in conn}}
    for p in pl.values():
        for kind, ids in ((Kind.RECEIVER, p.receivers), (Kind.PROCESSOR, p.processors), (Kind.EXPORTER, p.exporters)):
            for i in ids:
                if i not in conn:
                    comps[kind][i] = configs.get(str(i), Empty())
    return pl, comps


def service(world: World, pipelines, configs=None, connectors=()) -> Service:
    pl, comps = graph(pipelines, configs, connectors)
    registry = Registry([*make_registry(world).all(), forward_factory])
    return Service(pipelines=pl, components=comps, registry=registry, telemetry=Telemetry(), options=RuntimeOptions())


def exported(world: World, *exporters: str) -> list[str]:
    return log_bodies([b for e in exporters for b in world.exported.get(e, [])])


async def test_a_replaced_processor_flushes_what_it_held_and_the_receiver_is_not_restarted():
    world = World()
    svc = service(world, {"logs": (["src"], ["hoard"], ["rec"])})
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        for i in range(10):
            await world.sources["src"].send(log_batch([f"old{i}"]))
        await world.wait_until(lambda: svc.telemetry.value("tapio_processor_incoming_items_total", processor="hoard") == 10)
        assert "rec" not in world.exported  # hoarded
        report = await svc.reload(**_kw(graph({"logs": (["src"], ["pass"], ["rec"])})))
        assert report == ReloadReport(added=("processor pass in pipeline logs",), removed=("processor hoard in pipeline logs",), unchanged=2)
        # the removed hoard saw end of stream and flushed into the kept exporter
        await world.wait_until(lambda: len(exported(world, "rec")) == 10)
        for i in range(5):
            await world.sources["src"].send(log_batch([f"new{i}"]))
        await world.wait_until(lambda: len(exported(world, "rec")) == 15)
        assert world.flushed == ["hoard"]
        assert world.runs == {"src": 1, "pass": 1}
        svc.shutdown()
    assert exported(world, "rec") == [f"old{i}" for i in range(10)] + [f"new{i}" for i in range(5)]


async def test_sends_blocked_in_flight_during_a_reload_complete_into_the_old_target_and_nothing_is_lost():
    world = World()
    world.exporter_gate = trio.Event()  # the exporter takes one batch and waits: the channels fill up
    svc = service(world, {"logs": (["src"], ["pass"], ["rec"])})
    delivered: list[bool] = []
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        for i in range(60):  # more than the channels hold: src ends up blocked in a send
            batch = log_batch([f"b{i}"])
            batch.on_done.append(delivered.append)
            world.sources["src"].send_nowait(batch)
        await trio.testing.wait_all_tasks_blocked()
        assert svc.instances["receiver:src"].links[Signal.LOGS]._gen.sending == 1  # a send in flight
        pl, comps = graph({"logs": (["src"], ["pass"], ["rec/2"])})
        await svc.reload(pipelines=pl, components=comps)
        world.exporter_gate.set()
        await world.wait_until(lambda: len(delivered) == 60)
        svc.shutdown()
    assert delivered == [True] * 60
    got = exported(world, "rec", "rec/2")
    assert sorted(got) == sorted(f"b{i}" for i in range(60)) and len(got) == 60
    assert world.exported.get("rec/2")  # what came after the reload went to the new exporter
    assert world.runs == {"src": 1, "pass": 1}


async def test_identity_is_the_config_and_for_receivers_the_signals_they_feed():
    world = World()
    svc = service(world, {"logs": (["src"], ["pass"], ["rec"])}, {"pass": Tuned(n=1)})
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        same = await svc.reload(**_kw(graph({"logs": (["src"], ["pass"], ["rec"])}, {"pass": Tuned(n=1)})))
        assert same == ReloadReport(unchanged=3)
        tuned = await svc.reload(**_kw(graph({"logs": (["src"], ["pass"], ["rec"])}, {"pass": Tuned(n=2)})))
        assert tuned.changed == ("processor pass in pipeline logs",)
        # src now also feeds traces: a receiver decides at startup what it serves, so it is restarted
        wider = await svc.reload(**_kw(graph({"logs": (["src"], ["pass"], ["rec"]), "traces": (["src"], [], ["rec"])}, {"pass": Tuned(n=2)})))
        assert wider.changed == ("receiver src",) and "processor pass in pipeline logs" not in wider.changed
        await world.wait_until(lambda: world.runs.get("src") == 2)
        await world.sources["src"].send(log_batch(["after"]))
        await world.wait_until(lambda: exported(world, "rec") == ["after"])
        assert svc.telemetry.value("tapio_component_starts_total", receiver="src") == 2
        assert svc.telemetry.value("tapio_component_starts_total", processor="pass") == 2
        assert svc.telemetry.value("tapio_component_starts_total", exporter="rec") == 1
        svc.shutdown()


async def test_a_reload_through_a_connector_keeps_it_and_a_failed_start_keeps_the_old_graph():
    world = World()
    world.fail_start.add("rec/broken")
    pipelines = {"logs/in": (["src"], [], ["forward"]), "logs": (["forward"], ["hoard"], ["rec"])}
    svc = service(world, pipelines, connectors=("forward",))
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        await world.sources["src"].send(log_batch(["one"]))
        await world.wait_until(lambda: svc.telemetry.value("tapio_processor_incoming_items_total", processor="hoard") == 1)
        with pytest.raises(ReloadError, match="exporter rec/broken failed to start: cannot connect rec/broken"):
            await svc.reload(**_kw(graph({**pipelines, "logs": (["forward"], ["hoard"], ["rec", "rec/broken"])}, connectors=("forward",))))
        assert world.flushed == []  # nothing of the old graph was touched
        report = await svc.reload(**_kw(graph({**pipelines, "logs": (["forward"], ["pass"], ["rec"])}, connectors=("forward",))))
        assert report.changed == () and report.removed == ("processor hoard in pipeline logs",)
        await world.sources["src"].send(log_batch(["two"]))
        await world.wait_until(lambda: exported(world, "rec") == ["one", "two"])
        assert svc.telemetry.value("tapio_component_starts_total", connector="forward") == 1
        svc.shutdown()
    with pytest.raises(ReloadError, match="shutting down"):
        await svc.reload(**_kw(graph(pipelines, connectors=("forward",))))


def _kw(pair) -> dict:
    return {"pipelines": pair[0], "components": pair[1]}


# ---------------------------------------------------------------- under ebpf and OTLP load together


def exec_marks(path: Path, name: str) -> set[str]:
    """The first argument of every exec of ``name`` the ebpf receiver wrote to ``path``."""
    out: set[str] = set()
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        req = otlpjson.decode(Signal.LOGS, line.encode())
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    a = {kv.key: kv.value for kv in lr.attributes}
                    if "process.executable.name" in a and a["process.executable.name"].string_value == name:
                        args = [v.string_value for v in a["process.command_args"].array_value.values]
                        if len(args) > 1:
                            out.add(args[1])
    return out


def test_unchanged_changed_and_broken_reloads_under_ebpf_and_otlp_load(tmp_path):
    import shutil
    import subprocess

    from tests.test_e2e import require_ebpf

    require_ebpf()
    marker = tmp_path / "tapiomark"
    shutil.copy("/bin/true", marker)
    http, metrics = free_port(), free_port()
    kernel = f"""
  ebpf:
    events: {{process: true, file: false, network: false, oom: false, signal: false}}
    flush_interval: 50ms"""
    cfg = tmp_path / "pipelines.yaml"

    def config(batch: str) -> None:
        write(cfg, http=http, metrics=metrics, batch=batch, receiver_extra=kernel)
        text = cfg.read_text().replace("  file/b:", f'  file/k: {{path: "{tmp_path}/k.jsonl", flush_interval: 0s}}\n  file/b:')
        cfg.write_text(text.replace("  telemetry:", "    logs/kernel: {receivers: [ebpf], exporters: [file/k]}\n  telemetry:"))

    config("{timeout: 50ms}")
    execs: list[str] = []
    stop = threading.Event()

    def exec_load() -> None:
        i = 0
        while not stop.is_set():
            subprocess.run([str(marker), f"m{i}"], check=True)
            execs.append(f"m{i}")
            i += 1

    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready(timeout=120)  # bcc compiles the programs
        load = threading.Thread(target=exec_load, daemon=True)
        load.start()
        try:
            with Sender(http) as client:
                t.wait_for(lambda: client.acked_count() >= 20 and len(exec_marks(tmp_path / "k.jsonl", "tapiomark")) >= 20, 60, "OTLP and exec events flowing")
                sighup_and_wait(t, "applied")  # unchanged
                assert "configuration reloaded: 5 components unchanged" in t.stderr
                config("{timeout: 30ms}")  # changed: the batch processor of the OTLP pipeline only
                sighup_and_wait(t, "applied")
                assert "configuration reloaded: changed processor batch in pipeline logs; 4 components unchanged" in t.stderr
                cfg.write_text(cfg.read_text().replace("events: {", "events: {proces: true, "))  # broken
                sighup_and_wait(t, "refused")
                assert "receivers.ebpf.events.proces: unknown key 'proces'; did you mean 'process'?" in t.stderr
                after = len(execs)
                acked_after = client.acked_count()
                t.wait_for(lambda: client.acked_count() >= acked_after + 20, 30, "OTLP still served after the refused reload")
                t.wait_for(lambda: {f"m{i}" for i in range(after, after + 20)} <= exec_marks(tmp_path / "k.jsonl", "tapiomark"), 30,
                           "exec events after the reloads")
        finally:
            stop.set()
            load.join(20)
        for labels, n in (({"receiver": "ebpf"}, 1), ({"receiver": "otlp"}, 1), ({"exporter": "file/k"}, 1), ({"processor": "batch"}, 2)):
            assert starts(t, **labels) == n, labels
        t.signal(signal.SIGTERM)
        assert t.wait_exit() == 0, t.stderr
    assert client.failures == []
    a = bodies(tmp_path / "a.jsonl")
    assert all(set(client.records(i)) <= a for i in client.acked)
    # the kernel pipeline lost nothing across the reloads: every exec the receiver saw before stopping is in the file
    seen = exec_marks(tmp_path / "k.jsonl", "tapiomark")
    first = min(int(m[1:]) for m in seen)
    last = max(int(m[1:]) for m in seen)
    assert {f"m{i}" for i in range(first, last + 1)} <= seen


async def test_a_new_receiver_that_cannot_start_is_retried_like_a_failing_one_and_the_rest_is_applied(autojump_clock):
    world = World()
    world.fail_start.add("src/2")
    svc = service(world, {"logs": (["src"], [], ["rec"])})
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        report = await svc.reload(**_kw(graph({"logs": (["src", "src/2"], [], ["rec"])})))
        assert report.added == ("receiver src/2",)
        assert svc.failing() == ["receiver:src/2"]
        await world.sources["src"].send(log_batch(["still served"]))
        await world.wait_until(lambda: exported(world, "rec") == ["still served"])
        world.fail_start.discard("src/2")
        await world.wait_until(lambda: "src/2" in world.sources and svc.failing() == [], timeout=60)
        await world.sources["src/2"].send(log_batch(["from the retried receiver"]))
        await world.wait_until(lambda: exported(world, "rec") == ["still served", "from the retried receiver"])
        assert svc.telemetry.value("tapio_component_failures_total", receiver="src/2") >= 1
        svc.shutdown()
