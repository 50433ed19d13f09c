"""Export throughput: tapio's otlp/otlphttp exporters vs the OpenTelemetry Python SDK's, to one local sink.

Run: ``.venv/bin/python bench/bench_otlp_export.py [--records N] [--sdk-records M]``.
Prints one JSON line.

The sink (tapio.testing.otlpsink, counting only) runs in a child process so
it does not share this process's core. For each transport (gRPC, HTTP) and
gzip on/off it measures, in this same run:

- ``tapio``: the exporter component fed pre-built batches of 512 records
  (the SDK's default batch) and of 8192 (tapio's batch processor default),
  from the first batch until the exporter returned with everything sent;
- ``sdk``: the SDK pipeline, ``logger.emit`` → BatchLogRecordProcessor →
  OTLPLogExporter, until ``force_flush`` returned;
- ``sdk_export_only``: OTLPLogExporter.export called directly on pre-built
  SDK records in chunks of 512 (encoding and sending only).

Every record carries a body and 10 attributes. ``records_per_cpu_s`` is
records divided by this process's CPU time (user+system, all threads):
records per second per core. Every run checks the sink counted all records.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapio.component import ComponentID, Kind, Ports, Settings  # noqa: E402
from tapio.config import decode_dataclass  # noqa: E402
from tapio.exporters.otlp import grpc_factory, http_factory  # noqa: E402
from tapio.pdata import Batch, Signal  # noqa: E402
from tapio.telemetry import Telemetry  # noqa: E402

ATTRS = 10

SINK = textwrap.dedent(
    """
    import sys, trio
    from tapio.testing.otlpsink import open_otlp_sink
    from tapio.pdata import Signal

    async def main():
        async with open_otlp_sink(keep_requests=False) as sink:
            print(sink.grpc_port, sink.http_port, flush=True)
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    return
                print(sink.items(Signal.LOGS), flush=True)

    trio.run(main)
    """
)


class SinkProcess:
    def __enter__(self) -> "SinkProcess":
        self.proc = subprocess.Popen([sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        self.grpc_port, self.http_port = map(int, self.proc.stdout.readline().split())
        return self

    def count(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def make_request(first: int, n: int):
    req = Signal.LOGS.request_class()
    rl = req.resource_logs.add()
    rl.resource.attributes.add(key="service.name", value={"string_value": "bench"})
    sl = rl.scope_logs.add()
    sl.scope.name = "bench"
    for i in range(first, first + n):
        rec = sl.log_records.add(time_unix_nano=1_700_000_000_000_000_000 + i, severity_number=9, body={"string_value": f"event number {i} happened"})
        for a in range(ATTRS):
            rec.attributes.add(key=f"attribute.{a}", value={"string_value": f"value-{a}-{i % 100}"})
    return req


def cpu() -> float:
    return time.process_time()


async def run_tapio(transport: str, gzip: bool, sink: SinkProcess, records: int, batch: int) -> dict:
    factory = grpc_factory if transport == "grpc" else http_factory
    endpoint = {"endpoint": f"127.0.0.1:{sink.grpc_port}", "tls": {"insecure": True}} if transport == "grpc" else {"endpoint": f"http://127.0.0.1:{sink.http_port}"}
    cfg = decode_dataclass(factory.config_class, {**endpoint, "compression": "gzip" if gzip else "none"})
    telemetry = Telemetry()
    settings = Settings(id=ComponentID(factory.type), kind=Kind.EXPORTER, telemetry=telemetry.for_component("exporter", factory.type), logger=logging.getLogger("bench"))
    batches = [Batch.of(Signal.LOGS, make_request(i, batch)) for i in range(0, records, batch)]
    send, recv = trio.open_memory_channel[Batch](16)
    exporter = factory.create(settings, cfg, Ports(input=recv))
    before = sink.count()
    t0, c0 = time.perf_counter(), cpu()
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        async with send:
            for b in batches:
                await send.send(b)
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    n = len(batches) * batch
    arrived = sink.count() - before
    assert arrived == n, f"tapio {transport}: the sink counted {arrived} of {n}"
    assert telemetry.value("tapio_exporter_sent_log_records_total") == n
    return {"records": n, "batch": batch, "records_per_s": round(n / wall), "records_per_cpu_s": round(n / cpu_s)}


def sdk_exporter(transport: str, gzip: bool, sink: SinkProcess):
    if transport == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        return OTLPLogExporter(endpoint=f"127.0.0.1:{sink.grpc_port}", insecure=True, compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression)
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    return OTLPLogExporter(endpoint=f"http://127.0.0.1:{sink.http_port}/v1/logs", compression=Compression.Gzip if gzip else Compression.NoCompression)


def emit_all(logger, records: int) -> None:
    from opentelemetry._logs import SeverityNumber

    for i in range(records):
        logger.emit(
            timestamp=1_700_000_000_000_000_000 + i,
            severity_number=SeverityNumber.INFO,
            body=f"event number {i} happened",
            attributes={f"attribute.{a}": f"value-{a}-{i % 100}" for a in range(ATTRS)},
        )


def run_sdk(transport: str, gzip: bool, sink: SinkProcess, records: int) -> dict:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    provider = LoggerProvider(resource=Resource.create({"service.name": "bench"}))
    # a queue large enough that the SDK drops nothing: we compare throughput, not loss
    provider.add_log_record_processor(BatchLogRecordProcessor(sdk_exporter(transport, gzip, sink), max_queue_size=records + 1))
    logger = provider.get_logger("bench")
    before = sink.count()
    t0, c0 = time.perf_counter(), cpu()
    emit_all(logger, records)
    provider.force_flush(timeout_millis=600_000)
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    provider.shutdown()
    arrived = sink.count() - before
    assert arrived == records, f"sdk {transport}: the sink counted {arrived} of {records}"
    return {"records": records, "records_per_s": round(records / wall), "records_per_cpu_s": round(records / cpu_s)}


def run_sdk_export_only(transport: str, gzip: bool, sink: SinkProcess, records: int) -> dict:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    emit_all(provider.get_logger("bench"), records)
    logs = list(memory.get_finished_logs())
    exporter = sdk_exporter(transport, gzip, sink)
    before = sink.count()
    t0, c0 = time.perf_counter(), cpu()
    for i in range(0, len(logs), 512):
        exporter.export(logs[i : i + 512])
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    exporter.shutdown()
    provider.shutdown()
    arrived = sink.count() - before
    assert arrived == records, f"sdk export-only {transport}: the sink counted {arrived} of {records}"
    return {"records": records, "records_per_s": round(records / wall), "records_per_cpu_s": round(records / cpu_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000, help="records per tapio run")
    ap.add_argument("--sdk-records", type=int, default=40_000, help="records per SDK run")
    args = ap.parse_args()
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    results: dict = {"bench": "otlp_export", "python": sys.version.split()[0], "attributes_per_record": ATTRS, "runs": {}}
    with SinkProcess() as sink:
        for transport in ("grpc", "http"):
            for gzip in (True, False):
                key = f"{transport}_{'gzip' if gzip else 'none'}"
                tapio_512 = trio.run(run_tapio, transport, gzip, sink, args.records, 512)
                tapio_8192 = trio.run(run_tapio, transport, gzip, sink, args.records, 8192)
                sdk = run_sdk(transport, gzip, sink, args.sdk_records)
                sdk_only = run_sdk_export_only(transport, gzip, sink, args.sdk_records)
                results["runs"][key] = {
                    "tapio_batch512": tapio_512,
                    "tapio_batch8192": tapio_8192,
                    "sdk": sdk,
                    "sdk_export_only": sdk_only,
                    "speedup_per_core_vs_sdk": round(tapio_512["records_per_cpu_s"] / sdk["records_per_cpu_s"], 1),
                    "speedup_per_core_vs_sdk_export_only": round(tapio_512["records_per_cpu_s"] / sdk_only["records_per_cpu_s"], 1),
                }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
