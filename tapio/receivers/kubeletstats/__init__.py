"""The ``kubeletstats`` receiver: node, pod, container and volume metrics from the kubelet's /stats/summary."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import KubeletStatsReceiver
from ._config import Config


def _summary(config: Config) -> str:
    return f"{config.endpoint} ({config.auth_type}, every {float(config.collection_interval):g}s: {', '.join(config.metric_groups)})"


factory = Factory(
    type="kubeletstats",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.METRICS}),
    create=KubeletStatsReceiver,
    description="Node, pod, container and volume CPU, memory, filesystem and network metrics from the kubelet's /stats/summary, with limit utilisation.",
    summary=_summary,
)

__all__ = ["factory"]
