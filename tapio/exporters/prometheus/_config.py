"""The prometheus exporter's configuration, shaped like the OpenTelemetry Collector's.

Invariants:
- Every field has a default; the default config validates and serves on
  127.0.0.1:9464.
- `validate` reports every problem, each starting with its dotted key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tapio.component import setting
from tapio.units import Duration, parse_listen_address

DEFAULT_ENDPOINT = "127.0.0.1:9464"
#: series kept at most, by default: ~300 bytes of state each, so ~60 MB at the limit
DEFAULT_MAX_SERIES = 200_000

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_NAMESPACE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split the exporter's ``host:port`` (see `tapio.units.parse_listen_address`)."""
    return parse_listen_address(text, example="127.0.0.1:9464")


@dataclass(frozen=True, kw_only=True)
class ResourceToTelemetryConfig:
    enabled: bool = setting(
        False,
        doc="Copy every resource attribute onto every series as a label (they are always in target_info). "
        "Off: only job and instance come from the resource.",
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    endpoint: str = setting(
        DEFAULT_ENDPOINT,
        doc="host:port where /metrics is served ([addr]:port for IPv6; an empty host listens on every interface; port 0 picks a free port).",
    )
    namespace: str = setting("", doc="Prefix for every metric name, joined with '_'; empty means none.")
    const_labels: dict[str, str] = setting(
        default_factory=dict,
        doc="Labels added to every series; empty means none. A data point attribute of the same name wins.",
    )
    send_timestamps: bool = setting(
        False,
        doc="Expose each sample with the timestamp of its data point. Off: Prometheus stamps samples with the scrape time.",
    )
    metric_expiration: Duration = setting(
        Duration(300.0),
        doc="A series not updated for this long is removed (swept on a timer, whether or not anything scrapes). "
        "0 keeps series forever.",
    )
    resource_to_telemetry_conversion: ResourceToTelemetryConfig = setting(
        default_factory=ResourceToTelemetryConfig,
        doc="Resource attributes as labels on every series.",
    )
    enable_open_metrics: bool = setting(
        False,
        doc="Answer scrapers that accept OpenMetrics in that format, with exemplars on counters and histogram buckets. "
        "Off: always the Prometheus text format 0.0.4.",
    )
    add_metric_suffixes: bool = setting(
        True,
        doc="Append unit suffixes (_seconds, _bytes …), _total to counters and _ratio to gauges of unit 1. "
        "Off: names are only sanitised.",
    )
    max_series: int = setting(
        DEFAULT_MAX_SERIES,
        doc="Most series kept (the cardinality limit); data points that would add a series beyond it are refused "
        "and counted. 0 means no limit.",
    )

    def validate(self) -> list[str]:
        problems: list[str] = []
        try:
            parse_endpoint(self.endpoint)
        except ValueError as exc:
            problems.append(f"endpoint: {exc}")
        if self.namespace and not _NAMESPACE.match(self.namespace):
            problems.append(f"namespace: {self.namespace!r} must match [a-zA-Z_:][a-zA-Z0-9_:]*")
        for name in sorted(self.const_labels):
            if not _LABEL_NAME.match(name) or name.startswith("__"):
                problems.append(f"const_labels: label name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]* and not start with '__'")
        if self.metric_expiration < 0:
            problems.append(f"metric_expiration: must not be negative, got {self.metric_expiration}")
        if self.max_series < 0:
            problems.append(f"max_series: must be 0 (no limit) or more, got {self.max_series}")
        return problems
