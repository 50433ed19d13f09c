"""The ``correlate`` connector: joins log records from different layers (kernel, Kubernetes, CNI, systemd, DNS) into incidents, sent as traces."""

from __future__ import annotations

from typing import Any

from tapio.component import Factory, Kind, Ports, Settings
from tapio.pdata import Signal

from ._config import CorrelateConfig

__all__ = ["factory"]


def _create(settings: Settings, config: Any, ports: Ports) -> Any:
    from ._component import Correlate

    return Correlate(settings, config, ports)


factory = Factory(
    type="correlate",
    kind=Kind.CONNECTOR,
    config_class=CorrelateConfig,
    signals=frozenset({Signal.LOGS}),
    connects=frozenset({(Signal.LOGS, Signal.TRACES), (Signal.LOGS, Signal.LOGS), (Signal.LOGS, Signal.METRICS)}),
    create=_create,
    mutates_data=True,
    description="Joins log records of the kernel, Kubernetes, CNI plugins, systemd and DNS into incidents (OOM kills, pod network failures, node service failures, DNS failure storms, crash loops), sent as traces, logs and a counter.",
)
