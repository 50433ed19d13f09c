"""correlate: events per second through the connector's reader and engine, with 10k join keys, and its memory after 1M events.

The stream is a node's mix over 10,000 pods (each a join key): kernel
exec/open events no rule looks at, TCP and exit events some rules read,
container status changes, DNS answers, and now and then a real incident
(an OOM kill with its OOMKilled status, a crash loop). It arrives as OTLP
log requests of 100 records, parsed before the clock starts, as the
connector gets them.

The peer, measured in the same run on the same requests: parsing the
serialized requests (``FromString``) and reading every record's event
name, the least any consumer of these records pays. The connector's
figure is events/s through `_records.events` + `Engine.feed` (with the
stamping of member records) and the once-a-second `tick`; the goal is
>= 100,000 events/s. Memory: the engine's retained size (tracemalloc)
after 1,000,000 events, which must stay bounded by ``max_keys``.

Usage: bench_correlate.py [--events N] [--pods N]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest  # noqa: E402

from tapio.connectors.correlate._config import load_rules_file  # noqa: E402
from tapio.connectors.correlate._engine import Engine, compile_rule  # noqa: E402
from tapio.connectors.correlate._records import events  # noqa: E402
from tapio.testing.events import logs_request  # noqa: E402

S = 1_000_000_000


def make_stream(n: int, pods: int, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    t0 = time.time_ns()
    for i in range(n):
        pod = f"pod-{rnd.randrange(pods):05d}"
        t = t0 + i * 10_000  # 100k events per second of event time
        res = {"host.name": "node-1"}
        r = rnd.random()
        if r < 0.40:
            e = {"event": rnd.choice(("tapio.ebpf.exec", "tapio.ebpf.open")), "scope": "tapio.ebpf", "attrs": {"k8s.pod.uid": pod, "process.pid": i % 30000, "tapio.ebpf.comm": "sh", "file.path": "/etc/hosts"}}
        elif r < 0.60:
            e = {"event": "tapio.ebpf.tcp", "scope": "tapio.ebpf", "attrs": {"k8s.pod.uid": pod, "network.peer.port": 443, "tapio.ebpf.tcp.old_state": "SYN_SENT", "tapio.ebpf.tcp.new_state": "ESTABLISHED"}}
        elif r < 0.80:
            e = {"event": "tapio.ebpf.exit", "scope": "tapio.ebpf", "attrs": {"k8s.pod.uid": pod, "process.pid": i % 30000, "process.exit.code": 0}}
        elif r < 0.90:
            e = {"event": "k8s.container.status", "scope": "tapio.kubeapi", "attrs": {"k8s.pod.uid": pod, "k8s.container.status.state": "running", "k8s.container.restart_count": 0}}
        elif r < 0.995:
            e = {"event": "tapio.dns_xdp.answered", "scope": "tapio.dns_xdp", "attrs": {"client.address": f"10.244.{rnd.randrange(40)}.{rnd.randrange(250)}", "dns.response_code": "NOERROR", "dns.question.name": "api.shop.svc.cluster.local"}}
        elif r < 0.9975:
            e = {"event": "tapio.ebpf.oom", "scope": "tapio.ebpf", "attrs": {"k8s.pod.uid": pod, "process.pid": 1, "tapio.ebpf.comm": "java"}}
            out.append({**e, "time_ns": t, "resource": res})
            e = {"event": "k8s.container.status", "scope": "tapio.kubeapi", "attrs": {"k8s.pod.uid": pod, "k8s.container.status.reason": "OOMKilled"}}
        else:
            e = {"event": "k8s.container.status", "scope": "tapio.kubeapi", "attrs": {"k8s.pod.uid": pod, "k8s.container.status.state": "waiting", "k8s.container.status.reason": "CrashLoopBackOff"}}
        out.append({**e, "time_ns": t, "resource": res})
    return out


def requests_of(stream: list[dict], per: int = 100) -> list[bytes]:
    return [logs_request(stream[i : i + per]).SerializeToString() for i in range(0, len(stream), per)]


def builtin_engine(max_keys: int = 10000) -> Engine:
    rules, problems = load_rules_file(None)
    assert not problems, problems
    return Engine([compile_rule(n, r) for n, r in rules.items()], max_keys=max_keys)


def run_engine(engine: Engine, requests: list[ExportLogsServiceRequest], start: float) -> tuple[int, float, int]:
    """Feed every request, ticking once per 100k events (a second of event time); returns (events, cpu seconds, incidents)."""
    fed = 0
    incidents = 0
    now = start
    c0 = time.process_time()
    for i, request in enumerate(requests):
        for event in events(request, engine.candidates):
            out, stamps = engine.feed(event, now)
            incidents += len(out)
            for trace_id, joined in stamps:
                record = joined.event.record
                if record is not None and not record.trace_id:
                    record.trace_id, record.span_id = trace_id, joined.span_id
            event.record = None
        fed += 100
        if i % 1000 == 999:
            now += 1.0
            incidents += len(engine.tick(now))
    incidents += len(engine.tick(now + 700))  # every window over: what was complete is sent
    return fed, time.process_time() - c0, incidents


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--memory-events", type=int, default=1_000_000)
    args = ap.parse_args()

    stream = make_stream(args.events, args.pods)
    raw = requests_of(stream)
    count = len(stream)

    # the peer: parse and read every event name
    c0 = time.process_time()
    names = 0
    for data in raw:
        req = ExportLogsServiceRequest.FromString(data)
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    names += len(lr.event_name) > 0
    peer_cpu = time.process_time() - c0

    parsed = [ExportLogsServiceRequest.FromString(d) for d in raw]
    engine = builtin_engine()
    fed, cpu, incidents = run_engine(engine, parsed, 1000.0)
    eps = count / cpu

    # memory: 1M events through a fresh engine, its retained size at the end
    del parsed
    mem_stream = make_stream(args.memory_events, args.pods, seed=11)
    mem_raw = requests_of(mem_stream)
    del mem_stream
    gc.collect()
    engine2 = builtin_engine()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(0, len(mem_raw), 1000):
        chunk = [ExportLogsServiceRequest.FromString(d) for d in mem_raw[i : i + 1000]]
        run_engine(engine2, chunk, 1000.0 + i)
        del chunk
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    print(
        json.dumps(
            {
                "bench": "correlate",
                "events": count,
                "join_keys": args.pods,
                "rules": len(engine.rules),
                "incidents_sent": incidents,
                "correlate_events_per_cpu_second": round(eps),
                "correlate_us_per_event": round(cpu / count * 1e6, 2),
                "peer_parse_and_read_events_per_cpu_second": round(count / peer_cpu),
                "ratio_vs_parse": round(peer_cpu / cpu, 3),
                "goal_events_per_second": 100_000,
                "memory_events": args.memory_events,
                "open_windows_after": engine2.open_windows(),
                "retained_mib_after": round(retained / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
