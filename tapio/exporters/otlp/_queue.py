"""The sending queue between an exporter's input and its senders: in memory or in tapio's storage.

Invariants:
- A queue holds at most its capacity of batches: `put` raises `QueueFull`
  (keeping nothing) or, with ``wait=True``, waits for room.
- Every item handed out by `get` is resolved exactly once by the consumer:
  `finish` (sent, or dropped and counted) or `give_back` (not sent because
  of shutdown). In memory, a given-back item is handed out again first; in
  storage it stays on disk for the next `get` or the next process.
- Storage-backed: an item is on disk (committed) when `put` returns, and
  leaves the disk only through `finish`; so a crash at any point re-sends
  instead of losing (at least once). Items are handed out in put order.
- After `close`, `get` returns None once nothing is left to hand out (in
  memory: the queue is empty; in storage: the disk holds nothing that is not
  already handed out).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass

import trio

from tapio.pdata import Batch, Signal
from tapio.storage import DurableQueue
from tapio.storage import QueueFull as StorageQueueFull

#: items read from disk at once (held in memory until handed out)
PREFETCH = 8
#: a stored item: a signal tag, the item count, then the serialized export request
_HEADER = struct.Struct("<cI")
_TAGS = {Signal.LOGS: b"L", Signal.METRICS: b"M", Signal.TRACES: b"T"}
_SIGNALS = {v: k for k, v in _TAGS.items()}


class QueueFull(Exception):
    """The sending queue has no room for the batch."""


class CorruptItem(Exception):
    """A stored item could not be read back (carries its id so it can be removed)."""

    def __init__(self, item_id: int, why: str) -> None:
        super().__init__(why)
        self.item_id = item_id


@dataclass(slots=True, eq=False)
class Item:
    """One batch on its way out: what to send and whom to tell."""

    signal: Signal
    count: int
    #: the serialized export request; for in-memory items made on first use
    _payload: bytes | None = None
    #: in-memory items keep their batch, to report done after sending
    batch: Batch | None = None
    #: storage row id (0 in memory)
    id: int = 0

    @classmethod
    def of(cls, batch: Batch) -> "Item":
        return cls(batch.signal, batch.count, None, batch)

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            assert self.batch is not None
            self._payload = self.batch.to_bytes()
        return self._payload


def encode_item(signal: Signal, count: int, payload: bytes) -> bytes:
    return _HEADER.pack(_TAGS[signal], count) + payload


def decode_item(item_id: int, data: bytes) -> Item:
    """Raises CorruptItem for data not written by `encode_item`."""
    if len(data) < _HEADER.size:
        raise CorruptItem(item_id, f"item {item_id} is {len(data)} bytes, shorter than its header")
    tag, count = _HEADER.unpack_from(data)
    signal = _SIGNALS.get(tag)
    if signal is None:
        raise CorruptItem(item_id, f"item {item_id} has an unknown signal tag {tag!r}")
    return Item(signal, count, data[_HEADER.size :], None, item_id)


class MemoryQueue:
    """Batches in memory; lost if the process dies (their sources were not told they were delivered)."""

    durable = False

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.deque[Item] = collections.deque()
        self._closed = False
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def put(self, batch: Batch, *, wait: bool) -> None:
        """Queue ``batch``; its ``done`` is called by whoever finishes it."""
        while len(self._items) >= self.capacity:
            if not wait:
                raise QueueFull(f"{len(self._items)} batches queued (queue_size {self.capacity})")
            await self._changed.wait()
        self._items.append(Item.of(batch))
        self._notify()
        await trio.lowlevel.checkpoint()

    async def get(self) -> Item | None:
        while not self._items:
            if self._closed:
                return None
            await self._changed.wait()
        item = self._items.popleft()
        self._notify()
        return item

    async def finish(self, item: Item, delivered: bool) -> None:
        if item.batch is not None:
            item.batch.done(delivered)

    def give_back(self, item: Item) -> None:
        self._items.appendleft(item)
        self._notify()

    def take_all(self) -> list[Item]:
        """Remove and return everything still queued (for the final flush)."""
        items, self._items = list(self._items), collections.deque()
        self._notify()
        return items

    def close(self) -> None:
        self._closed = True
        self._notify()


class StorageQueue:
    """Batches in a `DurableQueue` of tapio's storage: they survive restarts and crashes."""

    durable = True

    def __init__(self, queue: DurableQueue, capacity: int) -> None:
        self.capacity = capacity
        self._queue = queue
        self._buffer: collections.deque[Item | CorruptItem] = collections.deque()
        self._given_back: collections.deque[Item] = collections.deque()
        #: highest id read from disk so far: the next peek starts after it
        self._last_read = 0
        self._closed = False
        self._changed = trio.Event()
        self._read_lock = trio.Lock()

    def __len__(self) -> int:
        return len(self._queue)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def put(self, batch: Batch, *, wait: bool) -> None:
        """Write ``batch`` to disk (one transaction), then report it done: its sources may forget it."""
        data = encode_item(batch.signal, batch.count, batch.to_bytes())
        while True:
            changed = self._changed
            try:
                await self._queue.aput(data)
                break
            except StorageQueueFull as exc:
                if not wait:
                    raise QueueFull(str(exc)) from None
                await changed.wait()
        self._notify()
        batch.done(True)

    async def get(self) -> Item | CorruptItem | None:
        """The next item (or a `CorruptItem` to be removed with `drop_corrupt`), None once closed and drained."""
        while True:
            if self._given_back:
                return self._given_back.popleft()
            if self._buffer:
                return self._buffer.popleft()
            changed = self._changed
            async with self._read_lock:
                if not self._buffer:
                    rows = await self._queue.apeek(PREFETCH, after=self._last_read)
                    for item_id, data in rows:
                        self._last_read = item_id
                        try:
                            self._buffer.append(decode_item(item_id, data))
                        except CorruptItem as exc:
                            self._buffer.append(exc)
            if self._buffer or self._given_back:
                continue
            if self._closed:
                return None
            await changed.wait()

    async def finish(self, item: Item, delivered: bool) -> None:
        """Remove a sent (or dropped) item from disk."""
        await self.drop(item.id)

    async def drop(self, item_id: int) -> None:
        await self._queue.aack([item_id])
        self._notify()

    def give_back(self, item: Item) -> None:
        self._given_back.appendleft(item)
        self._notify()

    def take_all(self) -> list[Item]:
        return []  # what is left stays on disk

    def close(self) -> None:
        self._closed = True
        self._notify()
