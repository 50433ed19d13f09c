"""The running etcd-watch receiver: one watch per prefix, records handed on in order, revisions checkpointed once delivered.

Invariants:
- Per prefix, ``next_revision`` is one past the newest revision whose
  events were handed on (or that a progress notice covered); every
  (re)connection watches from it, so a disconnect or a failover skips
  nothing and repeats nothing.
- The checkpoint of a prefix is written only from `DeliveryProgress.delivered`:
  after every batch up to that revision was reported delivered. So a
  crash, at any moment, replays from the checkpoint and loses nothing
  (at-least-once); a batch that is not delivered stops the checkpoint there.
- A revision the watch cannot resume from (compacted, a checkpoint of
  another cluster, a checkpoint ahead of the cluster) is never skipped
  silently: a resync marker record says what happened, is counted, and
  (with ``relist_on_compaction``) every key of the prefix follows as it is
  now, before watching on from the re-list's revision.
- No step holds the event loop long: a watch read is handed on in batches
  of at most ``max_events_per_batch`` events.
- Startup opens the client (TLS files are read: unreadable ones fail it)
  and reads the checkpoints; connecting is the steady state, retried with
  failover and backoff, because etcd may come up after the agent.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, Callable

import trio

from tapio.component import Ports, Refused, Settings
from tapio.pdata import Batch, Signal
from tapio.storage import Checkpoints, StorageError
from tapio.telemetry import COUNTER, GAUGE

from ._client import AuthFailed, Compacted, EtcdClient, EtcdError, Unavailable, b64, classify
from ._config import Config
from ._gateway import (
    Event,
    KeyValue,
    LineSplitter,
    MalformedResponse,
    StreamError,
    WatchResponse,
    parse_range,
    parse_watch_line,
)
from ._progress import DeliveryProgress
from ._records import RecordBuilder
from ._values import PROTOBUF

#: the longest watch line accepted (etcd's largest response is a revision's events, bounded by its request size limit)
MAX_LINE_BYTES = 64 << 20
#: waits before offering a batch again that the pipeline refused (memory limit): first, and longest
REFUSED_RETRY_INITIAL, REFUSED_RETRY_MAX = 0.1, 2.0
#: wait before writing a checkpoint again after the storage failed
CHECKPOINT_RETRY_SECONDS = 1.0
#: the checkpoint key of a prefix, in the namespace of the component id
CHECKPOINT_KEY = "revision:{prefix}"


def prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """The key and range_end that select every key starting with ``prefix`` ("" selects every key)."""
    key = prefix.encode()
    if not key:
        return b"\x00", b"\x00"
    end = bytearray(key)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return key, b"\x00"  # every key from ``key`` on
    end[-1] += 1
    return key, bytes(end)


class EtcdWatchReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the etcd-watch receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        self._telemetry = settings.telemetry
        self._log = settings.logger
        self._builder = RecordBuilder(raw_values=config.raw_values, kubernetes_prefix=config.kubernetes_prefix)
        #: the watches, once running (tests read their positions)
        self.watches: dict[str, PrefixWatch] = {}
        self._warned: set[str] = set()
        self._declare_metrics()

    def _declare_metrics(self) -> None:
        t = self._telemetry
        t.declare("tapio_etcd_watch_events_total", COUNTER, "Watch events received, by operation (PUT, DELETE).")
        t.declare("tapio_etcd_watch_values_total", COUNTER, "Values decoded, by encoding (json, kubernetes-protobuf, text, …).")
        t.declare("tapio_etcd_watch_resyncs_total", COUNTER, "Resync markers emitted, by reason (compacted, cluster_changed, ahead_of_cluster).")
        t.declare("tapio_etcd_watch_relisted_keys_total", COUNTER, "Keys reported by re-lists after a resync.")
        t.declare("tapio_etcd_watch_reconnects_total", COUNTER, "Watches reopened, by reason (unavailable, auth, error, malformed).")
        t.declare("tapio_etcd_watch_failovers_total", COUNTER, "Moves from one etcd endpoint to the next.")
        t.declare("tapio_etcd_watch_undelivered_batches_total", COUNTER, "Batches the pipeline reported not delivered (the checkpoint stops before them).")
        t.declare("tapio_etcd_watch_refused_total", COUNTER, "Times the pipeline refused a batch (memory limit); it is offered again.")
        t.declare("tapio_etcd_watch_revision", GAUGE, "Newest revision received, by prefix.")
        t.declare("tapio_etcd_watch_checkpoint_revision", GAUGE, "Revision checkpointed (everything up to it delivered), by prefix.")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config, settings = self._config, self._settings
        checkpoints: Checkpoints | None = None
        saved: dict[str, bytes] = {}
        if config.storage is not None:
            checkpoints = settings.storage(config.storage).checkpoints(str(settings.id))
            saved = await checkpoints.aitems()
        client = EtcdClient(config, self._log, connections=len(config.prefixes) + 2)
        client.open()
        watches = [PrefixWatch(self, client, checkpoints, prefix, saved.get(CHECKPOINT_KEY.format(prefix=prefix))) for prefix in config.prefixes]
        self.watches = {w.prefix: w for w in watches}
        try:
            async with trio.open_nursery() as nursery:
                for w in watches:
                    nursery.start_soon(w.run)
                    if checkpoints is not None:
                        nursery.start_soon(w.write_checkpoints)
                self._log.info(
                    "%s: watching %s on %s", settings.id, ", ".join(repr(p) for p in config.prefixes), ", ".join(client.endpoints)
                )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(settings.shutdown_grace):
                for w in watches:
                    await w.final_checkpoint()
                await client.aclose()

    # -- used by PrefixWatch

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        self._telemetry.add(name, value, **labels)

    def bad(self, reason: str, message: str, *args: Any) -> None:
        """Count bad input by reason; log the first of each reason as a warning, the rest at debug."""
        self._telemetry.bad_input(reason)
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        self._log.log(level, "%s: " + message, self._settings.id, *args)

    async def send(self, records: list[bytes], cluster_id: int, done: Callable[[bool], None]) -> None:
        """Hand one batch on, waiting while the pipeline is full and offering it again while it refuses."""
        data = self._builder.request(cluster_id, records)
        wait = REFUSED_RETRY_INITIAL
        while True:
            gate = _Gate(done)
            batch = Batch.from_bytes(Signal.LOGS, data)
            batch.on_done.append(gate)
            try:
                await self._output.send(batch)
            except Refused:
                self.count("tapio_etcd_watch_refused_total")
                await trio.sleep(wait * random.uniform(0.5, 1.5))
                wait = min(wait * 2, REFUSED_RETRY_MAX)
                continue
            gate.open()
            return

    @property
    def builder(self) -> RecordBuilder:
        return self._builder

    @property
    def config(self) -> Config:
        return self._config

    @property
    def log(self) -> logging.Logger:
        return self._log

    @property
    def id(self) -> str:
        return str(self._settings.id)


class _Gate:
    """A batch's done report, held back while it is being sent.

    A pipeline that refuses a batch reports it not delivered and raises
    `Refused`; the batch is then offered again, so that report must not
    count. Reports made during a send that succeeded are passed on once it returns.
    """

    __slots__ = ("_done", "_open", "_early")

    def __init__(self, done: Callable[[bool], None]) -> None:
        self._done = done
        self._open = False
        self._early: bool | None = None

    def __call__(self, delivered: bool) -> None:
        if self._open:
            self._done(delivered)
        else:
            self._early = delivered

    def open(self) -> None:
        self._open = True
        if self._early is not None:
            self._done(self._early)


class _Resync(Exception):
    """The watch cannot go on from ``next_revision``: resync, then watch again."""

    def __init__(self, reason: str, compact_revision: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.compact_revision = compact_revision


class _Reconnect(Exception):
    """Reopen the watch on the same endpoint at once (a refreshed auth token)."""


class PrefixWatch:
    """The watch of one prefix: connect, read, hand on, resync, checkpoint."""

    def __init__(self, receiver: EtcdWatchReceiver, client: EtcdClient, checkpoints: Checkpoints | None, prefix: str, saved: bytes | None) -> None:
        self.receiver = receiver
        self.client = client
        self.checkpoints = checkpoints
        self.prefix = prefix
        self.key, self.range_end = prefix_range(prefix)
        config = receiver.config
        #: the cluster the positions belong to (None until known)
        self.cluster_id: int | None = None
        #: where the next watch starts; None: at the current revision (a fresh start with start_revision 0)
        self.next_revision: int | None = config.start_revision or None
        self._check_ahead = False
        delivered = 0
        if saved is not None:
            try:
                doc = json.loads(saved)
                delivered, self.cluster_id = int(doc["revision"]), int(doc["cluster_id"], 16)
                self.next_revision, self._check_ahead = delivered + 1, True
            except (ValueError, KeyError, TypeError):
                receiver.log.warning("%s: the checkpoint of %r is unreadable (%r); starting as configured", receiver.id, prefix, saved[:100])
                delivered = 0
        self.progress = DeliveryProgress(delivered)
        self.written = delivered
        self._failures = 0
        self._reported_stuck = False
        self._splitter = LineSplitter(MAX_LINE_BYTES)
        t = receiver._telemetry
        t.gauge("tapio_etcd_watch_revision", lambda: (self.next_revision or 1) - 1, prefix=prefix)
        t.gauge("tapio_etcd_watch_checkpoint_revision", lambda: self.written, prefix=prefix)

    # ---------------------------------------------------------------- the watch loop

    async def run(self) -> None:
        while True:
            try:
                await self._watch()
            except _Resync as resync:
                await self._resync_guarded(resync)
            except _Reconnect:
                self.receiver.count("tapio_etcd_watch_reconnects_total", reason="auth")
            except (EtcdError, MalformedResponse) as exc:
                await self._after_failure(exc)

    async def _resync_guarded(self, resync: _Resync) -> None:
        try:
            await self.resync(resync.reason, resync.compact_revision)
        except (EtcdError, MalformedResponse) as exc:
            await self._after_failure(exc)  # the watch's start is still the old one: the next try resyncs again

    async def _after_failure(self, exc: Exception) -> None:
        r = self.receiver
        self._failures += 1
        if isinstance(exc, MalformedResponse):
            r.bad("watch_malformed", "%s answered a watch of %r with something malformed (%s); reconnecting", self.client.endpoint, self.prefix, exc)
            reason = "malformed"
        elif isinstance(exc, Unavailable):
            reason = "unavailable"
        elif isinstance(exc, AuthFailed):
            reason = "auth"
        else:
            reason = "error"
        r.count("tapio_etcd_watch_reconnects_total", reason=reason)
        delay = self._backoff()
        level = logging.WARNING if reason != "auth" else logging.ERROR
        r.log.log(level, "%s: watch of %r: %s; %s", r.id, self.prefix, exc, f"retrying in {delay:.2f}s" if delay else "trying the next endpoint")
        if isinstance(exc, (Unavailable, MalformedResponse)) and len(self.client.endpoints) > 1:
            failed = exc.endpoint if isinstance(exc, EtcdError) else self.client.endpoint
            self.client.fail_over(failed)
            r.count("tapio_etcd_watch_failovers_total")
        await trio.sleep(delay)

    def _backoff(self) -> float:
        """No wait while endpoints of this round are left; then doubling waits, with jitter."""
        n = len(self.client.endpoints)
        if self._failures % n:
            return 0.0
        rc = self.receiver.config.reconnect
        wait = min(float(rc.max_interval), float(rc.initial_interval) * 2 ** (self._failures // n - 1))
        return wait * random.uniform(0.5, 1.5)

    async def _watch(self) -> None:
        create: dict[str, Any] = {
            "key": b64(self.key),
            "range_end": b64(self.range_end),
            "prev_kv": self.receiver.config.prev_kv,
            "progress_notify": True,
        }
        if self.next_revision is not None:
            create["start_revision"] = str(self.next_revision)
        self._splitter = LineSplitter(MAX_LINE_BYTES)
        await self.client.watch({"create_request": create}, self._on_data)

    async def _on_data(self, data: bytes) -> None:
        observed = time.time_ns()
        events: list[Event] = []
        try:
            for line in self._splitter.feed(data):
                message = parse_watch_line(line)
                if isinstance(message, StreamError):
                    raise classify(self.client.endpoint, 200, message)
                await self._on_response(message, events)
        except (_Resync, _Reconnect, EtcdError, MalformedResponse):
            # what was read before a cancel, a compaction or an error is handed on first
            if events:
                await self._deliver(events, observed)
            raise
        if events:
            await self._deliver(events, observed)

    async def _on_response(self, message: WatchResponse, events: list[Event]) -> None:
        header = message.header
        if message.created:
            self._failures = 0
            await self._on_created(message)
        if message.canceled:
            if message.compact_revision:
                raise _Resync("compacted", message.compact_revision)
            reason = message.cancel_reason or "the watch was canceled"
            if "token" in reason and self.receiver.config.username:
                self.client.forget_token(self.client.endpoint)
                raise _Reconnect()
            raise classify(self.client.endpoint, 200, StreamError(0, reason))
        if message.events:
            events.extend(message.events)
            last = message.events[-1].kv.mod_revision
            if self.next_revision is None or last >= self.next_revision:
                self.next_revision = last + 1
        elif not message.created and header.revision:
            # a progress notice: every event up to header.revision was sent
            if events:
                await self._deliver(events, time.time_ns())
                events.clear()
            if self.next_revision is None or header.revision >= self.next_revision:
                self.next_revision = header.revision + 1
            self.progress.passed(header.revision)

    async def _on_created(self, message: WatchResponse) -> None:
        header = message.header
        if self.cluster_id is not None and header.cluster_id != self.cluster_id:
            raise _Resync("cluster_changed")
        self.cluster_id = header.cluster_id
        if self.next_revision is None:
            # a fresh start: changes after the current revision are what is watched
            self.next_revision = header.revision + 1
            self.progress.passed(header.revision)
            return
        if self._check_ahead:
            self._check_ahead = False
            if header.revision < self.next_revision - 1:
                # a member may lag; ask the leader before deciding the checkpoint is from the future
                if (await self.client.current(self.key)).revision < self.next_revision - 1:
                    raise _Resync("ahead_of_cluster")
        self.progress.passed(self.next_revision - 1)

    # ---------------------------------------------------------------- handing on

    async def _deliver(self, events: list[Event], observed: int) -> None:
        r, builder = self.receiver, self.receiver.builder
        size = r.config.max_events_per_batch
        for start in range(0, len(events), size):
            chunk = events[start:start + size]
            records = []
            for ev in chunk:
                built = builder.event(ev, self.prefix, observed)
                records.append(built.record)
                self._count_value(built.encoding, built.problem, ev.kv)
                r.count("tapio_etcd_watch_events_total", operation="DELETE" if ev.deleted else "PUT")
            await r.send(records, self.cluster_id or 0, self.progress.track(chunk[-1].kv.mod_revision))

    def _count_value(self, encoding: str, problem: str, kv: KeyValue) -> None:
        r = self.receiver
        r.count("tapio_etcd_watch_values_total", encoding=encoding)
        if problem:
            reason = "value_invalid_protobuf" if encoding == PROTOBUF else "value_invalid_json"
            r.bad(reason, "value of %r at revision %d from %s: %s (kept raw)", kv.key[:200], kv.mod_revision, self.client.endpoint, problem)

    async def resync(self, reason: str, compact_revision: int = 0) -> None:
        """Report that changes were missed, re-list the prefix if configured, and move the watch to the present."""
        r = self.receiver
        wanted = self.next_revision or 0
        relist = r.config.relist_on_compaction
        r.count("tapio_etcd_watch_resyncs_total", reason=reason)
        if reason != "compacted":
            # the positions held belong to another cluster (or another past): start them over
            self.progress.reset()
            self.written = 0
        while True:
            try:
                revision, keys = await self._relist(reason, wanted, compact_revision) if relist else (await self._marker_only(reason, wanted, compact_revision), 0)
                break
            except Compacted:
                continue  # the re-list's own revision was compacted meanwhile: list again
        r.log.warning(
            "%s: watch of %r could not resume from revision %d (%s); %s, watching from revision %d",
            r.id, self.prefix, wanted, reason, f"re-listed {keys} keys at revision {revision}" if relist else "reported a resync marker",
            revision + 1,
        )
        self.next_revision = revision + 1
        self.progress.passed(revision)

    async def _marker_only(self, reason: str, wanted: int, compact_revision: int) -> int:
        header = await self.client.current(self.key)
        revision = header.revision
        self.cluster_id = header.cluster_id
        await self._send_listed(reason, wanted, compact_revision, revision, [], relist=False)
        return revision

    async def _relist(self, reason: str, wanted: int, compact_revision: int) -> tuple[int, int]:
        """Every key of the prefix at one revision, page by page, after the marker; returns (revision, keys)."""
        config = self.receiver.config
        body: dict[str, Any] = {"key": b64(self.key), "range_end": b64(self.range_end), "limit": str(config.relist_page_size)}
        revision, keys, first = 0, 0, True
        while True:
            page = parse_range(await self.client.call("/v3/kv/range", body))
            if first:
                revision = page.header.revision
                body["revision"] = str(revision)
                self.cluster_id = page.header.cluster_id
            await self._send_listed(reason, wanted, compact_revision, revision, page.kvs, relist=True, marker=first)
            keys += len(page.kvs)
            first = False
            if not page.more or not page.kvs:
                return revision, keys
            body["key"] = b64(page.kvs[-1].key + b"\x00")

    async def _send_listed(self, reason: str, wanted: int, compact_revision: int, revision: int, kvs: list[KeyValue], *, relist: bool, marker: bool = True) -> None:
        r, builder = self.receiver, self.receiver.builder
        observed = time.time_ns()
        records: list[bytes] = []
        if marker:
            records.append(builder.resync_marker(
                prefix=self.prefix, reason=reason, wanted_revision=wanted, revision=revision,
                compact_revision=compact_revision, relist=relist, observed_ns=observed,
            ))
        for kv in kvs:
            built = builder.listed(kv, self.prefix, observed)
            records.append(built.record)
            self._count_value(built.encoding, built.problem, kv)
        r.count("tapio_etcd_watch_relisted_keys_total", len(kvs))
        size = r.config.max_events_per_batch
        for start in range(0, len(records), size):
            # the checkpoint moves to the re-list's revision only once every page is delivered (`resync`)
            await r.send(records[start:start + size], self.cluster_id or 0, self.progress.track(self.progress.delivered))

    # ---------------------------------------------------------------- checkpoints

    async def write_checkpoints(self) -> None:
        """Write ``progress.delivered`` whenever it moves (coalescing: one write at a time, the newest value)."""
        while True:
            if self.progress.stuck_at is not None and not self._reported_stuck:
                self._reported_stuck = True
                r = self.receiver
                r.count("tapio_etcd_watch_undelivered_batches_total")
                r.log.warning(
                    "%s: a batch of %r was not delivered; the checkpoint stays at revision %d until restart, which replays from there",
                    r.id, self.prefix, self.progress.stuck_at,
                )
            if self.progress.delivered > self.written:
                try:
                    await self._write(self.progress.delivered)
                except StorageError as exc:
                    self.receiver.log.error("%s: cannot write the checkpoint of %r: %s", self.receiver.id, self.prefix, exc)
                    await trio.sleep(CHECKPOINT_RETRY_SECONDS)
                continue
            await self.progress.wait_changed()

    async def final_checkpoint(self) -> None:
        """At shutdown: write what is delivered now; batches still in the pipeline write theirs when they report."""
        if self.checkpoints is None:
            return
        if self.progress.delivered > self.written:
            try:
                await self._write(self.progress.delivered)
            except StorageError as exc:
                self.receiver.log.error("%s: cannot write the checkpoint of %r: %s", self.receiver.id, self.prefix, exc)
        self.progress.on_advance = self._write_late

    def _write_late(self, revision: int) -> None:
        # After shutdown began nothing in this component waits for the storage any more;
        # the pipeline drains and reports, and each report that moves the position is
        # written here, in the reporting task (one commit, well under a millisecond with
        # synchronous=normal). Nothing raised here may reach the exporter that reported.
        try:
            if self.checkpoints is not None and revision > self.written:
                self.checkpoints.put(CHECKPOINT_KEY.format(prefix=self.prefix), self._value(revision))
                self.written = revision
        except Exception as exc:  # noqa: BLE001 - a closed storage at the very end is expected
            self.receiver.log.debug("%s: late checkpoint of %r not written: %s", self.receiver.id, self.prefix, exc)

    async def _write(self, revision: int) -> None:
        assert self.checkpoints is not None
        await self.checkpoints.aput(CHECKPOINT_KEY.format(prefix=self.prefix), self._value(revision))
        self.written = max(self.written, revision)

    def _value(self, revision: int) -> bytes:
        return json.dumps({"revision": revision, "cluster_id": f"{self.cluster_id or 0:x}"}).encode()
