"""One worker thread for the whole life of a journal handle, driven from trio.

Why not `trio.to_thread.run_sync` call by call: libsystemd's sd_journal
objects are "thread-agnostic", but "only a single specific thread may
operate on a given object during its entire lifetime" (sd-journal(3)), and
trio's thread cache gives no such promise. So the handle lives on one
thread started through trio's own thread machinery
(`trio.lowlevel.start_thread_soon`), owned by the `open_worker` context
manager: it is the capacity limiter (one call at a time) and ends before the
context manager returns.

Invariants:
- Calls run one at a time, in submission order, on the same thread.
- Every `Worker.call` has a deadline; a call that overruns raises
  `WorkerTimeout` in trio (the thread finishes the call on its own; what it
  returns is discarded).
- A call that trio gave up on (cancelled, timed out) still runs to its end
  before the next one starts, so a handle is never used by two calls at once.
"""

from __future__ import annotations

import queue
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class WorkerTimeout(Exception):
    """A blocking call did not finish within its deadline."""


class Worker:
    """Runs blocking calls on its one thread; make it with `open_worker`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False

    async def call(self, fn: Callable[..., T], *args, timeout: float) -> T:
        """``fn(*args)`` on the worker thread; its result or exception here.

        Raises `WorkerTimeout` after ``timeout`` seconds, RuntimeError once the worker is closed.
        """
        if self._closed:
            raise RuntimeError(f"{self.name}: the worker thread has stopped")
        done = trio.Event()
        box: list[outcome.Outcome] = []
        self._jobs.put((fn, args, box, done))
        with trio.move_on_after(timeout) as scope:
            await done.wait()
        if scope.cancelled_caught:
            raise WorkerTimeout(f"{self.name}: {getattr(fn, '__name__', 'a call')} took more than {timeout:g}s")
        return box[0].unwrap()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, box, done = job
            box.append(outcome.capture(fn, *args))
            try:
                trio.from_thread.run_sync(done.set, trio_token=self._token)
            except trio.RunFinishedError:
                return

    def _stop(self) -> None:
        self._closed = True
        self._jobs.put(_STOP)


@asynccontextmanager
async def open_worker(name: str, *, close_timeout: float) -> AsyncIterator[Worker]:
    """A `Worker` whose thread runs until the block ends.

    On the way out (also when cancelled) the thread is told to stop after the
    calls already submitted, and waited for up to ``close_timeout`` seconds;
    a thread stuck in a call longer than that is left to finish it and exit.
    """
    worker = Worker(name)
    finished = trio.Event()

    def deliver(result: outcome.Outcome) -> None:
        # runs in the worker thread when _loop returns
        try:
            trio.from_thread.run_sync(finished.set, trio_token=worker._token)
        except trio.RunFinishedError:
            pass

    trio.lowlevel.start_thread_soon(worker._loop, deliver, name=f"tapio {name}")
    try:
        yield worker
    finally:
        worker._stop()
        with trio.CancelScope(shield=True), trio.move_on_after(close_timeout):
            await finished.wait()
