"""Slow clients against a real ``tapio run``: they are cut, and everyone else keeps being served (issue 16).

Everything is real: the tapio process and its listeners, the official
OpenTelemetry SDK exporters (OTLP/HTTP and OTLP/gRPC) as the steady senders,
a file exporter as the sink that counts what arrived, /metrics for the cuts,
/proc for tapio's memory. The attackers are plain TCP sockets driven by trio
in a thread of the test process: each holds a connection open as long as
tapio lets it and reconnects as soon as it is cut, so the pressure never lets
up while the senders export.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import h2.config
import h2.connection
import httpx
import trio

from tapio.testing.process import TapioProcess, free_port, metric_sum
from tests.test_reload import bodies

SLOW_HEADS = 1000
TRICKLING_BODIES = 200
#: how long the flood lasts: past the receiver's default read_header_timeout (5 s) and read_body_timeout (10 s),
#: so both cuts happen to connections that were never shed
ATTACK_SECONDS = 13.0
#: tapio's RSS may grow by at most this much during the attack: ~1,700 connections reach it at once
#: (512 open at a time at ~50 KB each is ~25 MB, plus the sender's batches and allocator slack)
RSS_GROWTH_BOUND_KB = 96 * 1024
#: a sender's request is "answered within its normal time" when it takes less than this (the SDK's timeout)
EXPORT_TIMEOUT_SECONDS = 5.0


def raise_fd_limit(needed: int) -> None:
    """Raise RLIMIT_NOFILE of this process (inherited by tapio) to ``needed``, or fail saying why it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise AssertionError(f"the attack needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class Stats:
    connected: int = 0
    cut: int = 0
    refused: int = 0
    open_now: int = 0
    peak_open: int = 0


@dataclass
class Attack:
    """Attackers, each a coroutine that holds one connection until tapio closes it; run in a trio thread."""

    port: int
    kinds: dict[str, tuple[int, Callable[[trio.SocketStream], Awaitable[None]]]]
    stats: dict[str, Stats] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def __enter__(self) -> "Attack":
        self.stats = {kind: Stats() for kind in self.kinds}
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(20)
        assert not self._thread.is_alive(), "the attackers did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error

    def open_now(self) -> int:
        return sum(s.open_now for s in self.stats.values())

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported by __exit__
            self.error = exc

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            for kind, (count, hold) in self.kinds.items():
                for _ in range(count):
                    nursery.start_soon(self._attacker, self.stats[kind], hold)
            while not self._stop.is_set():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    async def _attacker(self, stats: Stats, hold: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                stats.refused += 1
                await trio.sleep(0.1)
                continue
            stats.connected += 1
            stats.open_now += 1
            stats.peak_open = max(stats.peak_open, stats.open_now)
            try:
                async with stream:
                    await hold(stream)
                    await until_closed(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                stats.open_now -= 1
            stats.cut += 1


async def until_closed(stream: trio.SocketStream) -> None:
    """Read (and drop) what tapio sends until it closes the connection."""
    while await stream.receive_some(4096):
        pass


PARTIAL_HEAD = b"POST /v1/logs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"


async def silent_head(stream: trio.SocketStream) -> None:
    """The report's attacker: part of a head, then nothing."""
    await stream.send_all(PARTIAL_HEAD)


async def nothing(stream: trio.SocketStream) -> None:
    """Connect and never send a byte."""


async def dribbled_head(stream: trio.SocketStream) -> None:
    """A head one byte every half second: it never completes within read_header_timeout."""
    for b in PARTIAL_HEAD:
        await stream.send_all(bytes([b]))  # fails (broken pipe, reset) once tapio has closed the connection
        await trio.sleep(0.5)


async def trickling_body(stream: trio.SocketStream) -> None:
    """A complete head announcing a 100 kB body, then the body three bytes every half second until tapio cuts it."""
    await stream.send_all(PARTIAL_HEAD + b"Content-Length: 100000\r\n\r\n")
    while True:
        with trio.move_on_after(0.5):
            if not await stream.receive_some(4096):  # closed (after its 408)
                return
        await stream.send_all(b"\x0a\x01x")


def h2_preface_and_settings() -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn.data_to_send()


async def h2_half_preface(stream: trio.SocketStream) -> None:
    """Half of the HTTP/2 connection preface, then nothing: the handshake never completes."""
    await stream.send_all(h2_preface_and_settings()[:12])


async def h2_unfinished_call(stream: trio.SocketStream) -> None:
    """A complete HTTP/2 handshake and the headers of an Export call whose message never comes."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (":method", "POST"), (":scheme", "http"), (":authority", "x"),
        (":path", "/opentelemetry.proto.collector.logs.v1.LogsService/Export"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ])
    conn.send_data(sid, b"\x00\x00\x00\x10\x00")  # a 16-byte message announced, 0 of it sent
    await stream.send_all(conn.data_to_send())


class SdkSender:
    """Exports numbered log records through the official OpenTelemetry SDK exporter, one request at a time."""

    def __init__(self, exporter, name: str) -> None:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        self._exporter = exporter
        self._success = LogRecordExportResult.SUCCESS
        self.name = name
        self.sent: list[str] = []
        self.failures: list[str] = []
        self.slowest = 0.0
        self._provider = LoggerProvider()
        self._logger = self._provider.get_logger("attack-test")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SdkSender":
        from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

        self._memory = InMemoryLogRecordExporter()
        self._provider.add_log_record_processor(SimpleLogRecordProcessor(self._memory))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._exporter.shutdown()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            bodies = [f"{self.name}-{i}-{j}" for j in range(5)]
            for body in bodies:
                self._logger.emit(body=body)
            batch = list(self._memory.get_finished_logs())
            self._memory.clear()
            started = time.monotonic()
            result = self._exporter.export(batch)
            took = time.monotonic() - started
            self.slowest = max(self.slowest, took)
            if result is self._success:
                self.sent.extend(bodies)
            else:
                self.failures.append(f"request {i}: {result} after {took:.1f}s")
            i += 1
            time.sleep(0.05)


def bad_inputs(t: TapioProcess) -> dict[str, float]:
    return {k: v for k, v in t.metrics().items() if k.startswith("tapio_bad_input_total")}


def bad_input(t: TapioProcess, reason: str, **labels: str) -> float:
    return metric_sum(t.metrics(), "tapio_bad_input_total", reason=reason, **labels)


def test_slow_heads_and_trickling_bodies_are_cut_while_sdk_senders_over_http_and_grpc_lose_nothing(tmp_path):
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter

    grpc_attackers = 300
    raise_fd_limit(4 * (SLOW_HEADS + TRICKLING_BODIES + grpc_attackers) + 1024)
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    out = tmp_path / "logs.jsonl"
    cfg = tmp_path / "pipelines.yaml"
    # grpcio has no per-call receive deadline: a call whose message never completes holds its connection until
    # max_connection_age (+ grace) closes it, so the test sets one (see "Slow and idle clients" in the docs)
    cfg.write_text(f"""
receivers:
  otlp:
    acknowledge: delivered
    protocols:
      http: {{endpoint: "127.0.0.1:{http}"}}
      grpc: {{endpoint: "127.0.0.1:{grpc_port}", max_connection_idle: 3s, max_connection_age: 4s, max_connection_age_grace: 2s}}
processors:
  batch: {{timeout: 50ms}}
exporters:
  file: {{path: "{out}", flush_interval: 0s}}
service:
  pipelines:
    logs: {{receivers: [otlp], processors: [batch], exporters: [file]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        assert t.proc is not None
        baseline = rss_kb(t.proc.pid)
        http_sender = SdkSender(HttpLogExporter(endpoint=f"http://127.0.0.1:{http}/v1/logs", timeout=EXPORT_TIMEOUT_SECONDS), "http")
        grpc_sender = SdkSender(GrpcLogExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, timeout=EXPORT_TIMEOUT_SECONDS), "grpc")
        http_attack = Attack(http, {
            "silent_head": (SLOW_HEADS // 2, silent_head),
            "nothing": (SLOW_HEADS // 4, nothing),
            "dribbled_head": (SLOW_HEADS // 4, dribbled_head),
            "trickling_body": (TRICKLING_BODIES, trickling_body),
        })
        grpc_attack = Attack(grpc_port, {
            "nothing": (grpc_attackers // 3, nothing),
            "half_preface": (grpc_attackers // 3, h2_half_preface),
            "unfinished_call": (grpc_attackers // 3, h2_unfinished_call),
        })
        peak = baseline
        with http_attack, grpc_attack, http_sender, grpc_sender:
            # every attacker got in at least once (the flood is really there) ...
            t.wait_for(lambda: all(s.connected >= n for (n, _), s in zip(http_attack.kinds.values(), http_attack.stats.values())),
                       20, "every HTTP attacker to connect")
            t.wait_for(lambda: all(s.connected >= n for (n, _), s in zip(grpc_attack.kinds.values(), grpc_attack.stats.values())),
                       20, "every gRPC attacker to connect")
            deadline = time.monotonic() + ATTACK_SECONDS
            while time.monotonic() < deadline:
                peak = max(peak, rss_kb(t.proc.pid))
                time.sleep(0.1)
            # ... and was cut: the trickling bodies by the body deadline, the others by time or to make room
            t.wait_for(lambda: bad_input(t, "http_timeout", receiver="otlp") >= TRICKLING_BODIES, 20,
                       f"the trickling bodies to be counted as timeouts ({bad_inputs(t)}, {http_attack.stats})")
            sent_under_attack = (len(http_sender.sent), len(grpc_sender.sent))
        for kind, s in http_attack.stats.items():
            assert s.cut >= http_attack.kinds[kind][0], f"HTTP {kind}: only {s.cut} of {s.connected} connections cut"
        for kind, s in grpc_attack.stats.items():
            assert s.cut >= grpc_attack.kinds[kind][0], f"gRPC {kind}: only {s.cut} of {s.connected} connections cut"
        m = t.metrics()
        timeouts = metric_sum(m, "tapio_bad_input_total", reason="http_timeout", receiver="otlp")
        shed = metric_sum(m, "tapio_bad_input_total", reason="http_shed", receiver="otlp")
        cut_by_tapio = sum(s.cut for s in http_attack.stats.values())
        assert shed > 0, "the flood passed max_connections, yet nothing was shed"
        assert timeouts + shed >= 0.9 * cut_by_tapio, (timeouts, shed, cut_by_tapio)

        # every request either sender made was answered with success, within its normal time, and is in the file
        for sender in (http_sender, grpc_sender):
            assert not sender.failures, f"{sender.name}: {len(sender.failures)} failed exports, e.g. {sender.failures[:3]}"
            assert sender.slowest < EXPORT_TIMEOUT_SECONDS
        assert min(sent_under_attack) >= 50, f"the senders hardly sent under attack: {sent_under_attack}"
        expected = set(http_sender.sent) | set(grpc_sender.sent)
        t.wait_for(lambda: expected <= bodies(out), 20, "every acknowledged record in the file")
        print(f"senders {sent_under_attack} records under attack, slowest export {max(http_sender.slowest, grpc_sender.slowest):.2f}s; "
              f"RSS {baseline} -> {peak} kB; http_timeout {timeouts:g}, http_shed {shed:g}; "
              f"http {http_attack.stats}; grpc {grpc_attack.stats}")
        assert peak - baseline < RSS_GROWTH_BOUND_KB, f"RSS grew from {baseline} kB to {peak} kB under attack"


def test_scrapes_of_the_prometheus_exporter_and_self_telemetry_keep_answering_under_a_slow_head_flood(tmp_path):
    raise_fd_limit(4 * 2 * SLOW_HEADS + 1024)
    prom, metrics = free_port(), free_port()
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{free_port()}"}}
exporters:
  prometheus: {{endpoint: "127.0.0.1:{prom}"}}
service:
  pipelines:
    metrics: {{receivers: [otlp], exporters: [prometheus]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        assert t.proc is not None
        baseline = rss_kb(t.proc.pid)
        peak = baseline
        head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"

        async def slow_get(stream: trio.SocketStream) -> None:
            await stream.send_all(head)

        floods = [Attack(port, {"silent_head": (SLOW_HEADS // 2, slow_get), "nothing": (SLOW_HEADS // 2, nothing)})
                  for port in (prom, metrics)]
        scrapes = {prom: 0, metrics: 0}
        slowest = 0.0
        with floods[0], floods[1], httpx.Client(timeout=EXPORT_TIMEOUT_SECONDS) as client:
            t.wait_for(lambda: all(s.connected >= SLOW_HEADS // 2 for f in floods for s in f.stats.values()), 20,
                       "every attacker to connect")
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline:
                for port in scrapes:
                    started = time.monotonic()
                    r = client.get(f"http://127.0.0.1:{port}/metrics")
                    slowest = max(slowest, time.monotonic() - started)
                    assert r.status_code == 200, (port, r.status_code, r.text)
                    scrapes[port] += 1
                peak = max(peak, rss_kb(t.proc.pid))
                time.sleep(0.1)
        print(f"scrapes {scrapes}, slowest {slowest:.2f}s, RSS {baseline} -> {peak} kB")
        assert min(scrapes.values()) >= 20, scrapes
        assert slowest < EXPORT_TIMEOUT_SECONDS
        m = t.metrics()
        for labels in ({"exporter": "prometheus"}, {"listener": "self-telemetry"}):
            shed = metric_sum(m, "tapio_bad_input_total", reason="http_shed", **labels)
            assert shed > 0, f"{labels}: the flood passed the listener's max_connections, yet nothing was shed"
        assert peak - baseline < RSS_GROWTH_BOUND_KB, f"RSS grew from {baseline} kB to {peak} kB under attack"
