"""The ``kubeapi`` receiver: Kubernetes object changes (pods, nodes, events, workloads) as log records."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import KubeApiReceiver
from ._config import Config


def _summary(config: Config) -> str:
    node = f"${config.filter.node_from_env_var}" if config.filter.node_from_env_var else config.filter.node
    what = ", ".join(dict.fromkeys(o.name for o in config.objects))
    return f"{config.auth_type}; {what}" + (f" of node {node}" if node else "")


factory = Factory(
    type="kubeapi",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset({Signal.LOGS}),
    create=KubeApiReceiver,
    description="Kubernetes object changes (pods with container states, nodes, events, workloads) from list+watch, as log records.",
    summary=_summary,
)

__all__ = ["factory"]
