"""Handing received batches to the pipeline, and deciding when to acknowledge them.

Invariants:
- With ``acknowledge: accepted`` a request is acknowledged once its batch is
  in the pipeline (the OpenTelemetry Collector's behaviour); with
  ``delivered``, only once every exporter reported it delivered or durably
  queued (`Batch.done(True)`), so a crash of tapio after the answer cannot
  lose it. Anything else — refused, not delivered, shutting down, out of
  time — is answered as retryable, never as success.
- `close` (at shutdown) releases every request still waiting: they are told
  to retry, because nothing after that point is promised.
"""

from __future__ import annotations

import trio

from tapio.component import Consumer, Refused
from tapio.pdata import Batch

#: why a batch was not acknowledged, as told to the client
REFUSAL_TEXT = {
    "closed": "the receiver is shutting down",
    "refused": "the pipeline refused the data (over its memory limit)",
    "timeout": "the pipeline did not take the data in time",
    "not_delivered": "the data could not be delivered or durably queued",
}


class Delivery:
    """Hands batches to a consumer in trio, from trio or from foreign threads, cancellably.

    Create it in trio; call `deliver` from trio, `deliver_from_thread` from any
    other thread (gRPC handlers), and `close` from trio at shutdown.
    """

    def __init__(self, output: Consumer, *, wait_for_delivery: bool = False, delivery_timeout: float | None = None) -> None:
        self._output = output
        self._wait = wait_for_delivery
        self._delivery_timeout = delivery_timeout
        self._token = trio.lowlevel.current_trio_token()
        self._scopes: set[trio.CancelScope] = set()
        self._closing = False

    def deliver_from_thread(self, batch: Batch, timeout: float | None) -> str | None:
        """`deliver` from a foreign thread."""
        try:
            return trio.from_thread.run(self.deliver, batch, timeout, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            return "closed"

    async def deliver(self, batch: Batch, timeout: float | None = None) -> str | None:
        """Send ``batch``, waiting while the pipeline is full (and, if so configured, until it was delivered).

        Returns None when the batch may be acknowledged, else a key of
        `REFUSAL_TEXT` saying why not. ``timeout`` (seconds) bounds the wait,
        e.g. a gRPC call's remaining deadline.
        """
        if self._closing:
            return "closed"
        outcome: list[bool] = []
        settled = trio.Event()
        if self._wait:
            def on_done(delivered: bool) -> None:
                outcome.append(delivered)
                settled.set()

            batch.on_done.append(on_done)
        limits = [t for t in (timeout, self._delivery_timeout if self._wait else None) if t is not None]
        with trio.CancelScope() as scope:
            if limits:
                scope.deadline = trio.current_time() + min(limits)
            self._scopes.add(scope)
            try:
                await self._output.send(batch)
                if not self._wait:
                    return None
                await settled.wait()
                return None if outcome[0] else "not_delivered"
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "closed"
            except Refused:
                return "refused"
            finally:
                self._scopes.discard(scope)
        return "closed" if self._closing else "timeout"

    def close(self) -> None:
        """Refuse new deliveries and release those still waiting (they are told to retry)."""
        self._closing = True
        for scope in list(self._scopes):
            scope.cancel()
