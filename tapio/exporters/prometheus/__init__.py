"""The ``prometheus`` exporter: OTLP metrics served on /metrics for Prometheus to scrape."""

from __future__ import annotations

from tapio.component import Factory, Kind
from tapio.pdata import Signal

from ._component import PrometheusExporter, create
from ._config import Config


def _summary(config: Config) -> str:
    return f"/metrics on {config.endpoint}" + (", OpenMetrics" if config.enable_open_metrics else "")


factory = Factory(
    type="prometheus",
    kind=Kind.EXPORTER,
    config_class=Config,
    signals=frozenset({Signal.METRICS}),
    create=create,
    description="Serves metrics for Prometheus to scrape on /metrics (text format or OpenMetrics).",
    summary=_summary,
)

__all__ = ["factory", "Config", "PrometheusExporter"]
