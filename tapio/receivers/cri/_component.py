"""The running cri receiver: follow the runtime's container events, list at every (re)connect, report log records.

Invariants:
- A session subscribes to the event stream first and lists sandboxes and
  containers after, once more `SETTLE_SECONDS` later (an event the runtime
  emitted before it registered the subscription is found by a list), and
  then every ``resync_interval``: containerd 1.7 hands each event to one
  subscriber only, so another client of the stream takes events from us,
  and only a list finds what they were about. `Tracker` makes each stage of
  each id reported once (see `_records`).
- Events and lists are handled by one task, in order: a list is never
  compared with a state that events are changing under it.
- A stopped container is reported with its `ContainerStatus` (exit code,
  reason, finished time), asked for when the stop is seen; when the runtime
  no longer knows it, with the status the event carried.
- A stage an id passed unseen is reported, marked inferred, just before the
  observation that proves it, once that observation's status is final
  (`_records.implied`). containerd 1.7 loses an event for good whenever a
  subscriber goes away: the server keeps waiting on its queue for the
  cancelled stream, takes the next event and fails to send it (so a tapio
  restart costs the next event on the node); a created or started stage
  lost so is recovered this way.
- Records wait for the pipeline (``send``): the runtime keeps its events
  while the reader thread waits. A batch the pipeline refuses is offered
  again after `REFUSED_RETRY_SECONDS`; nothing is dropped.
- When the runtime is unreachable or ends the stream, the receiver retries
  with exponential backoff (`reconnect.*`), counting each failure by gRPC
  status; a runtime without GetContainerEvents (UNIMPLEMENTED, e.g.
  containerd 1.6) is listed every ``poll_interval`` instead.
- With ``storage``, the stage reported of each id is saved only after its
  record was delivered (``on_done``), so a restart reports what changed
  while tapio was down, and a record that was not delivered is reported again.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import trio
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER

from ._client import RuntimeClient, RuntimeUnavailable
from ._config import Config
from ._proto import api_pb2 as pb
from ._records import RANK, Observation, Tracker, implied, record

SCOPE_NAME = "tapio.cri"
SCOPE_VERSION = "0.1.0"
#: a second list this long after subscribing closes the gap before the runtime registered the stream
SETTLE_SECONDS = 2.0
#: events buffered between the reader thread and the receiver
EVENT_BUFFER = 256
#: most events turned into one batch
MAX_BATCH = 512
REFUSED_RETRY_SECONDS = 0.5
CHECKPOINT_NAMESPACE = "cri"


class CriReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the cri receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._log = settings.logger
        self._telemetry = settings.telemetry
        self.tracker = Tracker()
        self._runtime: tuple[str, str] = ("", "")
        self._resource = [("host.name", socket.gethostname()), ("service.name", "tapio")]
        self._checkpoints: Any = None
        #: stage saved per key, so a late delivery of an earlier stage does not overwrite a later one
        self._saved: dict[str, str] = {}
        self._to_save: dict[str, str] = {}
        self._save_wanted = trio.Event()
        #: whether the next list is the first since start (report_existing decides whether it reports)
        self._first_list = True
        #: set once a session has listed; tests wait on it
        self.listed = trio.Event()
        for name, help_text in (
            ("tapio_cri_events_total", "CRI container events received, by type."),
            ("tapio_cri_lists_total", "Full lists of sandboxes and containers made (at connect, to settle, every resync or poll interval)."),
            ("tapio_cri_records_total", "Records reported, by kind, stage and source (event or list)."),
            ("tapio_cri_stale_events_total", "Events skipped because their id had reached that stage already."),
            ("tapio_cri_inferred_records_total", "Records of a stage not seen itself but proven by a later one, by kind and stage."),
            ("tapio_cri_connection_failures_total", "Sessions with the runtime that failed or ended, by gRPC status."),
            ("tapio_cri_refused_total", "Batches the pipeline refused (offered again)."),
        ):
            settings.telemetry.declare(name, COUNTER, help_text)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self._config
        if config.storage is not None:
            storage = self._settings.storage(config.storage)
            self._checkpoints = storage.checkpoints(CHECKPOINT_NAMESPACE)
            saved = await self._checkpoints.aitems()
            self._saved = {k: v.decode() for k, v in saved.items() if v.decode() in RANK}
            self.tracker.stages.update(self._saved)
            self._first_list = False  # what was reported before is known: report only what changed since
        client = RuntimeClient(config.endpoint, float(config.timeout))
        client.open()
        try:
            try:
                version = await client.version()
                self._runtime = (version.runtime_name, version.runtime_version)
                self._log.info("%s: connected to %s %s at %s", self._settings.id, version.runtime_name, version.runtime_version, config.endpoint)
            except RuntimeUnavailable as exc:
                self._log.warning("%s: cannot reach the container runtime at %s (%s); retrying", self._settings.id, config.endpoint, exc)
            task_status.started()
            async with trio.open_nursery() as nursery:
                if self._checkpoints is not None:
                    nursery.start_soon(self._save_loop)
                await self._connect_loop(client)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._settings.shutdown_grace):
                await client.aclose()
                await self._flush_saves()

    async def _connect_loop(self, client: RuntimeClient) -> None:
        config = self._config
        backoff = float(config.reconnect.initial_interval)
        polling = not config.event_stream
        while True:
            connected = False
            try:
                version = await client.version()
                self._runtime = (version.runtime_name, version.runtime_version)
                connected = True
                if polling:
                    await self._poll(client)
                else:
                    await self._follow(client)
            except RuntimeUnavailable as exc:
                self._telemetry.add("tapio_cri_connection_failures_total", reason=exc.code)
                if exc.code == "UNIMPLEMENTED" and not polling:
                    self._log.warning(
                        "%s: the runtime at %s has no event stream (%s); listing every %gs instead",
                        self._settings.id, config.endpoint, exc, float(config.poll_interval),
                    )
                    polling = True
                    continue
                self._log.warning("%s: lost the container runtime at %s (%s); reconnecting in %gs", self._settings.id, config.endpoint, exc, backoff)
            if connected:
                backoff = float(config.reconnect.initial_interval)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, float(config.reconnect.max_interval))

    async def _follow(self, client: RuntimeClient) -> None:
        send, receive = trio.open_memory_channel[pb.ContainerEventResponse](EVENT_BUFFER)
        async with trio.open_nursery() as nursery, receive:
            failed: list[RuntimeUnavailable] = []

            async def reader() -> None:
                try:
                    await client.follow_events(send)
                except RuntimeUnavailable as exc:
                    failed.append(exc)
                finally:
                    await send.aclose()

            nursery.start_soon(reader)
            await self._relist(client)
            resync = float(self._config.resync_interval)
            relist_at = trio.current_time() + SETTLE_SECONDS
            while True:
                events: list[pb.ContainerEventResponse] = []
                with trio.move_on_at(relist_at):
                    try:
                        events.append(await receive.receive())
                    except trio.EndOfChannel:
                        break
                    while len(events) < MAX_BATCH:
                        try:
                            events.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                if events:
                    await self._handle_events(client, events)
                elif trio.current_time() >= relist_at:
                    await self._relist(client)
                    relist_at = trio.current_time() + resync if resync > 0 else float("inf")
            nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        raise RuntimeUnavailable("UNAVAILABLE", "the event stream ended")

    async def _poll(self, client: RuntimeClient) -> None:
        while True:
            await self._relist(client)
            await trio.sleep(float(self._config.poll_interval))

    async def _relist(self, client: RuntimeClient) -> None:
        asked_at = time.time_ns()
        sandboxes = await client.list_sandboxes()
        containers = await client.list_containers()
        self._telemetry.add("tapio_cri_lists_total")
        snapshot, self._first_list = self._first_list, False
        silent = snapshot and not self._config.report_existing
        observations = self.tracker.relist(sandboxes, containers, silent=silent, snapshot=snapshot, asked_at=asked_at)
        await self._report(client, observations)
        self.listed.set()

    async def _handle_events(self, client: RuntimeClient, events: list[pb.ContainerEventResponse]) -> None:
        observations = []
        for ev in events:
            self._telemetry.add("tapio_cri_events_total", type=pb.ContainerEventType.Name(ev.container_event_type).removesuffix("_EVENT").lower())
            obs = self.tracker.event(ev)
            if obs is None:
                self._telemetry.add("tapio_cri_stale_events_total")
            else:
                observations.append(obs)
        await self._report(client, observations)

    async def _report(self, client: RuntimeClient, observations: list[Observation]) -> None:
        if not observations:
            return
        for obs in observations:
            if obs.kind == "container" and obs.stage == "stopped":
                status = await client.container_status(obs.id)
                if status is not None:
                    obs.detail = status
        observations = [o for seen in observations for o in (*implied(seen), seen)]
        now = time.time_ns()
        request = ExportLogsServiceRequest()
        rl = request.resource_logs.add()
        for k, v in self._resource:
            rl.resource.attributes.add(key=k).value.string_value = v
        sl = rl.scope_logs.add()
        sl.scope.name, sl.scope.version = SCOPE_NAME, SCOPE_VERSION
        sl.log_records.extend(record(o, observed_unix_nano=now, runtime=self._runtime, labels=self._config.labels) for o in observations)
        batch = Batch(Signal.LOGS, [request], len(observations))
        if self._checkpoints is not None:
            stages = {o.key: o.stage for o in observations}
            batch.on_done.append(lambda delivered: self._delivered(stages) if delivered else None)
        for o in observations:
            self._telemetry.add("tapio_cri_records_total", kind=o.kind, stage=o.stage, source=o.source)
            if o.inferred:
                self._telemetry.add("tapio_cri_inferred_records_total", kind=o.kind, stage=o.stage)
        while True:
            try:
                await self._output.send(batch)
                return
            except Refused:
                self._telemetry.add("tapio_cri_refused_total")
                await trio.sleep(REFUSED_RETRY_SECONDS)
                batch.on_done.clear()
                if self._checkpoints is not None:
                    batch.on_done.append(lambda delivered: self._delivered(stages) if delivered else None)

    # -- checkpoints (with storage)

    def _delivered(self, stages: dict[str, str]) -> None:
        for key, stage in stages.items():
            saved = self._to_save.get(key) or self._saved.get(key)
            if saved is None or RANK[stage] > RANK[saved]:
                self._to_save[key] = stage
        self._save_wanted.set()

    async def _save_loop(self) -> None:
        while True:
            await self._save_wanted.wait()
            self._save_wanted = trio.Event()
            await self._flush_saves()

    async def _flush_saves(self) -> None:
        if self._checkpoints is None or not self._to_save:
            return
        todo = dict(self._to_save)
        # shielded: a write cancelled half-way would leave it unknown whether the stages were saved
        with trio.CancelScope(shield=True):
            keep = {k: s.encode() for k, s in todo.items() if s != "deleted"}
            if keep:
                await self._checkpoints.aput_many(keep)
            for key in (k for k, s in todo.items() if s == "deleted"):
                await self._checkpoints.adelete(key)
        for key, stage in todo.items():
            if self._to_save.get(key) == stage:
                del self._to_save[key]
            if stage == "deleted":
                self._saved.pop(key, None)
            else:
                self._saved[key] = stage
