"""Which read positions are delivered: the cursor that may be saved, and where to read again. Pure (no trio, no I/O).

The reader hands the pipeline batches in journal order; each batch's
``on_done`` reports it delivered or not, in any order.

Invariants:
- ``committed`` only moves forward, and only to the cursor of a batch such
  that it and every batch read before it were delivered (or skipped after
  retries ran out, counted in ``dropped``). A crash therefore replays from
  ``committed`` and loses nothing.
- A batch reported not delivered is forgotten with every batch read after
  it (their reports are ignored from then on, as are those of batches read
  until the reader takes the rewind), and ``rewind`` is set to the cursor
  just before it: the reader reads from there again. Batches read
  before it stay pending and may still move ``committed`` up to ``rewind``.
- When the entries at one position keep failing for ``give_up_after``
  seconds (or at once, with retries off), they are skipped: counted in
  ``dropped`` and treated as delivered; the batches read after them stay
  pending and nothing is read again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass(eq=False, slots=True)
class _Span:
    cursor: str
    count: int
    generation: int
    delivered: bool = False
    live: bool = True


#: no rewind is pending
NO_REWIND = object()


def _ignore(delivered: bool) -> None:
    pass


class DeliveryWindow:
    """Batches handed on and not yet known delivered, oldest first.

    Args:
        committed: the position before the first batch (a cursor, or None for "before everything").
        clock: seconds, monotonic (trio's clock in the receiver).
        retry: whether undelivered entries are read again at all.
        give_up_after: how long one position may keep failing before its entries are skipped; 0 never gives up.
        on_change: called (with no arguments) whenever ``committed`` or ``rewind`` changes.
    """

    def __init__(
        self,
        committed: str | None,
        *,
        clock: Callable[[], float],
        retry: bool = True,
        give_up_after: float = 0.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.committed = committed
        #: the cursor to read again from (None: from the very start), or NO_REWIND
        self.rewind: object = NO_REWIND
        #: entries skipped because they could not be delivered
        self.dropped = 0
        self._clock = clock
        self._retry = retry
        self._give_up_after = give_up_after
        self._on_change = on_change
        self._spans: deque[_Span] = deque()
        self._generation = 0
        #: (position that keeps failing, since when)
        self._failing: tuple[str | None, float] | None = None

    @property
    def pending(self) -> int:
        """Batches handed on whose delivery is not known yet (reads being retried not counted)."""
        return sum(1 for s in self._spans if not s.delivered)

    @property
    def last_cursor(self) -> str | None:
        """The newest position read: where reading goes on from."""
        return self._spans[-1].cursor if self._spans else self.committed

    def add(self, cursor: str, count: int) -> Callable[[bool], None]:
        """Record a batch of ``count`` records ending at ``cursor``; returns its ``on_done`` callback.

        A batch of no records (every entry filtered out) is delivered at once.
        A batch read while a rewind is pending is not tracked (it will be read
        again): its report changes nothing.
        """
        if self.rewind is not NO_REWIND:
            return _ignore
        span = _Span(cursor, count, self._generation)
        self._spans.append(span)
        if count == 0:
            self._done(span, True)
        return lambda delivered: self._done(span, delivered)

    def take_rewind(self) -> object:
        """The pending rewind position (clearing it), or NO_REWIND."""
        rewind, self.rewind = self.rewind, NO_REWIND
        return rewind

    def _done(self, span: _Span, delivered: bool) -> None:
        if not span.live or span.delivered:
            return
        if delivered:
            span.delivered = True
            if span.generation == self._generation:
                self._failing = None  # reading makes progress again
            self._advance()
            return
        self._failed(span)

    def _failed(self, span: _Span) -> None:
        spans = list(self._spans)
        index = spans.index(span)
        before = spans[index - 1].cursor if index else self.committed
        now = self._clock()
        if self._failing is None or self._failing[0] != before:
            self._failing = (before, now)
        giving_up = not self._retry or (self._give_up_after > 0 and now - self._failing[1] >= self._give_up_after)
        if giving_up:
            # skipped: counted and treated as delivered; the batches read after it stay pending (their
            # entries are not read again, so not sent twice)
            span.delivered = True
            self.dropped += span.count
            self._failing = None
        else:
            for stale in spans[index:]:
                stale.live = False
            self._spans = deque(spans[:index])
            self._generation += 1
            self.rewind = before
        self._advance()
        self._on_change()

    def _advance(self) -> None:
        moved = False
        while self._spans and self._spans[0].delivered:
            self.committed = self._spans.popleft().cursor
            moved = True
        if moved:
            self._on_change()
