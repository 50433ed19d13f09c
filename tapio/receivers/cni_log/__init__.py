"""The ``cni-log`` receiver: tails CNI plugin log files and turns each line into a structured log record."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import CniLogReceiver
from ._config import Config


def _summary(config: Config) -> str:
    shown = ", ".join(config.include[:3]) + (f" and {len(config.include) - 3} more" if len(config.include) > 3 else "")
    return f"tailing {shown}" + (f" (storage {config.storage})" if config.storage is not None else "")


factory = Factory(
    type="cni-log",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.LOGS}),
    create=CniLogReceiver,
    description="Tails CNI plugin logs (Calico, Cilium, Multus, AWS VPC CNI, Azure, key=value) into structured log records, resuming after delivery.",
    summary=_summary,
)

__all__ = ["factory"]
