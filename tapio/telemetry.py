"""tapio's own metrics: counters and gauges per component, rendered for Prometheus.

Invariants:
- Every metric name starts with ``tapio_`` and is declared once, with its
  kind and help text, in `METRICS` or by `Telemetry.declare`; adding to an
  undeclared name is a programming error (raises KeyError).
- Counter values only grow. A series is identified by the metric name and
  its sorted label pairs; labels always include the component id label
  (``receiver``, ``processor`` or ``exporter``) for component metrics.
- Gauges are read from callbacks at scrape time, so they cost nothing
  between scrapes.

Names follow the OpenTelemetry Collector's ``otelcol_*`` internal metrics,
with the ``_total`` suffix Prometheus uses for counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from tapio.pdata import Signal
from tapio.promtext import COUNTER, GAUGE


@dataclass(frozen=True, slots=True)
class MetricInfo:
    kind: str
    help: str


def _signal_counters(prefix: str, what: str, help_fmt: str) -> dict[str, MetricInfo]:
    return {
        f"tapio_{prefix}_{what}_{s.item_name}_total": MetricInfo(COUNTER, help_fmt.format(items=s.item_name.replace("_", " ")))
        for s in Signal
    }


METRICS: dict[str, MetricInfo] = {
    **_signal_counters("receiver", "accepted", "Number of {items} successfully pushed into the pipeline."),
    **_signal_counters("receiver", "refused", "Number of {items} that could not be pushed into the pipeline."),
    **_signal_counters("exporter", "sent", "Number of {items} successfully sent to the destination."),
    **_signal_counters("exporter", "send_failed", "Number of {items} the exporter failed to send and dropped."),
    **_signal_counters("exporter", "enqueue_failed", "Number of {items} that could not be added to the exporter's queue."),
    **_signal_counters("connector", "emitted", "Number of {items} a connector handed on into the pipelines it feeds."),
    **_signal_counters("connector", "refused", "Number of {items} a connector could not hand on into the pipelines it feeds."),
    "tapio_processor_incoming_items_total": MetricInfo(COUNTER, "Number of items passed to the processor."),
    "tapio_processor_outgoing_items_total": MetricInfo(COUNTER, "Number of items emitted by the processor."),
    "tapio_processor_dropped_items_total": MetricInfo(COUNTER, "Number of items the processor dropped, by reason."),
    "tapio_exporter_queue_size": MetricInfo(GAUGE, "Number of batches waiting in the exporter's queue."),
    "tapio_exporter_queue_capacity": MetricInfo(GAUGE, "Capacity of the exporter's queue, in batches."),
    "tapio_component_restarts_total": MetricInfo(COUNTER, "Number of times a component failed while running and was restarted."),
    "tapio_component_failures_total": MetricInfo(COUNTER, "Number of times a component failed while running."),
    "tapio_component_starts_total": MetricInfo(COUNTER, "Number of times a component started: once at startup, once per restart, and once per reload that replaced it."),
    "tapio_config_reloads_total": MetricInfo(COUNTER, "Number of configuration reloads, by result: applied, refused (invalid, or a change that needs a restart) or failed (a new component did not start; the old graph kept running)."),
    "tapio_bad_input_total": MetricInfo(COUNTER, "Number of malformed inputs (packets, lines, requests) counted and skipped, by component and reason."),
}

LabelKey = tuple[tuple[str, str], ...]


class Telemetry:
    """All of tapio's own metrics for one running service (no global state)."""

    def __init__(self) -> None:
        self._info: dict[str, MetricInfo] = dict(METRICS)
        self._values: dict[str, dict[LabelKey, float]] = {}
        self._gauges: list[tuple[str, LabelKey, Callable[[], float]]] = []

    def declare(self, name: str, kind: str, help: str) -> None:
        """Declare a component-specific metric (idempotent for the same kind)."""
        if not name.startswith("tapio_"):
            raise ValueError(f"metric {name!r} must start with tapio_")
        old = self._info.get(name)
        if old is not None and old.kind != kind:
            raise ValueError(f"metric {name!r} already declared as a {old.kind}")
        self._info[name] = MetricInfo(kind, help)

    def add(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        info = self._info[name]
        if info.kind != COUNTER:
            raise ValueError(f"{name} is a {info.kind}, not a counter")
        if value < 0:
            raise ValueError(f"counter {name} cannot decrease (got {value})")
        key = tuple(sorted(labels.items()))
        series = self._values.setdefault(name, {})
        series[key] = series.get(key, 0.0) + value

    def gauge(self, name: str, labels: Mapping[str, str], read: Callable[[], float]) -> None:
        """Register a gauge whose value is read by calling ``read`` at collection time (replacing one with the same labels)."""
        if self._info[name].kind != GAUGE:
            raise ValueError(f"{name} is not a gauge")
        key = tuple(sorted(labels.items()))
        # A restarted component registers its gauges again: the newest callback replaces the old.
        self._gauges = [g for g in self._gauges if (g[0], g[1]) != (name, key)]
        self._gauges.append((name, key, read))

    def remove_gauges(self, labels: Mapping[str, str]) -> None:
        """Stop reporting the gauges whose labels include ``labels`` (a component a reload removed)."""
        want = set(labels.items())
        self._gauges = [g for g in self._gauges if not want <= set(g[1])]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the series of ``name`` whose labels include ``labels`` (for tests and health)."""
        want = set(labels.items())
        total = 0.0
        for key, v in self._values.get(name, {}).items():
            if want <= set(key):
                total += v
        for gname, key, read in self._gauges:
            if gname == name and want <= set(key):
                total += read()
        return total

    def collect(self) -> Iterable[tuple[str, MetricInfo, list[tuple[LabelKey, float]]]]:
        """Every declared metric with its current series, sorted by name."""
        gauges: dict[str, list[tuple[LabelKey, float]]] = {}
        for name, key, read in self._gauges:
            try:
                gauges.setdefault(name, []).append((key, float(read())))
            except Exception:  # a gauge callback must never break a scrape
                continue
        for name in sorted(self._info):
            info = self._info[name]
            series = sorted(self._values.get(name, {}).items()) if info.kind == COUNTER else sorted(gauges.get(name, []))
            yield name, info, series

    def for_component(self, kind: str, component_id: str, **extra: str) -> "ComponentTelemetry":
        return ComponentTelemetry(self, {kind: component_id, **extra})


class ComponentTelemetry:
    """A `Telemetry` view bound to one component's labels, handed to it in its settings."""

    def __init__(self, telemetry: Telemetry, labels: Mapping[str, str]) -> None:
        self.telemetry = telemetry
        self.labels = dict(labels)

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        if value:
            self.telemetry.add(name, value, {**self.labels, **labels})

    def signal_add(self, what: str, signal: Signal, value: float, **labels: str) -> None:
        """Add to the per-signal counter, e.g. ``signal_add("exporter_sent", Signal.LOGS, 100)``."""
        if value:
            self.telemetry.add(f"tapio_{what}_{signal.item_name}_total", value, {**self.labels, **labels})

    def bad_input(self, reason: str, value: float = 1) -> None:
        """Count malformed input that was skipped."""
        self.add("tapio_bad_input_total", value, reason=reason)

    def gauge(self, name: str, read: Callable[[], float], **labels: str) -> None:
        self.telemetry.gauge(name, {**self.labels, **labels}, read)

    def declare(self, name: str, kind: str, help: str) -> None:
        self.telemetry.declare(name, kind, help)
