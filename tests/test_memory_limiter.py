"""The memory_limiter processor: limits, measurement, refusing above the soft limit, and a 10x overload of a real tapio.

Component tests hand the limiter a measurement function the test controls
and run under ``autojump_clock``, so check intervals take no real time. The
overload test runs ``tapio run`` as a subprocess, floods its OTLP/HTTP
receiver with far more than its pipeline can hold, and reads the process's
peak RSS (VmHWM) from /proc.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx
import pytest
import trio

from tapio.builtin import default_registry
from tapio.component import ComponentID, Kind, Ports, Refused, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Signal
from tapio.processors.memory_limiter import MIB, Limits, MemoryLimiter, MemoryLimiterConfig, cgroup_memory_limit, factory, read_rss
from tapio.telemetry import Telemetry
from tapio.testing.batches import log_batch
from tapio.testing.process import TapioProcess, free_port, metric_sum
from tapio.testing.sink import RecordingConsumer


# ---------------------------------------------------------------- config and limits


def test_default_config_validates_and_every_problem_is_reported():
    assert MemoryLimiterConfig().validate() == []
    cfg = MemoryLimiterConfig(check_interval=0, limit_mib=100, spike_limit_mib=100, limit_percentage=120)
    assert [p.split(":")[0] for p in cfg.validate()] == ["check_interval", "spike_limit_mib", "limit_percentage"]
    assert MemoryLimiterConfig(limit_percentage=0).validate() == ["limit_mib: set limit_mib or limit_percentage (both are 0)"]
    assert MemoryLimiterConfig(limit_percentage=50, spike_limit_percentage=50).validate()[0].startswith("spike_limit_percentage:")


def test_limits_from_mib_and_from_percentages():
    gib = 1024 * MIB
    assert Limits.of(MemoryLimiterConfig(limit_mib=500, spike_limit_mib=100), gib) == Limits(hard=500 * MIB, soft=400 * MIB)
    assert Limits.of(MemoryLimiterConfig(limit_mib=500), gib) == Limits(hard=500 * MIB, soft=400 * MIB)
    assert Limits.of(MemoryLimiterConfig(limit_percentage=50, spike_limit_percentage=10), 10 * gib) == Limits(hard=5 * gib, soft=4 * gib)
    default = Limits.of(MemoryLimiterConfig(), 10 * gib)
    assert default.hard == 8 * gib and default.soft == default.hard - default.hard // 5


@pytest.mark.parametrize(
    "config, key",
    [
        ({"limit_mib": 100, "spike_limit_mib": 100}, "spike_limit_mib"),
        ({"limit_mib": 100, "spike_limit_mib": 150}, "spike_limit_mib"),
        ({"limit_percentage": 50, "spike_limit_percentage": 50}, "spike_limit_percentage"),
        ({"limit_percentage": 50, "spike_limit_percentage": 70}, "spike_limit_percentage"),
    ],
)
def test_a_spike_limit_at_or_above_a_static_limit_is_a_config_problem(config, key):
    problems = MemoryLimiterConfig(**config).validate()
    assert len(problems) == 1 and problems[0].startswith(f"{key}: must be less than"), problems


@pytest.mark.parametrize("spike_mib", [512, 600])
def test_a_spike_limit_mib_at_or_above_the_percentage_limit_stops_the_start(spike_mib):
    cfg = MemoryLimiterConfig(limit_percentage=50, spike_limit_mib=spike_mib)
    assert cfg.validate() == []  # the hard limit is not known before start
    with pytest.raises(ValueError) as caught:
        make_limiter(Memory(0), Telemetry(), limit_mib=0, limit_percentage=50, spike_limit_mib=spike_mib)  # 1024 MiB available
    message = str(caught.value)
    assert f"spike_limit_mib {spike_mib}: {spike_mib} MiB" in message
    assert "limit_percentage 50% of 1024 MiB, the memory available: 512 MiB" in message
    assert "every batch would be refused" in message
    limiter, _, _ = make_limiter(Memory(0), Telemetry(), limit_mib=0, limit_percentage=50, spike_limit_mib=511)
    assert limiter.limits == Limits(hard=512 * MIB, soft=1 * MIB)


def test_a_percentage_limit_too_small_for_any_data_stops_the_start():
    with pytest.raises(ValueError, match=r"not below the hard limit \(limit_percentage 1% of 0 MiB"):
        Limits.of(MemoryLimiterConfig(limit_percentage=1), 50)  # 50 bytes available: a hard limit of 0


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_limits_v2_v1_and_unlimited(tmp_path):
    write(tmp_path / "v2" / "cgroup", "0::/kubepods/pod1/c1\n")
    write(tmp_path / "v2root" / "kubepods" / "pod1" / "c1" / "memory.max", "268435456\n")
    assert cgroup_memory_limit(str(tmp_path / "v2" / "cgroup"), str(tmp_path / "v2root")) == 256 * MIB
    write(tmp_path / "v2root" / "kubepods" / "pod1" / "c1" / "memory.max", "max\n")
    assert cgroup_memory_limit(str(tmp_path / "v2" / "cgroup"), str(tmp_path / "v2root")) is None
    write(tmp_path / "v1" / "cgroup", "12:pids:/x\n11:memory:/docker/abc\n0::/\n")
    write(tmp_path / "v1root" / "memory" / "docker" / "abc" / "memory.limit_in_bytes", str(512 * MIB))
    assert cgroup_memory_limit(str(tmp_path / "v1" / "cgroup"), str(tmp_path / "v1root")) == 512 * MIB
    write(tmp_path / "v1root" / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_limit(str(tmp_path / "v1" / "cgroup"), str(tmp_path / "v1root")) is None
    assert cgroup_memory_limit(str(tmp_path / "missing"), str(tmp_path)) is None


def test_rss_is_read_from_proc():
    status = Path("/proc/self/status").read_text()
    vm_rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    blob = bytearray(64 * MIB)  # touched: resident
    rss = read_rss()
    assert rss >= 64 * MIB and abs(rss - vm_rss - len(blob)) < 32 * MIB


# ---------------------------------------------------------------- the processor


class Memory:
    """A measurement the test sets."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.value


def make_limiter(memory: Memory, telemetry: Telemetry, **config):
    cfg = decode_dataclass(MemoryLimiterConfig, {"check_interval": "1s", "limit_mib": 100, "spike_limit_mib": 20, **config})
    send, recv = trio.open_memory_channel(16)
    sink = RecordingConsumer(ack=True)
    settings = Settings(
        id=ComponentID("memory_limiter"),
        kind=Kind.PROCESSOR,
        telemetry=telemetry.for_component("processor", "memory_limiter"),
        logger=logging.getLogger("test.memory_limiter"),
        shutdown_grace=1.0,
    )
    limiter = MemoryLimiter(settings, cfg, Ports(input=recv, output=sink), measure=memory, available=1024 * MIB)
    return limiter, send, sink


async def test_refuses_above_the_soft_limit_collects_above_the_hard_one_and_recovers(autojump_clock):
    memory, telemetry = Memory(50 * MIB), Telemetry()
    limiter, send, sink = make_limiter(memory, telemetry)
    outcomes: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        await send.send(log_batch(3))
        await sink.wait_for_count(3)

        memory.value = 90 * MIB  # above soft (80), below hard (100)
        await trio.sleep(1.01)
        assert limiter.refusing and limiter.rss == 90 * MIB
        refused = log_batch(5)
        refused.on_done.append(outcomes.append)
        with pytest.raises(Refused, match="above the soft limit"):
            limiter.admit(refused)
        dropped = log_batch(7)
        dropped.on_done.append(outcomes.append)
        await send.send(dropped)  # already queued when memory rose: dropped at the head, counted
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == [False, False]
        assert sink.item_count == 3
        assert telemetry.value("tapio_processor_refused_items_total", reason="memory_limit") == 5
        assert telemetry.value("tapio_processor_dropped_items_total", reason="memory_limit") == 7
        assert telemetry.value("tapio_processor_memory_limiter_gc_runs_total") == 0

        memory.value = 150 * MIB  # above hard: the collector runs too
        await trio.sleep(1)
        assert telemetry.value("tapio_processor_memory_limiter_gc_runs_total") == 1

        memory.value = 60 * MIB
        await trio.sleep(1)
        assert not limiter.refusing
        limiter.admit(log_batch())  # no exception
        await send.send(log_batch(2))
        await sink.wait_for_count(5)
        assert telemetry.value("tapio_processor_memory_limiter_rss_bytes") == 60 * MIB
        assert telemetry.value("tapio_processor_memory_limiter_limit_bytes", limit="soft") == 80 * MIB
        await send.aclose()  # end of input: the processor returns by itself


async def test_a_batch_in_hand_at_cancellation_is_flushed_or_reported(autojump_clock):
    telemetry = Telemetry()
    limiter, send, sink = make_limiter(Memory(10 * MIB), telemetry)
    outcomes: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        sink.pause()  # the next stage is full
        batch = log_batch(4)
        batch.on_done.append(outcomes.append)
        await send.send(batch)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # the shutdown grace passed with the next stage still full: dropped, counted, its source told
    assert outcomes == [False]
    assert telemetry.value("tapio_processor_dropped_items_total", reason="shutdown") == 4

    telemetry = Telemetry()
    limiter, send, sink = make_limiter(Memory(10 * MIB), telemetry)
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        sink.pause()
        await send.send(log_batch(2))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
        nursery.start_soon(_resume_soon, sink)
    # room came back within the grace: delivered, nothing dropped
    assert sink.item_count == 2
    assert telemetry.value("tapio_processor_dropped_items_total") == 0


async def _resume_soon(sink: RecordingConsumer) -> None:
    with trio.CancelScope(shield=True):
        await trio.sleep(0.5)
        sink.resume()


async def test_memory_is_checked_every_interval(autojump_clock):
    memory = Memory(10 * MIB)
    limiter, send, _ = make_limiter(memory, Telemetry(), check_interval="250ms")
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        start = memory.reads
        await trio.sleep(2.1)
        assert memory.reads - start == 8
        nursery.cancel_scope.cancel()


def test_registered_factory_shape():
    assert factory.type == "memory_limiter" and factory.kind is Kind.PROCESSOR
    assert factory.signals == frozenset(Signal)
    assert "MiB" in factory.summary(MemoryLimiterConfig(limit_mib=10)) or "%" in factory.summary(MemoryLimiterConfig())


# ---------------------------------------------------------------- 10x overload of a real tapio

#: the hard limit the overloaded tapio runs with, and what its peak RSS may exceed it by:
#: one check interval of growth plus allocator slack
LIMIT_MIB = 192
MARGIN_MIB = 48
POINTS_PER_REQUEST = 4000


def metrics_request_bytes(seed: int) -> bytes:
    req = Signal.METRICS.request_class()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="load.gauge")
    for i in range(POINTS_PER_REQUEST):
        p = m.gauge.data_points.add(time_unix_nano=seed * 1_000_000 + i, as_double=i * 0.5)
        p.attributes.add(key="series", value={"string_value": f"s-{seed}-{i}"})
        p.attributes.add(key="pod", value={"string_value": f"pod-{i % 97}"})
    return req.SerializeToString()


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def needs_registered(*types: tuple[Kind, str]) -> None:
    registry = default_registry()
    missing = [f"{kind.value} {name}" for kind, name in types if registry.get(kind, name) is None]
    assert not missing, f"not registered in tapio/builtin.py: {', '.join(missing)}"


def test_tapio_run_refuses_to_start_with_a_spike_limit_above_the_percentage_limit(tmp_path):
    needs_registered((Kind.PROCESSOR, "memory_limiter"), (Kind.EXPORTER, "debug"), (Kind.RECEIVER, "otlp"))
    http, metrics = free_port(), free_port()
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{http}"}}
processors:
  memory_limiter: {{limit_percentage: 50, spike_limit_mib: {1 << 40}}}   # more than any machine has
exporters:
  debug: {{}}
service:
  pipelines:
    logs: {{receivers: [otlp], processors: [memory_limiter], exporters: [debug]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    with TapioProcess([cfg], metrics_port=metrics) as tapio:
        assert tapio.wait_exit(timeout=60) != 0
        stderr = tapio.stderr
    assert "processor memory_limiter in pipeline logs failed to start" in stderr, stderr
    assert "is not below the hard limit (limit_percentage 50% of" in stderr and "every batch would be refused" in stderr, stderr


def test_rss_stays_bounded_under_ten_times_overload(tmp_path):
    needs_registered((Kind.PROCESSOR, "memory_limiter"), (Kind.EXPORTER, "prometheus"), (Kind.RECEIVER, "otlp"))
    http, metrics, prom = free_port(), free_port(), free_port()
    cfg = tmp_path / "pipelines.yaml"
    # The batch processor holds everything (a size it never reaches, a timeout it never hits): without
    # the limiter, memory would grow with every request.
    cfg.write_text(f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{http}"}}
processors:
  memory_limiter: {{check_interval: 50ms, limit_mib: {LIMIT_MIB}, spike_limit_mib: 48}}
  batch: {{send_batch_size: 100000000, timeout: 1h}}
exporters:
  prometheus: {{endpoint: "127.0.0.1:{prom}"}}
service:
  pipelines:
    metrics: {{receivers: [otlp], processors: [memory_limiter, batch], exporters: [prometheus]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    bodies = [metrics_request_bytes(i) for i in range(8)]
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    with TapioProcess([cfg], metrics_port=metrics) as tapio:
        tapio.wait_ready()
        baseline = peak_rss(tapio.proc.pid)
        soft_headroom = (LIMIT_MIB - 48) * MIB - baseline
        assert soft_headroom > 32 * MIB, f"tapio starts at {baseline // MIB} MiB, too close to the test's limit"
        # Ten times what fits between the baseline and the soft limit, counted in request bytes
        # (parsed protobuf takes more memory than its wire bytes, so this is more than 10x in memory).
        target_bytes = 10 * soft_headroom
        per_request = len(bodies[0])

        def client(worker: int) -> None:
            with httpx.Client(timeout=30, headers={"content-type": "application/x-protobuf"}) as c:
                sent = 0
                i = worker
                while sent < target_bytes / 4:
                    r = c.post(f"http://127.0.0.1:{http}/v1/metrics", content=bodies[i % len(bodies)])
                    with lock:
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    sent += per_request
                    i += 4

        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        peak = peak_rss(tapio.proc.pid)
        m = tapio.metrics()
    refused = metric_sum(m, "tapio_processor_refused_items_total", reason="memory_limit")
    dropped = metric_sum(m, "tapio_processor_dropped_items_total", reason="memory_limit")
    accepted = metric_sum(m, "tapio_receiver_accepted_metric_points_total")
    assert peak <= (LIMIT_MIB + MARGIN_MIB) * MIB, f"peak RSS {peak // MIB} MiB over {LIMIT_MIB}+{MARGIN_MIB} MiB; statuses {statuses}"
    assert refused + dropped > 0, statuses
    # Nothing vanished: what the receiver accepted is held by the batch processor or was refused/dropped and counted.
    assert accepted > 0 and refused + dropped > accepted / 2, (accepted, refused, dropped, statuses)
    print(f"overload: baseline {baseline // MIB} MiB, peak {peak // MIB} MiB, statuses {statuses}, "
          f"accepted {accepted:.0f}, refused {refused:.0f}, dropped {dropped:.0f}")
