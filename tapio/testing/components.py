"""Do-nothing components of type ``nop`` for tests and plug-in authors.

- the receiver emits nothing and runs until cancelled;
- the processor hands every batch on unchanged, counting items in and out;
- the exporter drops every batch, counting its items as sent and marking it done.

All three support every signal and share `NopConfig`, whose fields cover
every type the config decoder understands (int, float, bool, str,
`Duration`, `ByteSize`, ``Literal``, ``list[str]``, ``dict[str, str]``,
``X | None`` and a nested group), so config tests and docs tooling have one
real example of each. The settings change nothing about what the components do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import trio

from tapio.component import Factory, Kind, Ports, Settings, setting
from tapio.pdata import Signal
from tapio.units import ByteSize, Duration

__all__ = ["NopConfig", "NopLimits", "nop_exporter_factory", "nop_processor_factory", "nop_receiver_factory"]


@dataclass(frozen=True, kw_only=True)
class NopLimits:
    max_items: int = setting(1000, doc="Largest number of items in one batch; 0 means no limit.")
    window: Duration = setting(Duration(1.0), doc="Time window the limit applies to; 0s means per batch.")


@dataclass(frozen=True, kw_only=True)
class NopConfig:
    count: int = setting(0, doc="A non-negative count; 0 means none.")
    ratio: float = setting(1.0, doc="A fraction between 0 and 1.")
    delay: Duration = setting(Duration(0.0), doc="A duration; 0s means no delay.")
    max_size: ByteSize = setting(ByteSize(0), doc="A size in bytes; 0 means unlimited.")
    mode: Literal["fast", "safe"] = setting("fast", doc="One of fast or safe.")
    enabled: bool = setting(True, doc="A switch.")
    tags: list[str] = setting(default_factory=list, doc="A list of strings; empty means none.")
    labels: dict[str, str] = setting(default_factory=dict, doc="A string to string mapping; empty means none.")
    endpoint: str | None = setting(None, doc="host:port, or null for none.")
    limits: NopLimits = setting(default_factory=NopLimits, doc="A nested group of settings.")

    def validate(self) -> list[str]:
        problems = []
        if self.count < 0:
            problems.append(f"count: must be 0 or more, got {self.count}")
        if not 0.0 <= self.ratio <= 1.0:
            problems.append(f"ratio: must be between 0 and 1, got {self.ratio:g}")
        if self.limits.max_items < 0:
            problems.append(f"limits.max_items: must be 0 or more, got {self.limits.max_items}")
        if self.endpoint is not None and ":" not in self.endpoint:
            problems.append(f"endpoint: expected host:port, got {self.endpoint!r}")
        return problems


class NopReceiver:
    def __init__(self, settings: Settings, config: NopConfig, ports: Ports) -> None:
        self.settings, self.config, self.ports = settings, config, ports

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


class NopProcessor:
    def __init__(self, settings: Settings, config: NopConfig, ports: Ports) -> None:
        if ports.input is None or ports.output is None:
            raise ValueError("a processor needs both an input and an output")
        self.settings, self.config, self.ports = settings, config, ports

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.ports.input is not None and self.ports.output is not None
        telemetry = self.settings.telemetry
        task_status.started()
        async for batch in self.ports.input:
            telemetry.add("tapio_processor_incoming_items_total", batch.count)
            await self.ports.output.send(batch)
            telemetry.add("tapio_processor_outgoing_items_total", batch.count)


class NopExporter:
    def __init__(self, settings: Settings, config: NopConfig, ports: Ports) -> None:
        if ports.input is None:
            raise ValueError("an exporter needs an input")
        self.settings, self.config, self.ports = settings, config, ports

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.ports.input is not None
        task_status.started()
        async for batch in self.ports.input:
            self.settings.telemetry.signal_add("exporter_sent", batch.signal, batch.count)
            batch.done(True)


_ALL_SIGNALS = frozenset(Signal)

nop_receiver_factory = Factory(
    type="nop",
    kind=Kind.RECEIVER,
    config_class=NopConfig,
    signals=_ALL_SIGNALS,
    create=NopReceiver,
    description="Emits nothing; runs until cancelled (for tests).",
)
nop_processor_factory = Factory(
    type="nop",
    kind=Kind.PROCESSOR,
    config_class=NopConfig,
    signals=_ALL_SIGNALS,
    create=NopProcessor,
    description="Passes batches on unchanged (for tests).",
)
nop_exporter_factory = Factory(
    type="nop",
    kind=Kind.EXPORTER,
    config_class=NopConfig,
    signals=_ALL_SIGNALS,
    create=NopExporter,
    description="Drops batches, counting them as sent (for tests).",
)
