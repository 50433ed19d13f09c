"""The running otlp receiver: its gRPC and HTTP servers under one coroutine.

Invariants:
- Both servers are bound before ``task_status.started()``; a bind failure is
  raised plainly (not in an exception group) and leaves nothing running.
- Shutdown (cancellation) first refuses new deliveries and releases gRPC
  calls waiting on a full pipeline (UNAVAILABLE; HTTP requests get 503), so
  nothing is acknowledged that is not in the pipeline; then the gRPC server
  stops within the shutdown grace.
"""

from __future__ import annotations

import trio

from tapio.component import Ports, Settings
from tapio.httpserver import bound_port, open_http_listeners, serve_http_listeners
from tapio.units import with_port

from ._config import Config, parse_endpoint
from ._delivery import Delivery
from ._grpc import GrpcServer
from ._http import OtlpHttpHandler


class OtlpReceiver:
    def __init__(self, settings: Settings, config: Config, ports: Ports) -> None:
        if ports.output is None:
            raise ValueError("the otlp receiver needs an output")
        self._settings = settings
        self._config = config
        self._output = ports.output
        #: the bound ports, known once started (useful with port 0)
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    @property
    def bound_endpoints(self) -> dict[str, str]:
        """Config key path -> the ``host:port`` actually bound, for `tapio run`'s start banner."""
        out = {}
        for name, port in (("grpc", self.grpc_port), ("http", self.http_port)):
            group = getattr(self._config.protocols, name)
            if group is not None and port is not None:
                out[f"protocols.{name}.endpoint"] = with_port(group.endpoint, port)
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings, protocols = self._settings, self._config.protocols
        component_id = str(settings.id)
        delivery = Delivery(
            self._output,
            wait_for_delivery=self._config.acknowledge == "delivered",
            delivery_timeout=float(self._config.delivery_timeout) or None,
        )
        grpc_server = None
        try:
            if protocols.grpc is not None:
                grpc_server = GrpcServer(
                    protocols.grpc,
                    delivery=delivery,
                    wired=self._output.signals,
                    telemetry=settings.telemetry,
                    logger=settings.logger,
                    component_id=component_id,
                )
                self.grpc_port = await grpc_server.start()
                settings.logger.info("%s: OTLP/gRPC on %s", component_id, _shown(protocols.grpc.endpoint, self.grpc_port))
            listeners = None
            if protocols.http is not None:
                host, port = parse_endpoint(protocols.http.endpoint)
                listeners = await open_http_listeners(
                    host, port, owner=component_id, address=protocols.http.endpoint, protocol="HTTP"
                )
                self.http_port = bound_port(listeners)
                settings.logger.info("%s: OTLP/HTTP on %s", component_id, _shown(protocols.http.endpoint, self.http_port))
            async with trio.open_nursery() as nursery:
                if listeners is not None:
                    http = protocols.http
                    handler = OtlpHttpHandler(http, self._output, settings.telemetry, delivery, settings.logger)
                    await nursery.start(
                        lambda task_status: serve_http_listeners(
                            handler,
                            listeners,
                            max_body_bytes=int(http.max_request_body_size),
                            limits=http.limits(),
                            on_bad_request=handler.on_bad_http,
                            logger=settings.logger,
                            name=f"{component_id} HTTP",
                            task_status=task_status,
                        )
                    )
                task_status.started()
                await trio.sleep_forever()
        finally:
            delivery.close()
            if grpc_server is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(settings.shutdown_grace):
                    await grpc_server.stop(settings.shutdown_grace)


def _shown(endpoint: str, port: int) -> str:
    """The bound address for a log line; every interface shows as ``*``."""
    return with_port(endpoint, port) if parse_endpoint(endpoint)[0] else f"*:{port}"
