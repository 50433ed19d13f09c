"""The otlp/otlphttp exporter: input → sending queue → consumers that send with retries.

Invariants:
- Every batch taken from the input is accounted for exactly once per item:
  sent (``exporter_sent``), dropped with a reason (``exporter_send_failed``:
  a permanent error, retries exhausted, the server's partial-success
  rejections, shutdown), or refused by a full queue
  (``exporter_enqueue_failed``) — or, with a storage-backed queue, left on
  disk for the next run.
- A batch's ``done`` is called exactly once: with a storage-backed queue
  ``done(True)`` once it is committed to disk (or ``done(False)`` if it could
  not be queued); with an in-memory queue, or none, after it was sent
  (True) or dropped (False).
- A storage-backed item leaves the disk only after it was sent or dropped
  and counted, so a crash re-sends (at least once); at most the items in
  flight (``num_consumers``) are sent twice.
- Shutdown: when the input ends, an in-memory queue is drained (with
  retries) until the runtime's deadline; a storage-backed queue is sent
  until empty or until the first retryable failure, and the rest stays on
  disk. On cancellation, in-memory leftovers (without a queue: the batch in
  hand) get one last attempt within ``shutdown_grace``; what is still
  unsent is counted (reason ``shutdown``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Awaitable, Callable, Protocol

import trio

from tapio.component import Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.storage import StorageError
from tapio.telemetry import COUNTER, GAUGE

from ._queue import CorruptItem, Item, MemoryQueue, QueueFull, StorageQueue
from ._retry import Backoff, Outcome, Verdict

RETRIES_METRIC = "tapio_exporter_retries_total"
QUEUE_SIZE_METRIC = "tapio_exporter_sending_queue_size"
QUEUE_CAPACITY_METRIC = "tapio_exporter_sending_queue_capacity"
#: the same warning (by reason) is logged at most once per this many seconds
WARNING_INTERVAL = 10.0


class Sender(Protocol):
    target: str

    def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def export(self, signal: Signal, payload: bytes) -> Outcome: ...


class _Throttle:
    """Logs a warning per key at most once per `WARNING_INTERVAL`, saying how many were not logged."""

    def __init__(self, logger: Any) -> None:
        self._log = logger
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < WARNING_INTERVAL:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        if quiet:
            msg += " (%d similar messages suppressed)"
            args = (*args, quiet)
        self._log.warning(msg, *args)


class OtlpExporter:
    """One running otlp or otlphttp exporter. ``config`` is a Grpc- or HttpExporterConfig."""

    def __init__(self, settings: Settings, config: Any, ports: Ports, sender: Sender) -> None:
        self.settings = settings
        self.config = config
        self.ports = ports
        self.sender = sender
        self._tel = settings.telemetry
        self._log = settings.logger
        self._warn = _Throttle(settings.logger)
        self._closing = trio.Event()
        self.queue: MemoryQueue | StorageQueue | None = None
        retry = config.retry_on_failure
        self._retry = retry
        self._tel.declare(RETRIES_METRIC, COUNTER, "Number of failed export attempts that were retried, by reason.")
        self._tel.declare(QUEUE_SIZE_METRIC, GAUGE, "Number of batches in the exporter's sending queue (in memory or on disk).")
        self._tel.declare(QUEUE_CAPACITY_METRIC, GAUGE, "Capacity of the exporter's sending queue, in batches.")

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send until the input ends (then drain) or until cancelled (then flush within the grace).

        Startup raises LookupError when ``sending_queue.storage`` names a
        storage extension that does not run, and OSError for unreadable TLS files.
        """
        qcfg = self.config.sending_queue
        assert self.ports.input is not None, "an exporter needs an input channel"
        if qcfg.enabled:
            self.queue = await self._open_queue()
            queue = self.queue
            self._tel.gauge(QUEUE_SIZE_METRIC, lambda: len(queue))
            self._tel.gauge(QUEUE_CAPACITY_METRIC, lambda: queue.capacity)
        self.sender.open()
        try:
            if self.queue is None:
                await self._run_unqueued(task_status)
            else:
                await self._run_queued(self.queue, task_status)
        finally:
            with trio.CancelScope(shield=True):
                if self.queue is not None:
                    await self._final_flush(self.queue.take_all(), self.queue.finish)
                await self.sender.aclose()

    async def _open_queue(self) -> MemoryQueue | StorageQueue:
        qcfg = self.config.sending_queue
        if qcfg.storage is None:
            return MemoryQueue(qcfg.queue_size)
        storage = self.settings.storage(qcfg.storage)
        name = f"exporter/{self.settings.id}"
        durable = await storage.run_sync(lambda: storage.queue(name, max_items=qcfg.queue_size))
        if len(durable):
            self._log.info("resuming %d queued batches from storage %s", len(durable), storage.path)
        return StorageQueue(durable, qcfg.queue_size)

    async def _run_unqueued(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        assert self.ports.input is not None
        async for batch in self.ports.input:
            if batch.count == 0:
                batch.done(True)
                continue
            item = Item.of(batch)
            try:
                delivered = await self._deliver(item, abandon_when_closing=False)
            except trio.Cancelled:
                # shutdown: the batch in hand gets the last attempt queued leftovers get
                with trio.CancelScope(shield=True):
                    await self._final_flush([item], _finish_batch)
                raise
            except BaseException:
                self._tel.signal_add("exporter_send_failed", item.signal, item.count, reason="shutdown")
                batch.done(False)
                raise
            batch.done(bool(delivered))

    async def _run_queued(self, queue: MemoryQueue | StorageQueue, task_status: trio.TaskStatus[None]) -> None:
        assert self.ports.input is not None
        async with trio.open_nursery() as nursery:
            for _ in range(self.config.sending_queue.num_consumers):
                nursery.start_soon(self._consume, queue)
            task_status.started()
            async for batch in self.ports.input:
                await self._enqueue(queue, batch)
            self._closing.set()
            queue.close()

    async def _enqueue(self, queue: MemoryQueue | StorageQueue, batch: Batch) -> None:
        if batch.count == 0:
            batch.done(True)
            return
        try:
            await queue.put(batch, wait=self.config.sending_queue.block_on_overflow)
        except (QueueFull, StorageError) as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "storage_error"
            self._tel.signal_add("exporter_enqueue_failed", batch.signal, batch.count, reason=reason)
            self._warn.warning(
                reason, "dropping %d %s: the sending queue cannot take them (%s)", batch.count, batch.signal.item_name, exc
            )
            batch.done(False)

    async def _consume(self, queue: MemoryQueue | StorageQueue) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, CorruptItem):
                self._tel.bad_input("corrupt_queue_item")
                self._log.error("removing an unreadable item from the sending queue: %s", item)
                await queue.drop(item.item_id)
                continue
            resolved = False
            try:
                delivered = await self._deliver(item, abandon_when_closing=queue.durable)
                if delivered is None:
                    return  # shutting down; the item stays queued (the finally gives it back)
                await queue.finish(item, delivered)
                resolved = True
            finally:
                if not resolved:
                    queue.give_back(item)

    async def _final_flush(self, leftovers: list[Item], finish: Callable[[Item, bool], Awaitable[None]]) -> None:
        """After cancellation: one attempt per in-memory leftover within the grace; count the rest.

        ``finish`` is called once per item: after it was sent (True) or counted as dropped (False).
        """
        if not leftovers:
            return
        with trio.move_on_after(self.settings.shutdown_grace):
            while leftovers:
                item = leftovers[0]
                outcome = await self.sender.export(item.signal, item.payload)
                leftovers.pop(0)
                if outcome.verdict is Verdict.SENT:
                    self._count_sent(item, outcome)
                    await finish(item, True)
                else:
                    self._tel.signal_add("exporter_send_failed", item.signal, item.count, reason="shutdown")
                    await finish(item, False)
        for item in leftovers:
            self._tel.signal_add("exporter_send_failed", item.signal, item.count, reason="shutdown")
            await finish(item, False)
        if leftovers:
            self._log.warning("shutdown: dropped %d batches that could not be sent in time", len(leftovers))

    # ------------------------------------------------------------ sending

    async def _deliver(self, item: Item, *, abandon_when_closing: bool) -> bool | None:
        """Send one item, retrying as configured. True: sent; False: dropped (counted); None: abandoned at shutdown."""
        backoff: Backoff | None = None
        while True:
            outcome = await self.sender.export(item.signal, item.payload)
            if outcome.verdict is Verdict.SENT:
                self._count_sent(item, outcome)
                return True
            if outcome.verdict is Verdict.PERMANENT or not self._retry.enabled:
                self._drop(item, outcome.reason, outcome)
                return False
            if backoff is None:
                backoff = Backoff(
                    initial=float(self._retry.initial_interval),
                    maximum=float(self._retry.max_interval),
                    multiplier=float(self._retry.multiplier),
                    randomization=float(self._retry.randomization_factor),
                    max_elapsed=float(self._retry.max_elapsed_time),
                    start=trio.current_time(),
                )
            delay = backoff.next_delay(trio.current_time(), outcome.delay)
            if delay is None:
                self._drop(item, "retries_exhausted", outcome)
                return False
            if abandon_when_closing and self._closing.is_set():
                return None
            self._tel.add(RETRIES_METRIC, reason=outcome.reason)
            self._log.debug(
                "export of %d %s to %s failed (%s: %s); retrying in %.2fs",
                item.count, item.signal.item_name, self.sender.target, outcome.reason, outcome.message, delay,
            )
            with trio.move_on_after(delay):
                if abandon_when_closing:
                    await self._closing.wait()
                    return None
                await trio.sleep_forever()

    def _count_sent(self, item: Item, outcome: Outcome) -> None:
        rejected = min(outcome.rejected, item.count)
        self._tel.signal_add("exporter_sent", item.signal, item.count - rejected)
        if rejected or outcome.message:
            self._tel.signal_add("exporter_send_failed", item.signal, rejected, reason="partial_success")
            self._warn.warning(
                "partial_success",
                "partial success: %s rejected %d of %d %s: %s",
                self.sender.target, rejected, item.count, item.signal.item_name, outcome.message or "(no message)",
            )

    def _drop(self, item: Item, reason: str, outcome: Outcome) -> None:
        self._tel.signal_add("exporter_send_failed", item.signal, item.count, reason=reason)
        self._warn.warning(
            reason,
            "dropping %d %s: export to %s failed (%s%s)%s",
            item.count, item.signal.item_name, self.sender.target, outcome.reason,
            f": {outcome.message}" if outcome.message else "",
            "; retries exhausted" if reason == "retries_exhausted" else " and is not retryable" if outcome.verdict is Verdict.PERMANENT else "",
        )


async def _finish_batch(item: Item, delivered: bool) -> None:
    """Finish an unqueued item: tell its batch's sources."""
    if item.batch is not None:
        item.batch.done(delivered)
