"""Micro-benchmark of the batch processor: throughput with and without splitting.

Run: ``.venv/bin/python bench/bench_batch.py``. Prints items per second for
batching many small batches (concatenation only) and for cutting large
requests at a max size (item copies), for each signal.
"""

from __future__ import annotations

import logging
import time

import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.processors.batch import BatchConfig, factory, split_request
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer
from tapio.units import Duration


def make_request(signal: Signal, n: int, attrs: int = 10):
    req = signal.request_class()
    if signal is Signal.LOGS:
        sl = req.resource_logs.add().scope_logs.add()
        for i in range(n):
            rec = sl.log_records.add(time_unix_nano=i, body={"string_value": f"event {i}"})
            for a in range(attrs):
                rec.attributes.add(key=f"k{a}", value={"int_value": a})
    elif signal is Signal.TRACES:
        ss = req.resource_spans.add().scope_spans.add()
        for i in range(n):
            span = ss.spans.add(name=f"span {i}", start_time_unix_nano=i)
            for a in range(attrs):
                span.attributes.add(key=f"k{a}", value={"int_value": a})
    else:
        m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
        m.sum.aggregation_temporality = 2
        for i in range(n):
            p = m.sum.data_points.add(as_int=i)
            for a in range(attrs):
                p.attributes.add(key=f"k{a}", value={"int_value": a})
    return req


async def run_processor(config: BatchConfig, batches: list[Batch]) -> float:
    sink = RecordingConsumer(ack=True)
    send, receive = trio.open_memory_channel[Batch](16)
    settings = Settings(id=ComponentID("batch"), kind=Kind.PROCESSOR, telemetry=Telemetry().for_component("processor", "batch"), logger=logging.getLogger("bench"))
    proc = factory.create(settings, config, Ports(input=receive, output=sink))
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(proc.run)
        async with send:
            for b in batches:
                await send.send(b)
    return time.perf_counter() - t0


def main() -> None:
    for signal in Signal:
        small = make_request(signal, 10)
        batches = [Batch.of(signal, small) for _ in range(20_000)]
        dt = trio.run(run_processor, BatchConfig(send_batch_size=8192, timeout=Duration(1)), batches)
        print(f"{signal}: 20000 batches of 10 -> size 8192: {200_000 / dt / 1e6:.2f} M items/s")

        big = make_request(signal, 10_000)
        batches = [Batch.of(signal, big) for _ in range(20)]
        dt = trio.run(run_processor, BatchConfig(send_batch_size=1000, send_batch_max_size=1000, timeout=Duration(1)), batches)
        print(f"{signal}: 20 batches of 10000 -> max 1000 (split): {200_000 / dt / 1e3:.0f} k items/s")

        t0 = time.perf_counter()
        split_request(signal, big, [1000] * 10)
        print(f"{signal}: split_request 10000 items into 10: {(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
