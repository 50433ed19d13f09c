"""OTLP/HTTP logs in → batch → file out, against the protobuf floor, in one run.

Starts ``tapio run`` as a subprocess with an otlp (HTTP) receiver, the batch
processor and a file exporter, sends pre-serialized ExportLogsServiceRequests
(10 attributes per record) from this process over keep-alive connections,
waits until the file exporter counted them all, and divides the records by
the CPU time tapio's process used (user + system, from /proc). The floor is
bare ``ParseFromString`` + ``SerializeToString`` of the same requests in this
process. Prints one JSON line.

Usage: bench_otlp_passthrough.py [--requests N] [--records-per-request M] [--format proto|json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_request(n: int, seed: int) -> bytes:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    kv = rl.resource.attributes.add(key="service.name")
    kv.value.string_value = "bench"
    sl = rl.scope_logs.add()
    sl.scope.name = "bench"
    base = 1_700_000_000_000_000_000 + seed * n
    for i in range(n):
        r = sl.log_records.add(time_unix_nano=base + i, severity_number=9, severity_text="INFO")
        r.body.string_value = f"request {seed} record {i}: the quick brown fox jumps over the lazy dog"
        for k in range(10):
            a = r.attributes.add(key=f"attr.{k}")
            a.value.string_value = f"value-{k}-{i % 7}"
    return req.SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def scrape(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def floor_rate(payloads: list[bytes], records: int, repeats: int = 3) -> float:
    """Records per CPU second of bare parse + serialize: the best of ``repeats`` passes."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for p in payloads:
            ExportLogsServiceRequest.FromString(p).SerializeToString()
        best = min(best, time.process_time() - t0)
    return records / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=800)
    # 512: the OpenTelemetry SDKs' default export batch size
    ap.add_argument("--records-per-request", type=int, default=512)
    ap.add_argument("--format", choices=("proto", "json"), default="proto")
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()

    distinct = [make_request(args.records_per_request, s) for s in range(50)]
    payloads = [distinct[i % len(distinct)] for i in range(args.requests)]
    total = args.requests * args.records_per_request

    with tempfile.TemporaryDirectory() as tmp:
        http_port, metrics_port = free_port(), free_port()
        cfg = Path(tmp, "bench.yaml")
        cfg.write_text(f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{http_port}"}}
processors:
  batch: {{}}
exporters:
  file: {{path: "{tmp}/out.bin", format: {args.format}, rotation: {{max_megabytes: 0}}}}
service:
  pipelines:
    logs: {{receivers: [otlp], processors: [batch], exporters: [file]}}
  telemetry:
    logs: {{level: warn}}
    metrics: {{address: "127.0.0.1:{metrics_port}"}}
""")
        tapio = [str(ROOT / ".venv/bin/tapio"), "run", "-c", str(cfg)]
        proc = subprocess.Popen(tapio, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"tapio did not become ready: {proc.stderr.read().decode() if proc.poll() is not None else 'timeout'}")
                time.sleep(0.05)
            user0, sys0 = cpu_times(proc.pid)
            wall0 = time.monotonic()
            url = f"http://127.0.0.1:{http_port}/v1/logs"
            headers = {"content-type": "application/x-protobuf"}
            import concurrent.futures

            def sender(part: list[bytes]) -> None:
                with httpx.Client(timeout=30) as c:
                    for p in part:
                        r = c.post(url, content=p, headers=headers)
                        if r.status_code != 200:
                            raise SystemExit(f"tapio answered {r.status_code}: {r.text[:200]}")

            parts = [payloads[i :: args.connections] for i in range(args.connections)]
            with concurrent.futures.ThreadPoolExecutor(args.connections) as ex:
                list(ex.map(sender, parts))
            while scrape(metrics_port, "tapio_exporter_sent_log_records_total") < total:
                if time.monotonic() - wall0 > 300:
                    raise SystemExit("timed out waiting for the file exporter")
                time.sleep(0.02)
            wall = time.monotonic() - wall0
            user1, sys1 = cpu_times(proc.pid)
            user, system = user1 - user0, sys1 - sys0
            cpu = user + system
            rss_kb = int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("VmHWM")))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    floor = floor_rate(payloads, total)
    rate = total / cpu
    print(json.dumps({
        "bench": "otlp_http_logs_batch_file",
        "format": args.format,
        "records": total,
        "records_per_request": args.records_per_request,
        "tapio_cpu_s": round(cpu, 3),
        "tapio_user_s": round(user, 3),
        "tapio_system_s": round(system, 3),
        "wall_s": round(wall, 3),
        "tapio_records_per_cpu_s": round(rate),
        "floor_parse_serialize_records_per_cpu_s": round(floor),
        "ratio_vs_floor": round(rate / floor, 3),
        "goal_ratio": 0.5,
        "goal_records_per_cpu_s": 100_000,
        "tapio_peak_rss_mb": round(rss_kb / 1024, 1),
        "python": sys.version.split()[0],
    }))


if __name__ == "__main__":
    main()
