"""The ``otlp`` (gRPC) and ``otlphttp`` exporters: OTLP to Jaeger, Tempo or an OTel Collector.

Both queue batches (in memory, or on disk in tapio's storage), send them
from several consumers, retry what a retry may fix and count the rest.
"""

from __future__ import annotations

from tapio.component import Factory, Kind, Ports, Settings
from tapio.pdata import Signal

from ._component import OtlpExporter
from ._config import GrpcExporterConfig, HttpExporterConfig
from ._grpc import GrpcSender
from ._http import HttpSender


def _concurrency(config: GrpcExporterConfig | HttpExporterConfig) -> int:
    q = config.sending_queue
    return max(q.num_consumers, 1) if q.enabled else 1


def _create_grpc(settings: Settings, config: GrpcExporterConfig, ports: Ports) -> OtlpExporter:
    return OtlpExporter(settings, config, ports, GrpcSender(config, _concurrency(config), settings.logger))


def _create_http(settings: Settings, config: HttpExporterConfig, ports: Ports) -> OtlpExporter:
    return OtlpExporter(settings, config, ports, HttpSender(config, _concurrency(config), settings.logger))


def _queue_summary(config: GrpcExporterConfig | HttpExporterConfig) -> str:
    q = config.sending_queue
    if not q.enabled:
        return "no queue"
    where = f"in storage {q.storage}" if q.storage is not None else "in memory"
    return f"queue {q.queue_size} {where}, {q.num_consumers} consumers"


def _grpc_summary(config: GrpcExporterConfig) -> str:
    security = "plaintext" if config.plaintext() else ("mTLS" if config.tls.cert_file else "TLS")
    return f"{config.endpoint} ({security}, {config.compression}, {_queue_summary(config)})"


def _http_summary(config: HttpExporterConfig) -> str:
    return f"{config.endpoint or config.logs_endpoint} ({config.encoding}, {config.compression}, {_queue_summary(config)})"


grpc_factory = Factory(
    type="otlp",
    kind=Kind.EXPORTER,
    config_class=GrpcExporterConfig,
    signals=frozenset(Signal),
    create=_create_grpc,
    description="Sends logs, metrics and traces over OTLP/gRPC, with retries and an optional on-disk queue.",
    summary=_grpc_summary,
)

http_factory = Factory(
    type="otlphttp",
    kind=Kind.EXPORTER,
    config_class=HttpExporterConfig,
    signals=frozenset(Signal),
    create=_create_http,
    description="Sends logs, metrics and traces over OTLP/HTTP (protobuf or JSON), with retries and an optional on-disk queue.",
    summary=_http_summary,
)

__all__ = ["grpc_factory", "http_factory"]
