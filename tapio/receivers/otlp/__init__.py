"""The ``otlp`` receiver: OTLP over gRPC and HTTP (protobuf or JSON), as the OTel Collector's otlpreceiver."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import OtlpReceiver
from ._config import Config


def _summary(config: Config) -> str:
    parts = []
    if config.protocols.grpc is not None:
        parts.append(f"grpc {config.protocols.grpc.endpoint}")
    if config.protocols.http is not None:
        parts.append(f"http {config.protocols.http.endpoint}")
    return ", ".join(parts) or "no protocols"


factory = Factory(
    type="otlp",
    kind=Kind.RECEIVER,
    config_class=Config,
    signals=frozenset(Signal),
    create=OtlpReceiver,
    description="Receives OTLP logs, metrics and traces over gRPC and HTTP (protobuf or JSON).",
    summary=_summary,
)

__all__ = ["factory"]
