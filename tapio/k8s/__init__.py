"""Talking to the Kubernetes API: credentials, list+watch shared by the components of a process, GETs.

Used by the ``kubeapi`` receiver and the ``k8sattributes`` processor. The
`kubernetes` package loads credentials (kubeconfig, in-cluster); requests go
over httpx on trio (see `_api` and `_watch` for the invariants).
"""

from ._api import (
    RESOURCE_OF_KIND,
    RESOURCES,
    APIConfig,
    Connection,
    FieldFilter,
    KubeApiError,
    KubeConfigError,
    connect,
    field_selector,
    filter_problems,
    get_object,
    label_selector,
    node_name,
)
from ._watch import REGISTRY, Change, Delivery, SharedWatch, Subscription, WatchRegistry, WatchSpec, decode_blob

__all__ = [
    "APIConfig",
    "Change",
    "Connection",
    "Delivery",
    "FieldFilter",
    "KubeApiError",
    "KubeConfigError",
    "REGISTRY",
    "RESOURCES",
    "RESOURCE_OF_KIND",
    "SharedWatch",
    "Subscription",
    "WatchRegistry",
    "WatchSpec",
    "connect",
    "decode_blob",
    "field_selector",
    "filter_problems",
    "get_object",
    "label_selector",
    "node_name",
]
