"""The running kubeapi receiver: shared watches of the configured resources → log records.

Invariants:
- One subscription per (resource, namespace) to the process's shared
  watches (`tapio.k8s.REGISTRY`): a k8sattributes processor watching the
  same pods the same way in this process uses the same watch.
- The first list (and, for a late joiner, the snapshot) only primes the
  change trackers unless ``initial_state``; a re-list after a gap emits what
  changed in the gap. Events that happened before the receiver started are
  never emitted.
- Each delivery becomes at most one batch, handed on with ``send``
  (backpressure reaches the shared watch, which waits). A refusal (memory
  limit) is retried with backoff, not dropped: the API keeps the changes.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import trio
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tapio import k8s
from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER

from ._config import Config
from ._records import Record, Translator, event_time

SCOPE_NAME = "tapio.kubeapi"
SCOPE_VERSION = "0.1.0"
SKIPPED = "tapio_kubeapi_skipped_total"
#: events this much older than the start still count as "since the start" (clock skew between node and API server)
EVENT_START_SLACK_NS = 2_000_000_000
REFUSED_BACKOFF = (0.1, 5.0)


def _value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, list):
        out = AnyValue()
        out.array_value.values.extend(AnyValue(string_value=str(x)) for x in v)
        return out
    return AnyValue(string_value=str(v))


class KubeApiReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the kubeapi receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._tel = settings.telemetry
        self._log = settings.logger
        self.translator = Translator(include_object=config.include_object)
        self._node = ""
        self._node_pods: set[str] = set()
        self._watches_pods = any(o.name == "pods" for o in config.objects)
        self._start_ns = time.time_ns()
        self._resource = [KeyValue(key="host.name", value=AnyValue(string_value=socket.gethostname())), KeyValue(key="service.name", value=AnyValue(string_value="tapio"))]
        self._tel.declare(SKIPPED, COUNTER, "Object changes not emitted, by reason (event_before_start, event_other_node).")

    def specs(self, node: str) -> list[k8s.WatchSpec]:
        out = []
        for obj in self._config.objects:
            fields = [obj.field_selector] if obj.field_selector else []
            if node and obj.name == "pods":
                fields.append(f"spec.nodeName={node}")
            if node and obj.name == "nodes":
                fields.append(f"metadata.name={node}")
            for ns in obj.namespaces or [""]:
                out.append(k8s.WatchSpec(obj.name, ns, obj.label_selector, ",".join(fields)))
        return out

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        config = self._config
        node = k8s.node_name(config.filter.node, config.filter.node_from_env_var)
        self._node = node
        connection = await k8s.connect(config)
        specs = self.specs(node)
        self._start_ns = time.time_ns()
        async with trio.open_nursery() as nursery:
            for spec in specs:
                nursery.start_soon(self._follow, connection, spec)
            self._log.info("%s: watching %s on %s", self._settings.id, "; ".join(str(s) for s in specs), connection.host)
            task_status.started()

    async def _follow(self, connection: k8s.Connection, spec: k8s.WatchSpec) -> None:
        async with k8s.REGISTRY.subscribe(connection, spec, telemetry=self._tel.telemetry, logger=self._log) as subscription:
            async for delivery in subscription:
                records: list[Record] = []
                if delivery.snapshot:
                    for i, blob in enumerate(delivery.snapshot):
                        records += self._translate(spec.resource, "ADDED", k8s.decode_blob(blob), listed=True, initial=True)
                        if i % 256 == 255:
                            await trio.lowlevel.checkpoint()
                for change in delivery.changes:
                    initial = change.listed and not delivery.synced
                    records += self._translate(spec.resource, change.type, change.obj, listed=change.listed, initial=initial)
                if records:
                    await self._send(records)

    def _translate(self, resource: str, change: str, obj: dict, *, listed: bool, initial: bool) -> list[Record]:
        if resource == "pods":
            uid = str((obj.get("metadata") or {}).get("uid") or "")
            if change == "DELETED":
                self._node_pods.discard(uid)
            else:
                self._node_pods.add(uid)
        emit = self._config.initial_state or not initial
        if resource == "events":
            if change != "DELETED" and listed and event_time(obj) < self._start_ns - EVENT_START_SLACK_NS:
                self.translator.translate(resource, change, obj, listed=listed, emit=False)  # remember it: a later re-list does not repeat it
                self._tel.add(SKIPPED, 1, reason="event_before_start")
                return []
            emit = True
            if self._node and not self._about_node(obj):
                self._tel.add(SKIPPED, 1, reason="event_other_node")
                return []
        return self.translator.translate(resource, change, obj, listed=listed, emit=emit)

    def _about_node(self, event: dict) -> bool:
        """Whether an Event concerns this node: the node itself, one of its pods, or reported from it."""
        involved = event.get("involvedObject") or event.get("regarding") or {}
        kind = involved.get("kind")
        if kind == "Node" and involved.get("name") == self._node:
            return True
        if kind == "Pod" and self._watches_pods and involved.get("uid") in self._node_pods:
            return True
        source = event.get("source") or {}
        return self._node in (source.get("host"), event.get("reportingInstance"))

    async def _send(self, records: list[Record]) -> None:
        observed = time.time_ns()
        request = ExportLogsServiceRequest()
        rl = request.resource_logs.add()
        rl.resource.attributes.extend(self._resource)
        sl = rl.scope_logs.add()
        sl.scope.name, sl.scope.version = SCOPE_NAME, SCOPE_VERSION
        for r in records:
            lr = sl.log_records.add(
                time_unix_nano=r.time_unix_nano or observed,
                observed_time_unix_nano=observed,
                severity_number=r.severity,
                severity_text="WARN" if r.severity >= 13 else "INFO",
                event_name=r.event_name,
            )
            lr.body.string_value = r.body
            lr.attributes.extend(KeyValue(key=k, value=_value(v)) for k, v in r.attributes)
        batch = Batch(Signal.LOGS, [request], len(records))
        delay = REFUSED_BACKOFF[0]
        while True:
            try:
                await self._output.send(batch)
                return
            except Refused:
                # the pipeline is over its memory limit: wait (the shared watch waits with us) and offer it again
                await trio.sleep(delay)
                delay = min(delay * 2, REFUSED_BACKOFF[1])
