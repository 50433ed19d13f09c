"""The ``k8sattributes`` processor: adds the pod's Kubernetes attributes to the resources of records from pods."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import K8sAttributesProcessor
from ._config import Config


def _summary(config: Config) -> str:
    if config.passthrough:
        return "passthrough (k8s.pod.ip from the connection only)"
    scope = []
    if config.filter.node_from_env_var:
        scope.append(f"node ${config.filter.node_from_env_var}")
    elif config.filter.node:
        scope.append(f"node {config.filter.node}")
    if config.filter.namespace:
        scope.append(f"namespace {config.filter.namespace}")
    return f"{config.auth_type}; pods of {', '.join(scope) or 'the whole cluster'}; {len(config.extract.metadata)} attributes"


factory = Factory(
    type="k8sattributes",
    kind=Kind.PROCESSOR,
    config_class=Config,
    signals=frozenset(Signal),
    create=K8sAttributesProcessor,
    description="Adds pod, namespace, node, owner, label and annotation attributes to the resources of records from Kubernetes pods.",
    mutates_data=True,
    keeps_raw=True,
    summary=_summary,
)

__all__ = ["factory"]
