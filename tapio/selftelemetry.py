"""The self-telemetry endpoint: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz``.

Invariants:
- `render_prometheus` is a pure function of the telemetry state and always
  produces valid Prometheus text format 0.0.4 (checked by ``promtool check
  metrics`` in the tests): one HELP and TYPE line per metric family, label
  values escaped, series sorted.
- ``/healthz`` answers 200 while no component is failing and 503 with the
  failing component ids otherwise; ``/readyz`` answers 200 once every
  component started and until shutdown begins.
- The endpoint is served by `tapio.httpserver` with its timeouts and
  `SCRAPE_LIMITS`; requests cut or refused there are counted in
  ``tapio_bad_input_total{listener="self-telemetry"}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import trio

from tapio.promtext import escape_help, escape_label_value, format_float
from tapio.telemetry import Telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


#: whole values below this are written without a fraction (``5``, not ``5.0``); floats are exact up to 2**53
_WHOLE_BELOW = 1e15


def _format_value(v: float) -> str:
    if v == v and abs(v) < _WHOLE_BELOW and float(v).is_integer():
        return str(int(v))
    return format_float(float(v))


def render_prometheus(telemetry: Telemetry) -> str:
    out: list[str] = []
    for name, info, series in telemetry.collect():
        out.append(f"# HELP {name} {escape_help(info.help)}")
        out.append(f"# TYPE {name} {info.kind}")
        for labels, value in series:
            if labels:
                lab = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in labels)
                out.append(f"{name}{{{lab}}} {_format_value(value)}")
            else:
                out.append(f"{name} {_format_value(value)}")
    return "\n".join(out) + "\n"


class Health:
    """What /healthz and /readyz read: supplied by the running service."""

    def __init__(self, ready: Callable[[], bool], failing: Callable[[], list[str]]) -> None:
        self.ready = ready
        self.failing = failing


def make_handler(telemetry: Telemetry, health: Health):
    from tapio.httpserver import Response

    async def handle(request) -> Any:
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("allow", "GET, HEAD"), ("content-type", "text/plain")], b"method not allowed\n")
        if request.path == "/metrics":
            body = render_prometheus(telemetry).encode()
            return Response(200, [("content-type", CONTENT_TYPE)], body)
        if request.path == "/healthz":
            failing = health.failing()
            if failing:
                body = json.dumps({"status": "failing", "failing": failing}).encode() + b"\n"
                return Response(503, [("content-type", "application/json")], body)
            return Response(200, [("content-type", "application/json")], b'{"status":"ok"}\n')
        if request.path == "/readyz":
            if health.ready():
                return Response(200, [("content-type", "application/json")], b'{"status":"ready"}\n')
            return Response(503, [("content-type", "application/json")], b'{"status":"not ready"}\n')
        return Response(404, [("content-type", "text/plain")], b"not found: try /metrics, /healthz or /readyz\n")

    return handle


async def serve(
    telemetry: Telemetry,
    health: Health,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoints until cancelled; ``task_status.started(bound_port)``.

    Raises:
        tapio.httpserver.ListenError: ``host:port`` cannot be bound (its ``strerror`` says why).
    """
    from tapio.httpserver import SCRAPE_LIMITS, serve_http

    listener = telemetry.for_component("listener", "self-telemetry")
    await serve_http(
        make_handler(telemetry, health),
        host,
        port,
        max_body_bytes=1 << 16,
        limits=SCRAPE_LIMITS,
        on_bad_request=lambda reason: listener.bad_input(f"http_{reason}"),
        task_status=task_status,
        logger=logging.getLogger("tapio.selftelemetry"),
        name="self-telemetry",
    )
