"""A consumer that records what it is handed, for component tests and plug-in authors.

Invariants:
- `RecordingConsumer.batches` holds every accepted batch in arrival order,
  the same objects that were handed in; `received_at` holds the trio clock
  time of each (so tests under ``autojump_clock`` can assert timing), and
  `item_count` the sum of their ``count``.
- Waiting helpers wake on the change itself (a trio.Event per change), never
  by polling, so they cost no time under ``autojump_clock``.
- The consumer reports batches done only when asked to (``ack``): by
  default a test decides when and how sources hear about their records.
"""

from __future__ import annotations

from typing import Callable, Iterable

import trio

from tapio.pdata import Batch, Request, Signal


class RecordingConsumer:
    """Implements the `tapio.component.Consumer` protocol by keeping every batch.

    Args:
        signals: the signals it says it is wired for (all, by default).
        ack: None leaves ``Batch.done`` to the test; True or False calls
            ``batch.done(ack)`` as soon as a batch is recorded, as an
            exporter would after sending (or failing to).

    Backpressure: after `pause()`, ``send`` waits and ``send_nowait``
    raises `trio.WouldBlock` until `resume()`.
    """

    def __init__(self, signals: Iterable[Signal] = tuple(Signal), *, ack: bool | None = None) -> None:
        self.signals: frozenset[Signal] = frozenset(signals)
        self.batches: list[Batch] = []
        self.received_at: list[float] = []
        self.item_count = 0
        self._ack = ack
        self._changed = trio.Event()
        self._open = trio.Event()
        self._open.set()

    # -- the Consumer protocol

    async def send(self, batch: Batch) -> None:
        while not self._open.is_set():
            await self._open.wait()
        await trio.lowlevel.checkpoint()
        self._record(batch)

    def send_nowait(self, batch: Batch) -> None:
        if not self._open.is_set():
            raise trio.WouldBlock
        self._record(batch)

    def has_room(self) -> bool:
        return self._open.is_set()

    # -- backpressure

    def pause(self) -> None:
        """Stop accepting: senders wait (or are refused) until `resume`."""
        if self._open.is_set():
            self._open = trio.Event()

    def resume(self) -> None:
        self._open.set()

    # -- waiting and reading

    async def wait_for_count(self, n: int) -> None:
        """Wait until at least ``n`` items (``Batch.count`` summed) were recorded."""
        await self.wait_until(lambda: self.item_count >= n)

    async def wait_for_batches(self, n: int) -> None:
        """Wait until at least ``n`` batches were recorded."""
        await self.wait_until(lambda: len(self.batches) >= n)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` is true, checking it after every recorded batch.

        Put a deadline around it (``trio.fail_after``): it waits forever otherwise.
        """
        while not condition():
            await self._changed.wait()

    def requests(self) -> list[Request]:
        """Every recorded export request, in order."""
        return [r for b in self.batches for r in b.requests]

    def clear(self) -> None:
        """Forget what was recorded (waiters keep waiting for new batches)."""
        self.batches.clear()
        self.received_at.clear()
        self.item_count = 0

    def _record(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.received_at.append(trio.current_time())
        self.item_count += batch.count
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        if self._ack is not None:
            batch.done(self._ack)
