"""Handing batches on from a receiver whose source cannot wait (a kernel ring buffer): try once, count what is not taken.

Invariants:
- `send_or_count` never waits and never raises for a full or refusing
  pipeline: the batch is either handed on or dropped, and a dropped batch
  is counted by its items, by reason (``pipeline_full``: `trio.WouldBlock`;
  ``refused``: `Refused`) and signal, in the caller's metric and in its
  ``dropped`` totals (which its own metrics report).
"""

from __future__ import annotations

import trio

from tapio.component import Consumer, Refused
from tapio.pdata import Batch
from tapio.telemetry import ComponentTelemetry


def send_or_count(output: Consumer, batch: Batch, telemetry: ComponentTelemetry, metric: str, dropped: dict[str, int]) -> bool:
    """``output.send_nowait(batch)``; False if the batch was dropped (counted in ``metric`` and ``dropped``)."""
    try:
        output.send_nowait(batch)
    except (trio.WouldBlock, Refused) as exc:
        reason = "pipeline_full" if isinstance(exc, trio.WouldBlock) else "refused"
        dropped[reason] = dropped.get(reason, 0) + batch.count
        telemetry.add(metric, batch.count, reason=reason, signal=batch.signal.value)
        return False
    return True
