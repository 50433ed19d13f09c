"""The running prometheus exporter: takes metrics batches into its state and serves them on /metrics.

Invariants:
- The listener is bound before ``task_status.started()``; a bind failure is
  raised plainly, naming the component and the address.
- Batches are taken into the state on the trio thread, one request at a
  time with a checkpoint between requests, and a scrape renders the state
  on the trio thread too, so a scrape always sees whole requests. Only
  compression runs in a worker thread, on the already rendered bytes.
- Every data point handed in is counted once: ``exporter_sent`` when it is
  in the state, ``exporter_send_failed{reason}`` when it was refused; a
  batch is reported delivered only when none of its points was refused.
- Expired series are swept on a timer whether or not anything scrapes, so
  the state cannot grow while nobody is looking.
- When the input ends the exporter stops serving and returns.
"""

from __future__ import annotations

import gzip
from typing import Any

import trio

from tapio.component import Ports, Settings
from tapio.httpserver import SCRAPE_LIMITS, Request, Response, bound_port, open_http_listeners, serve_http_listeners
from tapio.pdata import Batch, Signal
from tapio.telemetry import COUNTER, GAUGE
from tapio.units import join_host_port, with_port

from ._config import Config, parse_endpoint
from ._render import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, render_openmetrics, render_text
from ._state import SERIES_LIMIT, MetricsState

SERIES_METRIC = "tapio_exporter_prometheus_series"
SERIES_REFUSED_METRIC = "tapio_exporter_prometheus_series_refused_total"
SCRAPES_METRIC = "tapio_exporter_prometheus_scrapes_total"

#: bodies smaller than this are sent uncompressed (gzip would cost more than it saves)
GZIP_MIN_BYTES = 4096
#: gzip level: 1 compresses Prometheus text ~8x at a fraction of level 6's cost
GZIP_LEVEL = 1
#: a scrape request carries no body
MAX_REQUEST_BODY = 16 * 1024
#: the sweep runs at least this often (and at most every 50 ms), so a series outlives metric_expiration by at most this
MAX_SWEEP_INTERVAL = 30.0


class PrometheusExporter:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.input is None:
            raise ValueError("the prometheus exporter needs an input")
        self._settings = settings
        self._config = config
        self._input = ports.input
        self.state = MetricsState(
            namespace=config.namespace,
            const_labels=config.const_labels,
            resource_labels=config.resource_to_telemetry_conversion.enabled,
            suffixes=config.add_metric_suffixes,
            max_series=config.max_series,
        )
        #: the bound port, known once started (useful with port 0)
        self.port: int | None = None
        self._warned: set[str] = set()
        tel = settings.telemetry
        tel.declare(SERIES_METRIC, GAUGE, "Number of series the prometheus exporter holds.")
        tel.declare(SERIES_REFUSED_METRIC, COUNTER, "Number of data points refused because their series would exceed max_series.")
        tel.declare(SCRAPES_METRIC, COUNTER, "Number of scrapes of the prometheus exporter's /metrics, by format.")
        tel.gauge(SERIES_METRIC, lambda: self.state.series_count)

    @property
    def bound_endpoints(self) -> dict[str, str]:
        """Config key path -> the ``host:port`` actually bound, for `tapio run`'s start banner."""
        return {"endpoint": with_port(self._config.endpoint, self.port)} if self.port is not None else {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, config = self._settings, self._config
        host, port = parse_endpoint(config.endpoint)
        listeners = await open_http_listeners(host or None, port, owner=str(settings.id), address=config.endpoint)
        self.port = bound_port(listeners)
        settings.logger.info("%s: serving /metrics on %s", settings.id, join_host_port(host or "*", self.port))
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_http_listeners(
                    self._handle,
                    listeners,
                    max_body_bytes=MAX_REQUEST_BODY,
                    limits=SCRAPE_LIMITS,
                    logger=settings.logger,
                    on_bad_request=lambda reason: settings.telemetry.bad_input(f"http_{reason}"),
                    name=f"{settings.id} /metrics",
                    task_status=task_status,
                )
            )
            if config.metric_expiration > 0:
                nursery.start_soon(self._sweep)
            task_status.started()
            async for batch in self._input:
                await self._take(batch)
            nursery.cancel_scope.cancel()

    async def _take(self, batch: Batch) -> None:
        tel = self._settings.telemetry
        if batch.signal is not Signal.METRICS:
            tel.signal_add("exporter_send_failed", batch.signal, batch.count, reason="unsupported_signal")
            batch.done(False)
            return
        accepted = refused = 0
        for i, request in enumerate(batch.requests):
            if i:
                # let a scrape in between requests, but never stop halfway: a batch is taken whole and finished
                await trio.lowlevel.cancel_shielded_checkpoint()
            result = self.state.ingest(request, trio.current_time())
            accepted += result.accepted
            for reason, n in result.refused.items():
                refused += n
                tel.signal_add("exporter_send_failed", Signal.METRICS, n, reason=reason)
                if reason == SERIES_LIMIT:
                    tel.add(SERIES_REFUSED_METRIC, n)
                if reason not in self._warned:
                    self._warned.add(reason)
                    self._settings.logger.warning(
                        "%s: refusing data points (%s); further refusals are only counted in "
                        "tapio_exporter_send_failed_metric_points_total", self._settings.id, reason
                    )
        tel.signal_add("exporter_sent", Signal.METRICS, accepted)
        batch.done(refused == 0)

    async def _sweep(self) -> None:
        expiration = float(self._config.metric_expiration)
        interval = min(max(expiration / 2, 0.05), MAX_SWEEP_INTERVAL)
        while True:
            await trio.sleep(interval)
            self.state.expire(trio.current_time() - expiration)

    async def _handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, [("content-type", "text/plain; charset=utf-8")], b"not found: try /metrics\n")
        if request.method != "GET":
            return Response(405, [("allow", "GET"), ("content-type", "text/plain; charset=utf-8")], b"method not allowed\n")
        openmetrics = self._config.enable_open_metrics and "application/openmetrics-text" in (request.header("accept") or "")
        timestamps = self._config.send_timestamps
        if openmetrics:
            body, ctype = render_openmetrics(self.state, timestamps=timestamps).encode(), OPENMETRICS_CONTENT_TYPE
        else:
            body, ctype = render_text(self.state, timestamps=timestamps).encode(), TEXT_CONTENT_TYPE
        self._settings.telemetry.add(SCRAPES_METRIC, format="openmetrics" if openmetrics else "text")
        headers = [("content-type", ctype)]
        if len(body) >= GZIP_MIN_BYTES and _accepts_gzip(request.header("accept-encoding")):
            body = await trio.to_thread.run_sync(_gzip, body)
            headers.append(("content-encoding", "gzip"))
        headers.append(("vary", "Accept-Encoding"))
        return Response(200, headers, body)


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)


def _accepts_gzip(value: str | None) -> bool:
    if not value:
        return False
    for part in value.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def create(settings: Settings, config: Config, ports: Ports) -> Any:
    return PrometheusExporter(settings, config, ports)
