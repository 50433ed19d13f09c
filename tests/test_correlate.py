"""The correlate connector: rules, the engine on a corpus of timelines, the connector in a running pipeline.

The timelines (tests/data/correlate/scenarios.yaml) go through the same
path as live records: each is an OTLP log request, read by the
connector's record reader, fed to the engine with its arrival time as the
clock, and ticked as the connector ticks.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import trio
import yaml

from tapio.builtin import default_registry
from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import ConfigError, load_config
from tapio.connectors.correlate import factory
from tapio.connectors.correlate._config import CorrelateConfig, RuleConfig, load_rules_file
from tapio.connectors.correlate._engine import Appended, Emitted, Engine, compile_rule
from tapio.connectors.correlate._records import events
from tapio.decode import decode_dataclass
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing.events import logs_request
from tapio.testing.sink import RecordingConsumer

import logging

DATA = Path(__file__).parent / "data" / "correlate"
DOCS = Path(__file__).parent.parent / "docs" / "components"
SCENARIOS = yaml.safe_load((DATA / "scenarios.yaml").read_text())["scenarios"]
S = 1_000_000_000


def builtin_engine(**kw) -> Engine:
    rules, problems = load_rules_file(None)
    assert problems == []
    return Engine([compile_rule(n, r) for n, r in rules.items()], **kw)


def timeline(scenario: dict) -> list[dict]:
    if "repeat" in scenario:
        r = scenario["repeat"]
        return [{"t": i * r["every"], **{k: v for k, v in r.items() if k not in ("count", "every")}} for i in range(r["count"])]
    return scenario["events"]


def play(engine: Engine, scenario: dict, base_s: float = 1000.0) -> list:
    """Every output of the engine over the scenario, the clock running past the last window's end."""
    steps = sorted(timeline(scenario), key=lambda e: e.get("arrive", e["t"] + 0.1))
    out = []
    now = base_s
    for step in steps:
        arrive = base_s + step.get("arrive", step["t"] + 0.1)
        while now + 1 <= arrive:  # the connector ticks once a second
            now += 1
            out += engine.tick(now)
        request = logs_request([{**step, "time_ns": int((base_s + step["t"]) * S)}])
        for event in events(request, engine.candidates):
            sent, _ = engine.feed(event, arrive)
            out += sent
    end = now + 700  # past every built-in window (10 minutes at most) and its lateness
    while now < end:
        now += 1
        out += engine.tick(now)
    return out


def found(outputs) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((o.incident.rule.name, o.incident.key) for o in outputs if isinstance(o, Emitted))


def expected(scenario) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((e["rule"], tuple(e["key"])) for e in scenario["expect"])


# ---------------------------------------------------------------- the built-in pack on the corpus


def test_the_corpus_has_at_least_twenty_timelines_covering_every_builtin_rule():
    rules, _ = load_rules_file(None)
    assert len(SCENARIOS) >= 20
    covered = {e["rule"] for s in SCENARIOS for e in s["expect"]}
    assert covered == set(rules)
    assert sum(1 for s in SCENARIOS if not s["expect"]) >= 8, "negative timelines keep precision honest"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_each_timeline_gives_exactly_its_incidents(scenario):
    assert found(play(builtin_engine(), scenario)) == expected(scenario)


def test_precision_and_recall_over_the_corpus_and_over_all_timelines_at_once():
    tp = fp = fn = 0
    for s in SCENARIOS:
        got, want = set(found(play(builtin_engine(), s))), set(expected(s))
        tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # every timeline in one engine, one after the other with their own keys: the same incidents
    engine = builtin_engine()
    allout = []
    for i, s in enumerate(SCENARIOS):
        allout += play(engine, s, base_s=10_000.0 * (i + 1))
    assert found(allout) == sorted(x for s in SCENARIOS for x in expected(s))


def test_an_incident_is_sent_once_and_later_members_are_appended_to_its_trace():
    engine = builtin_engine()
    oom = {"event": "tapio.ebpf.oom", "attrs": {"k8s.pod.uid": "p"}}
    status = {"event": "k8s.container.status", "attrs": {"k8s.pod.uid": "p", "k8s.container.status.reason": "OOMKilled"}}
    killed = {"event": "tapio.ebpf.exit", "attrs": {"k8s.pod.uid": "p", "tapio.ebpf.exit.signal": "SIGKILL"}}

    def feed(step, t):
        out, stamps = [], []
        for e in events(logs_request([{**step, "time_ns": int(t * S)}]), engine.candidates):
            o, s = engine.feed(e, t)
            out += o
            stamps += s
        return out, stamps

    assert feed(oom, 100) == ([], [])
    out, stamps = feed(status, 101)
    assert out == []  # established, waiting `settle` for optional members
    assert len(stamps) == 2 and len({trace for trace, _ in stamps}) == 1
    trace_id = stamps[0][0]
    sent = engine.tick(107)
    assert [type(o) for o in sent] == [Emitted] and sent[0].incident.trace_id == trace_id
    assert sent[0].incident.confidence == pytest.approx(0.8)
    out, stamps = feed(killed, 108)
    assert [type(o) for o in out] == [Appended] and out[0].incident.trace_id == trace_id
    assert [j.member.name for j in out[0].added] == ["processes_killed"]
    assert stamps == [(trace_id, out[0].added[0])]
    assert engine.tick(400) == []  # the window closes without a second incident
    assert engine.incidents == {("ContainerOOM", "error"): 1}


def test_state_is_bounded_and_complete_windows_are_sent_when_evicted():
    rule = RuleConfig(
        join=["k"],
        settle=decode_dataclass(CorrelateConfig, {"lateness": "100s"}).lateness,
        members={"a": _member(event="a"), "b": _member(event="b", role="optional")},
    )
    engine = Engine([compile_rule("R", rule)], max_keys=3, max_events_per_member=2)
    for i in range(3):
        engine.feed(_event("a", {"k": str(i)}, i), 1.0)
    assert engine.open_windows() == 3
    out, _ = engine.feed(_event("a", {"k": "new"}, 9), 2.0)  # key 0 is the least recently used
    assert found(out) == [("R", ("0",))]
    assert engine.open_windows() == 3 and engine.stats["evicted"] == 1
    for _ in range(5):
        engine.feed(_event("b", {"k": "1"}, 10), 3.0)
    assert engine.stats["kept_over_cap"] == 3
    assert sum(1 for j in engine.windows["R"][("1",)].joined if j.member.name == "b") == 2


def _member(**kw):
    from tapio.connectors.correlate._config import MemberConfig

    return MemberConfig(**kw)


def _event(name, attrs, t):
    from tapio.connectors.correlate._match import Event

    return Event(time_ns=int(t * S), name=name, scope="", attrs=dict(attrs), resource={})


# ---------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("cond", "value", "holds"),
    [
        (137, 137, True),
        (137, "137", True),
        ("OOMKilled", "OOMKilled", True),
        ("OOMKilled", "Error", False),
        ({"in": ["False", "Unknown"]}, "Unknown", True),
        ({"not_in": ["DEL"]}, "ADD", True),
        ({"not_in": ["DEL"]}, None, False),
        ({"regex": "(?i)^servfail$"}, "SERVFAIL", True),
        ({"gt": 0}, 3, True),
        ({"gt": 0}, "x", False),
        ({"gte": 1, "lt": 10}, 10, False),
        ({"exists": False}, None, True),
        ({"exists": True}, "", True),
        ("true", True, True),
    ],
)
def test_conditions(cond, value, holds):
    from tapio.connectors.correlate._match import AttributeMatch

    match = AttributeMatch.compile({"a": cond})
    assert match({} if value is None else {"a": value}) is holds


# ---------------------------------------------------------------- config errors


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


PIPELINE = """\
receivers:
  otlp: {{}}
exporters:
  debug: {{}}
connectors:
  correlate:
{body}
service:
  pipelines:
    logs: {{receivers: [otlp], exporters: [correlate]}}
    traces: {{receivers: [correlate], exporters: [debug]}}
"""


def problems(path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config([path], default_registry(), env={})
    return [str(p) for p in info.value.errors]


def test_a_valid_inline_rule_loads(tmp_path):
    path = write(tmp_path, PIPELINE.format(body="""\
    rules:
      Mine:
        join: [k8s.pod.uid]
        members:
          a: {event: tapio.ebpf.oom}
"""))
    cfg = load_config([path], default_registry(), env={})
    config = cfg.connectors[ComponentID("correlate")]
    assert "Mine" in config.effective_rules() and "ContainerOOM" in config.effective_rules()


def test_rule_errors_name_the_file_line_and_key(tmp_path):
    path = write(tmp_path, PIPELINE.format(body="""\
    disabled_rules: [ContainerOOOM]
    rules:
      Bad:
        window: 10s
        settle: 20s
        members:
          a:
            role: optional
            event: tapio.ebpf.oom
            attributes:
              process.pid: {greater: 5}
              comm: {regex: "("}
"""))
    got = "\n".join(problems(path))
    assert re.search(r"pipelines.yaml:\d+:\d+: connectors.correlate.rules.Bad.*join", got), got
    assert "settle: must not exceed the window" in got
    assert "a rule needs at least one required member" in got
    assert "unknown operator 'greater'" in got
    assert "is not a valid regular expression" in got
    assert "disabled_rules[0]: no rule is named 'ContainerOOOM'" in got


def test_a_rules_file_with_problems_is_reported_with_its_own_line(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  R:\n    join: [x]\n    members:\n      a: {role: requird, event: e}\n")
    path = write(tmp_path, PIPELINE.format(body=f"    rules_files: [{rules}]\n"))
    got = "\n".join(problems(path))
    assert f"{rules}:5:" in got and "requird" in got, got


# ---------------------------------------------------------------- the connector


def settings() -> Settings:
    telemetry = Telemetry()
    return Settings(
        id=ComponentID("correlate"),
        kind=Kind.CONNECTOR,
        telemetry=telemetry.for_component("connector", "correlate"),
        logger=logging.getLogger("tapio.test.correlate"),
        shutdown_grace=5.0,
    )


def oom_batch(pod: str, t_ns: int) -> Batch:
    return Batch.of(
        Signal.LOGS,
        logs_request(
            [
                {"time_ns": t_ns, "event": "tapio.ebpf.oom", "scope": "tapio.ebpf", "attrs": {"k8s.pod.uid": pod, "process.pid": 7, "tapio.ebpf.comm": "java"}, "resource": {"host.name": "n1"}},
                {"time_ns": t_ns + 1, "event": "tapio.ebpf.exec", "scope": "tapio.ebpf", "attrs": {"k8s.pod.uid": pod}, "resource": {"host.name": "n1"}},
                {"time_ns": t_ns + 5 * 10**8, "event": "k8s.container.status", "scope": "tapio.kubeapi", "attrs": {"k8s.pod.uid": pod, "k8s.pod.name": "api-0", "k8s.namespace.name": "shop", "k8s.container.name": "api", "k8s.container.status.reason": "OOMKilled"}},
            ]
        ),
    )


async def test_the_connector_sends_a_trace_a_log_record_and_a_counter_and_stamps_member_records():
    import time

    s = settings()
    send, recv = trio.open_memory_channel(4)
    sink = RecordingConsumer(ack=True)
    connector = factory.create(s, decode_dataclass(CorrelateConfig, {"rules": {}}), Ports(input=recv, output=sink))
    delivered = []
    batch = oom_batch("pod-1", time.time_ns())
    batch.on_done.append(delivered.append)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(connector.run)
            await send.send(batch)
            await send.aclose()  # shutdown: the complete incident still settling is sent
    by_signal = {sig: [b for b in sink.batches if b.signal is sig] for sig in Signal}
    assert delivered == [True]
    logs = [r for b in by_signal[Signal.LOGS] for req in b.requests for rl in req.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    passed, incident_logs = logs[:3], logs[3:]
    traces = [sp for b in by_signal[Signal.TRACES] for req in b.requests for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
    root = next(sp for sp in traces if not sp.parent_span_id)
    assert root.name == "ContainerOOM" and root.status.code == 2
    children = {sp.span_id: sp for sp in traces if sp.parent_span_id == root.span_id}
    assert sorted(sp.name for sp in children.values()) == ["container_oomkilled: k8s.container.status", "kernel_oom_kill: tapio.ebpf.oom"]
    # the member records carry the incident's trace and their child span; the unrelated exec does not
    assert passed[0].trace_id == root.trace_id and passed[0].span_id in children
    assert passed[2].trace_id == root.trace_id and passed[2].span_id in children
    assert passed[1].trace_id == b""
    assert [lr.event_name for lr in incident_logs] == ["tapio.incident"]
    assert "api of pod shop/api-0 was OOM-killed" in incident_logs[0].body.string_value
    resource = {kv.key: kv.value.string_value for kv in by_signal[Signal.TRACES][0].requests[0].resource_spans[0].resource.attributes}
    assert resource["k8s.pod.uid"] == "pod-1" and resource["k8s.namespace.name"] == "shop" and resource["service.name"] == "tapio"
    points = by_signal[Signal.METRICS][0].requests[0].resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    assert [p.as_int for p in points] == [1]
    tel = s.telemetry.telemetry
    assert tel.value("tapio_correlate_incidents_total", rule="ContainerOOM", severity="error") == 1


async def test_without_a_logs_pipeline_after_it_records_end_at_the_connector_as_delivered():
    import time

    send, recv = trio.open_memory_channel(4)
    sink = RecordingConsumer(signals=[Signal.TRACES], ack=True)
    connector = factory.create(settings(), decode_dataclass(CorrelateConfig, {}), Ports(input=recv, output=sink))
    delivered = []
    batch = oom_batch("pod-2", time.time_ns())
    batch.on_done.append(delivered.append)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(connector.run)
            await send.send(batch)
            await send.aclose()
    assert delivered == [True]
    assert {b.signal for b in sink.batches} == {Signal.TRACES}


def test_the_docs_table_names_every_builtin_rule():
    rules, _ = load_rules_file(None)
    text = (DOCS / "correlate.md").read_text()
    table = {m for m in re.findall(r"^\| `([A-Za-z]+)` \| (?:info|warning|error|critical) \|", text, re.M)}
    assert table == set(rules)


@pytest.mark.parametrize(
    "pattern,matches,misses",
    [
        ("k8s.event", ["k8s.event"], ["k8s.events", "k8s.even"]),
        ("systemd.unit.*", ["systemd.unit.failed", "systemd.unit."], ["systemd.units", "x.systemd.unit.failed"]),
        ("k8s.container.status | tapio.cri.container.stopped", ["k8s.container.status", "tapio.cri.container.stopped"], ["tapio.cri.container.started", "k8s.container.status | tapio.cri.container.stopped"]),
        ("tapio.dns_xdp.* | k8s.event", ["tapio.dns_xdp.answered", "k8s.event"], ["k8s.event.x", "tapio.dns"]),
    ],
)
def test_event_patterns_exact_glob_and_alternatives(pattern, matches, misses):
    from tapio.connectors.correlate._match import glob

    test = glob(pattern)
    assert all(test(m) for m in matches) and not any(test(m) for m in misses)


# ---------------------------------------------------------------- state kept across a restart (storage)


def _feed(engine: Engine, step: dict, t: float, now: float) -> list:
    out = []
    for e in events(logs_request([{**step, "time_ns": int(t * S)}]), engine.candidates):
        out += engine.feed(e, now)[0]
    return out


def test_open_windows_survive_a_dump_and_a_load_into_a_new_engine_on_a_new_clock():
    from tapio.connectors.correlate import _state

    before = builtin_engine()
    oom = {"event": "tapio.ebpf.oom", "attrs": {"k8s.pod.uid": "p", "process.pid": 41, "tapio.ebpf.comm": "java"}, "resource": {"host.name": "n1"}}
    assert _feed(before, oom, 100, now=100.0) == []
    saved = before.windows["ContainerOOM"][("p",)].joined[0].event
    saved.attrs["tapio.raw"] = b"\x00\xffbytes"  # a binary attribute (journald keeps them) survives too
    data = _state.dump(before, now=100.5, wall_now=1_000_000.0)

    after = builtin_engine()
    restored, dropped = _state.load(after, data, now=5000.0, wall_now=1_000_002.0)  # 2 s down
    assert dropped == 0 and restored == before.open_windows() == after.open_windows()
    w = after.windows["ContainerOOM"][("p",)]
    assert w.opened == pytest.approx(5000.0 - 0.5 - 2.0)  # its end does not move with the restart
    (kernel,) = w.joined
    assert kernel.event.attrs["tapio.raw"] == b"\x00\xffbytes" and kernel.event.attrs["process.pid"] == 41
    assert kernel.event.resource == {"host.name": "n1"}
    status = {"event": "k8s.container.status", "attrs": {"k8s.pod.uid": "p", "k8s.container.status.reason": "OOMKilled"}}
    assert _feed(after, status, 101, now=5000.5) == []
    sent = [o for t in range(5001, 5200) for o in after.tick(float(t))]
    assert [(o.incident.rule.name, [j.member.name for j in o.incident.members]) for o in sent if isinstance(o, Emitted)] == [
        ("ContainerOOM", ["kernel_oom_kill", "container_oomkilled"])
    ], "one incident from the events of both runs; ProcessOOM is ruled out by the status"
    assert after.stats.get("ruled_out") == 1


def test_saved_windows_of_a_changed_or_removed_rule_are_dropped_and_bad_state_is_refused():
    from tapio.connectors.correlate import _state

    before = builtin_engine()
    _feed(before, {"event": "tapio.ebpf.oom", "attrs": {"k8s.pod.uid": "p"}}, 100, now=100.0)
    data = _state.dump(before, now=100.0)
    rules, _ = load_rules_file(None)
    changed = rules["ContainerOOM"].__class__(**{**rules["ContainerOOM"].__dict__, "join": ["container.id"]})
    after = Engine([compile_rule("ContainerOOM", changed)])
    assert _state.load(after, data, now=1.0) == (0, before.open_windows())
    assert after.open_windows() == 0
    for bad in (b"", b"\xff", b"[]", b'{"format": 99}'):
        with pytest.raises(ValueError):
            _state.load(builtin_engine(), bad, now=1.0)


JOIN_RULE = {
    "rules": {
        "Pair": {
            "join": ["k8s.pod.uid"], "window": "1m", "settle": "0s",
            "members": {"first": {"event": "test.first"}, "second": {"event": "test.second"}},
        }
    },
    "builtin_rules": False,
    "storage": "storage",
    "checkpoint_interval": "100ms",
}


async def test_with_storage_an_incident_begun_before_a_restart_is_completed_after_it(tmp_path):
    import time

    from tapio.storage import Storage

    with Storage.open(tmp_path / "tapio.db", synchronous="normal") as storage:
        sinks = []
        for step in ("test.first", "test.second"):  # one connector run each, the same storage file
            telemetry = Telemetry()
            s = Settings(
                id=ComponentID("correlate"), kind=Kind.CONNECTOR, telemetry=telemetry.for_component("connector", "correlate"),
                logger=logging.getLogger("tapio.test.correlate"), extensions={ComponentID("storage"): storage}, shutdown_grace=5.0,
            )
            send, recv = trio.open_memory_channel(4)
            sink = RecordingConsumer(ack=True)
            sinks.append(sink)
            connector = factory.create(s, decode_dataclass(CorrelateConfig, JOIN_RULE), Ports(input=recv, output=sink))
            with trio.fail_after(20):
                async with trio.open_nursery() as n:
                    await n.start(connector.run)
                    await send.send(Batch.of(Signal.LOGS, logs_request([{"time_ns": time.time_ns(), "event": step, "attrs": {"k8s.pod.uid": "p"}}])))
                    if step == "test.second":
                        await sink.wait_until(lambda: any(b.signal is Signal.TRACES for b in sink.batches))
                    await send.aclose()
            assert telemetry.value("tapio_correlate_state_saves_total", result="ok") >= 1
        first, second = sinks
    assert not [b for b in first.batches if b.signal is Signal.TRACES], "without its second member nothing is sent: it is saved"
    spans = [sp for b in second.batches if b.signal is Signal.TRACES for req in b.requests for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
    assert sorted(sp.name for sp in spans) == ["Pair", "first: test.first", "second: test.second"]
