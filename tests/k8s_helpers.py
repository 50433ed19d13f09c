"""Helpers shared by the Kubernetes tests: records to send, attributes read back, a processor harness."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer


def kv(key: str, value: Any) -> KeyValue:
    out = KeyValue(key=key)
    if isinstance(value, int):
        out.value.int_value = value
    else:
        out.value.string_value = value
    return out


def attrs(item: Any) -> dict[str, Any]:
    out = {}
    for a in item.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


def logs_request(resources: list[tuple[dict, list[dict]]], scope: str = "test") -> ExportLogsServiceRequest:
    """A request with one ResourceLogs per (resource attributes, [record attributes]); each record's body is its index."""
    req = ExportLogsServiceRequest()
    n = 0
    for resource, records in resources:
        rl = req.resource_logs.add()
        rl.resource.attributes.extend(kv(k, v) for k, v in resource.items())
        sl = rl.scope_logs.add()
        sl.scope.name = scope
        for rec in records:
            lr = sl.log_records.add()
            lr.body.string_value = f"record {n}"
            n += 1
            lr.attributes.extend(kv(k, v) for k, v in rec.items())
    return req


def records_by_resource(batches: list[Batch]) -> list[tuple[dict, list[str]]]:
    """(resource attributes, [bodies]) for every ResourceLogs in the batches, in order."""
    out = []
    for b in batches:
        for req in b.requests:
            for rl in req.resource_logs:
                bodies = [r.body.string_value for sl in rl.scope_logs for r in sl.log_records]
                out.append((attrs(rl.resource), bodies))
    return out


def settings(kind: Kind, type_: str, telemetry: Telemetry | None = None, name: str = "") -> Settings:
    tel = telemetry or Telemetry()
    cid = ComponentID(type_, name)
    return Settings(id=cid, kind=kind, telemetry=tel.for_component(kind.value, str(cid)), logger=logging.getLogger(f"test.{cid}"), shutdown_grace=2.0)


class Harness:
    """A processor under test: send batches in, read them out of ``sink``."""

    def __init__(self, component: Any, send: trio.MemorySendChannel, sink: RecordingConsumer, settings: Settings) -> None:
        self.component = component
        self._send = send
        self.sink = sink
        self.settings = settings

    @property
    def telemetry(self) -> Telemetry:
        return self.settings.telemetry.telemetry

    def value(self, name: str, **labels: str) -> float:
        return self.telemetry.value(name, **labels)

    async def roundtrip(self, batch: Batch) -> Batch:
        before = len(self.sink.batches)
        await self._send.send(batch)
        with trio.fail_after(10):
            await self.sink.wait_for_batches(before + 1)
        return self.sink.batches[before]


@asynccontextmanager
async def running_processor(factory: Any, config: dict, telemetry: Telemetry | None = None, capacity: int = 4) -> AsyncIterator[Harness]:
    cfg = decode_dataclass(factory.config_class, config)
    send, recv = trio.open_memory_channel(capacity)
    sink = RecordingConsumer()
    st = settings(Kind.PROCESSOR, factory.type, telemetry)
    component = factory.create(st, cfg, Ports(input=recv, output=sink))
    async with trio.open_nursery() as n:
        with trio.fail_after(20):
            await n.start(component.run)
        yield Harness(component, send, sink, st)
        await send.aclose()
