"""The ``netflow`` receiver: NetFlow v5/v9, IPFIX and sFlow v5 flows over UDP, as log records and traffic metrics."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import NetflowReceiver
from ._config import Config


def _summary(config: Config) -> str:
    listeners = ", ".join(f"{key.split('.')[1]} {endpoint}" for key, endpoint in config.listeners())
    return listeners + (f"; templates in {config.storage}" if config.storage is not None else "")


factory = Factory(
    type="netflow",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.LOGS, Signal.METRICS}),
    create=NetflowReceiver,
    description="NetFlow v5/v9, IPFIX and sFlow v5 flows from routers, switches and softflowd: a log record per flow, traffic metrics by exporter and protocol.",
    summary=_summary,
)

__all__ = ["factory"]
