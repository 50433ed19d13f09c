"""The ``forward`` connector: hands every batch from the pipelines it ends to those it starts, unchanged.

As the OpenTelemetry Collector's forward connector: it joins pipelines of
one signal, for example to run a shared tail (batch, export) behind
several pipelines with their own processors, or to fan one pipeline out
into differently processed ones.

Invariants:
- A batch goes on whole and unchanged, with its delivery callbacks: its
  sources hear "delivered" only when the pipelines after the connector
  delivered it.
- It ends when its input ends (every pipeline feeding it drained); what it
  holds when cancelled is one batch at most, reported not delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from tapio.component import Factory, Kind, Ports, Refused, Settings
from tapio.pdata import Signal

__all__ = ["factory"]


@dataclass(frozen=True, kw_only=True)
class ForwardConfig:
    """``forward`` has no settings."""

    def validate(self) -> list[str]:
        return []


class Forward:
    def __init__(self, settings: Settings, config: ForwardConfig, ports: Ports) -> None:
        assert ports.input is not None and ports.output is not None, "a connector needs an input and an output"
        self._input = ports.input
        self._output = ports.output

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for batch in self._input:
            try:
                await self._output.send(batch)
            except Refused:
                continue  # a stage after it (a memory limiter) refused it: counted there, its sources told
            except trio.Cancelled:
                batch.done(False)
                raise


def _create(settings: Settings, config: Any, ports: Ports) -> Forward:
    return Forward(settings, config, ports)


factory = Factory(
    type="forward",
    kind=Kind.CONNECTOR,
    config_class=ForwardConfig,
    signals=frozenset(Signal),
    connects=frozenset((s, s) for s in Signal),
    create=_create,
    description="Joins pipelines of one signal: what the pipelines it ends export goes into those it starts, unchanged.",
)
