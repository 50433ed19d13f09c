"""The ``ebpf`` receiver: process, file, TCP, OOM and signal events from kernel tracepoints (bcc)."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import EbpfReceiver
from ._config import Config
from ._loader import EbpfStartupError


def _summary(config: Config) -> str:
    kinds = [k for k in ("process", "file", "network", "oom", "signal") if getattr(config.events, k)]
    return f"{', '.join(kinds)}; ring buffer {int(config.ring_buffer_size) // 1024} KiB"


factory = Factory(
    type="ebpf",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset(Signal),
    create=EbpfReceiver,
    description="Process, file, TCP, OOM and signal events from kernel tracepoints (bcc), tagged with container ids.",
    summary=_summary,
)

__all__ = ["EbpfReceiver", "EbpfStartupError", "factory"]
