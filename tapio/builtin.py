"""The component factories that ship with tapio (one import per component module)."""

from __future__ import annotations

from tapio.component import Factory, Registry
from tapio.connectors.correlate import factory as correlate_connector
from tapio.connectors.forward import factory as forward_connector
from tapio.exporters.debug import factory as debug_exporter
from tapio.exporters.file import factory as file_exporter
from tapio.exporters.otlp import grpc_factory as otlp_exporter
from tapio.exporters.otlp import http_factory as otlphttp_exporter
from tapio.exporters.prometheus import factory as prometheus_exporter
from tapio.extensions.storage import factory as storage
from tapio.processors.batch import factory as batch
from tapio.processors.k8sattributes import factory as k8sattributes
from tapio.processors.memory_limiter import factory as memory_limiter
from tapio.receivers.cni_log import factory as cni_log_receiver
from tapio.receivers.cri import factory as cri_receiver
from tapio.receivers.dns_xdp import factory as dns_xdp_receiver
from tapio.receivers.ebpf import factory as ebpf_receiver
from tapio.receivers.etcd_watch import factory as etcd_watch_receiver
from tapio.receivers.journald import factory as journald_receiver
from tapio.receivers.kubeapi import factory as kubeapi_receiver
from tapio.receivers.kubeletstats import factory as kubeletstats_receiver
from tapio.receivers.netflow import factory as netflow_receiver
from tapio.receivers.otlp import factory as otlp_receiver

FACTORIES: list[Factory] = [
    # receivers
    otlp_receiver,
    ebpf_receiver,
    cni_log_receiver,
    kubeapi_receiver,
    journald_receiver,
    etcd_watch_receiver,
    netflow_receiver,
    dns_xdp_receiver,
    cri_receiver,
    kubeletstats_receiver,
    # processors
    batch,
    k8sattributes,
    memory_limiter,
    # exporters
    debug_exporter,
    file_exporter,
    otlp_exporter,
    otlphttp_exporter,
    prometheus_exporter,
    # connectors
    correlate_connector,
    forward_connector,
    # extensions
    storage,
]


def default_registry() -> Registry:
    """Every component type that ships with tapio."""
    return Registry(FACTORIES)
