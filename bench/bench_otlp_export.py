"""Export throughput: tapio's otlp/otlphttp exporters vs the OpenTelemetry Python SDK's, to one local sink.

Run: ``.venv/bin/python bench/bench_otlp_export.py [--records N] [--sdk-records M]``.
Prints one JSON line.

The sink (tapio.testing.otlpsink, counting only) runs in a child process so
it does not share this process's core. For each signal (logs, traces), each
transport (gRPC, HTTP) and gzip on/off it measures, in this same run and by
default on the same number of records on both sides:

- ``tapio``: the exporter component fed pre-built batches of 512 records
  (the SDK's default batch) and of 8192 (tapio's batch processor default),
  from the first batch until the exporter returned with everything sent;
- ``sdk``: the SDK's whole path, ``logger.emit`` → BatchLogRecordProcessor →
  OTLPLogExporter for logs, ``tracer.start_span``/``span.end`` →
  BatchSpanProcessor → OTLPSpanExporter for traces, until ``force_flush``
  returned;
- ``sdk_export_only``: the SDK's OTLP exporter alone (OTLPLogExporter or
  OTLPSpanExporter ``.export``) on pre-built SDK records in chunks of 512:
  encoding and sending only, no emit and no processor.

Every log record carries a body and 10 attributes; every span a name, start
and end times and 10 attributes. ``records_per_cpu_s`` is records (log
records or spans) divided by this process's CPU time (user+system, all
threads): records per second per core. Every run checks the sink counted all
records.
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
                print(sink.items(Signal[line.strip()]), flush=True)

    trio.run(main)
    """
)


class SinkProcess:
    def __enter__(self) -> "SinkProcess":
        self.proc = subprocess.Popen([sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        self.grpc_port, self.http_port = map(int, self.proc.stdout.readline().split())
        return self

    def count(self, signal: Signal) -> int:
        """Items of ``signal`` the sink has counted so far."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{signal.name}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


#: a data point time, in ns; every record's timestamps derive from it
T0 = 1_700_000_000_000_000_000
#: records per batch and per SDK export call in the export-only runs (the SDK's default batch)
SDK_BATCH = 512
SIGNALS = {"logs": Signal.LOGS, "traces": Signal.TRACES}


def _attrs(i: int) -> dict[str, str]:
    return {f"attribute.{a}": f"value-{a}-{i % 100}" for a in range(ATTRS)}


def make_request(signal: Signal, first: int, n: int):
    """An export request of ``n`` log records or spans, numbered from ``first``, as the SDK's would carry them."""
    req = signal.request_class()
    if signal is Signal.LOGS:
        rl = req.resource_logs.add()
        rl.resource.attributes.add(key="service.name", value={"string_value": "bench"})
        sl = rl.scope_logs.add()
        sl.scope.name = "bench"
        for i in range(first, first + n):
            rec = sl.log_records.add(time_unix_nano=T0 + i, severity_number=9, body={"string_value": f"event number {i} happened"})
            for k, v in _attrs(i).items():
                rec.attributes.add(key=k, value={"string_value": v})
        return req
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value={"string_value": "bench"})
    ss = rs.scope_spans.add()
    ss.scope.name = "bench"
    for i in range(first, first + n):
        span = ss.spans.add(
            trace_id=(i + 1).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), name=f"operation {i % 100}",
            kind=1, start_time_unix_nano=T0 + i, end_time_unix_nano=T0 + i + 1000,  # kind 1: INTERNAL, the SDK's default
        )
        for k, v in _attrs(i).items():
            span.attributes.add(key=k, value={"string_value": v})
    return req


def cpu() -> float:
    return time.process_time()


def rates(n: int, wall: float, cpu_s: float, **extra) -> dict:
    return {"records": n, **extra, "records_per_s": round(n / wall), "records_per_cpu_s": round(n / cpu_s)}


async def run_tapio(signal: Signal, transport: str, gzip: bool, sink: SinkProcess, records: int, batch: int) -> dict:
    factory = grpc_factory if transport == "grpc" else http_factory
    endpoint = {"endpoint": f"127.0.0.1:{sink.grpc_port}", "tls": {"insecure": True}} if transport == "grpc" else {"endpoint": f"http://127.0.0.1:{sink.http_port}"}
    cfg = decode_dataclass(factory.config_class, {**endpoint, "compression": "gzip" if gzip else "none"})
    telemetry = Telemetry()
    settings = Settings(id=ComponentID(factory.type), kind=Kind.EXPORTER, telemetry=telemetry.for_component("exporter", factory.type), logger=logging.getLogger("bench"))
    batches = [Batch.of(signal, make_request(signal, i, min(batch, records - i))) for i in range(0, records, batch)]
    send, recv = trio.open_memory_channel[Batch](16)
    exporter = factory.create(settings, cfg, Ports(input=recv))
    before = sink.count(signal)
    t0, c0 = time.perf_counter(), cpu()
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        async with send:
            for b in batches:
                await send.send(b)
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    arrived = sink.count(signal) - before
    assert arrived == records, f"tapio {signal.name} {transport}: the sink counted {arrived} of {records}"
    assert telemetry.value(f"tapio_exporter_sent_{signal.item_name}_total") == records
    return rates(records, wall, cpu_s, batch=batch)


def sdk_exporter(signal: Signal, transport: str, gzip: bool, sink: SinkProcess):
    if transport == "grpc":
        import grpc

        if signal is Signal.LOGS:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as Exporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Exporter
        return Exporter(endpoint=f"127.0.0.1:{sink.grpc_port}", insecure=True, compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression)
    from opentelemetry.exporter.otlp.proto.http import Compression

    if signal is Signal.LOGS:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as Exporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Exporter
    path = "logs" if signal is Signal.LOGS else "traces"
    return Exporter(endpoint=f"http://127.0.0.1:{sink.http_port}/v1/{path}", compression=Compression.Gzip if gzip else Compression.NoCompression)


def emit_all(signal: Signal, provider, records: int) -> None:
    """What an instrumented program does: emit ``records`` log records, or start and end as many spans."""
    if signal is Signal.LOGS:
        from opentelemetry._logs import SeverityNumber

        logger = provider.get_logger("bench")
        for i in range(records):
            logger.emit(timestamp=T0 + i, severity_number=SeverityNumber.INFO, body=f"event number {i} happened", attributes=_attrs(i))
        return
    tracer = provider.get_tracer("bench")
    for i in range(records):
        span = tracer.start_span(f"operation {i % 100}", start_time=T0 + i, attributes=_attrs(i))
        span.end(end_time=T0 + i + 1000)


def sdk_provider(signal: Signal, processor):
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": "bench"})
    if signal is Signal.LOGS:
        from opentelemetry.sdk._logs import LoggerProvider

        provider = LoggerProvider(resource=resource)
        provider.add_log_record_processor(processor)
    else:
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(processor)
    return provider


def run_sdk(signal: Signal, transport: str, gzip: bool, sink: SinkProcess, records: int) -> dict:
    if signal is Signal.LOGS:
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor as BatchProcessor
    else:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor as BatchProcessor
    # a queue large enough that the SDK drops nothing: we compare throughput, not loss
    provider = sdk_provider(signal, BatchProcessor(sdk_exporter(signal, transport, gzip, sink), max_queue_size=records + 1))
    before = sink.count(signal)
    t0, c0 = time.perf_counter(), cpu()
    emit_all(signal, provider, records)
    provider.force_flush(timeout_millis=600_000)
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    provider.shutdown()
    arrived = sink.count(signal) - before
    assert arrived == records, f"sdk {signal.name} {transport}: the sink counted {arrived} of {records}"
    return rates(records, wall, cpu_s)


def run_sdk_export_only(signal: Signal, transport: str, gzip: bool, sink: SinkProcess, records: int) -> dict:
    if signal is Signal.LOGS:
        from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter as Memory, SimpleLogRecordProcessor as Simple
    else:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor as Simple
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter as Memory

    memory = Memory()
    provider = sdk_provider(signal, Simple(memory))
    emit_all(signal, provider, records)
    finished = list(memory.get_finished_logs() if signal is Signal.LOGS else memory.get_finished_spans())
    exporter = sdk_exporter(signal, transport, gzip, sink)
    before = sink.count(signal)
    t0, c0 = time.perf_counter(), cpu()
    for i in range(0, len(finished), SDK_BATCH):
        exporter.export(finished[i : i + SDK_BATCH])
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    exporter.shutdown()
    provider.shutdown()
    arrived = sink.count(signal) - before
    assert arrived == records, f"sdk export-only {signal.name} {transport}: the sink counted {arrived} of {records}"
    return rates(records, wall, cpu_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=40_000, help="records (log records or spans) per tapio run")
    ap.add_argument("--sdk-records", type=int, default=None, help="records per SDK run (default: --records)")
    args = ap.parse_args()
    sdk_records = args.sdk_records or args.records
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    results: dict = {"bench": "otlp_export", "python": sys.version.split()[0], "attributes_per_record": ATTRS, "runs": {}}
    speedups: dict[str, list[float]] = {}
    with SinkProcess() as sink:
        for name, signal in SIGNALS.items():
            for transport in ("grpc", "http"):
                for gzip in (True, False):
                    key = f"{name}_{transport}_{'gzip' if gzip else 'none'}"
                    tapio_512 = trio.run(run_tapio, signal, transport, gzip, sink, args.records, SDK_BATCH)
                    tapio_8192 = trio.run(run_tapio, signal, transport, gzip, sink, args.records, 8192)
                    sdk = run_sdk(signal, transport, gzip, sink, sdk_records)
                    sdk_only = run_sdk_export_only(signal, transport, gzip, sink, sdk_records)
                    vs_sdk = round(tapio_512["records_per_cpu_s"] / sdk["records_per_cpu_s"], 1)
                    results["runs"][key] = {
                        "tapio_batch512": tapio_512,
                        "tapio_batch8192": tapio_8192,
                        "sdk": sdk,
                        "sdk_export_only": sdk_only,
                        "speedup_per_core_vs_sdk": vs_sdk,
                        "speedup_per_core_vs_sdk_export_only": round(tapio_512["records_per_cpu_s"] / sdk_only["records_per_cpu_s"], 1),
                    }
                    speedups.setdefault(name, []).append(vs_sdk)
    results["min_speedup_per_core_vs_sdk"] = {name: min(v) for name, v in speedups.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
