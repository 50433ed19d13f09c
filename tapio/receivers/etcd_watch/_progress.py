"""Which revision of a watched prefix is delivered: the position the checkpoint may record.

Invariants:
- ``delivered`` only grows (until `reset`), and is a revision R such that every batch
  handed on with a revision <= R was reported delivered (`Batch.done(True)`):
  a restart from R + 1 loses nothing.
- Batches are registered in the order they are handed on, with
  non-decreasing revisions; they may report in any order.
- A batch reported not delivered stops ``delivered`` for good (until the
  next start, which replays from the checkpoint): nothing after it is
  tracked any more, so a failing pipeline cannot grow this state.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import trio

_PENDING, _DONE = 0, 1


class _Entry:
    __slots__ = ("revision", "state")

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.state = _PENDING


class DeliveryProgress:
    """The delivered position of one prefix; ``changed`` wakes a checkpoint writer."""

    def __init__(self, delivered: int) -> None:
        #: every change at or below this revision is delivered
        self.delivered = delivered
        #: a batch was not delivered: ``delivered`` stays where it is
        self.stuck_at: int | None = None
        self._entries: deque[_Entry] = deque()
        self._changed = trio.Event()
        #: bumped by `reset`: reports of batches tracked before it are ignored
        self._epoch = 0
        #: called (in trio, from a batch's done report) whenever ``delivered`` moves
        self.on_advance: Callable[[int], None] | None = None

    def track(self, revision: int) -> Callable[[bool], None]:
        """Register a batch reaching up to ``revision``; returns its ``on_done`` callback."""
        if self.stuck_at is not None:
            return _ignore
        entry = _Entry(revision)
        self._entries.append(entry)
        epoch = self._epoch

        def done(delivered: bool) -> None:
            if entry.state != _PENDING or self.stuck_at is not None or epoch != self._epoch:
                return
            if not delivered:
                self.stuck_at = self.delivered
                self._entries.clear()
                self._wake()
                return
            entry.state = _DONE
            self._advance()

        return done

    def passed(self, revision: int) -> None:
        """Nothing up to ``revision`` needs delivering beyond what is registered (a progress notice, a fresh start)."""
        if self.stuck_at is not None:
            return
        if self._entries:
            # it counts once the batches before it are delivered
            entry = _Entry(revision)
            entry.state = _DONE
            self._entries.append(entry)
            self._advance()
        elif revision > self.delivered:
            self.delivered = revision
            self._moved()

    def reset(self) -> None:
        """Start over at revision 0 (the positions held were of another cluster); batches in flight no longer count."""
        self._epoch += 1
        self._entries.clear()
        self.delivered = 0
        self.stuck_at = None
        self._wake()

    @property
    def in_flight(self) -> int:
        """Batches handed on and not reported yet."""
        return sum(1 for e in self._entries if e.state == _PENDING)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _advance(self) -> None:
        entries, moved = self._entries, False
        while entries and entries[0].state == _DONE:
            revision = entries.popleft().revision
            if revision > self.delivered:
                self.delivered = revision
                moved = True
        if moved:
            self._moved()

    def _moved(self) -> None:
        self._wake()
        if self.on_advance is not None:
            self.on_advance(self.delivered)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _ignore(delivered: bool) -> None:
    pass
