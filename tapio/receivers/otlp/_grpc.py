"""OTLP/gRPC: a grpcio server whose handlers hand each request into trio.

Invariants:
- A call is answered OK only after ``output.send`` returned for its batch,
  i.e. once the batch is in the pipeline; every other outcome is an error
  status the client can act on: INVALID_ARGUMENT (undecodable, not retried),
  UNAVAILABLE (pipeline closed or shutting down, retried), UNIMPLEMENTED (no
  pipeline for the signal), DEADLINE_EXCEEDED (the client's deadline passed
  while the pipeline was full).
- Handlers run in grpcio's worker threads and only ever touch trio through
  `Delivery`; once `Delivery.close` ran, no batch enters the pipeline and no
  handler stays blocked.
- Requests are parsed once, from the raw bytes grpcio hands over (the
  method handlers have no deserializer), so no message is decoded twice.
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from tapio.httpserver import listen_error
from tapio.pdata import Batch, Signal
from tapio.telemetry import ComponentTelemetry
from tapio.units import join_host_port

from ._delivery import REFUSAL_TEXT, Delivery
from ._config import GrpcConfig, parse_endpoint

#: fully qualified gRPC service names of the OTLP collector services
SERVICES = {
    Signal.TRACES: "opentelemetry.proto.collector.trace.v1.TraceService",
    Signal.METRICS: "opentelemetry.proto.collector.metrics.v1.MetricsService",
    Signal.LOGS: "opentelemetry.proto.collector.logs.v1.LogsService",
}
#: an empty Export*ServiceResponse serializes to no bytes (all three alike)
_EMPTY_RESPONSE = b""


def start_grpc_server(
    config: GrpcConfig,
    *,
    delivery: Delivery,
    wired: frozenset[Signal],
    telemetry: ComponentTelemetry,
    logger: logging.Logger,
    component_id: str,
) -> tuple[grpc.Server, ThreadPoolExecutor, int]:
    """Bind and start the OTLP/gRPC server; returns it, its executor and the bound port.

    Raises:
        OSError: the endpoint cannot be bound, saying which and why.
    """
    host, port = parse_endpoint(config.endpoint)
    options = [
        ("grpc.max_receive_message_length", config.max_recv_msg_size_mib * 1024 * 1024),
        # without this a second process could bind the same port and share its traffic
        ("grpc.so_reuseport", 0),
        # covers the TCP accept up to the client's HTTP/2 SETTINGS (grpcio's default: 120 s)
        ("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout)),
    ]
    # No connection limit (grpc.max_allowed_incoming_connections): at its limit grpcio closes every new connection,
    # which would lock legitimate clients out while slow ones hold the slots; slow ones are cut by the timeouts instead.
    if config.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", config.max_concurrent_streams))
    if config.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", _ms(config.max_connection_idle)))
    if config.max_connection_age:
        options.append(("grpc.max_connection_age_ms", _ms(config.max_connection_age)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace)))
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=f"{component_id}-grpc")
    server = grpc.server(executor, options=options)
    for signal, service in SERVICES.items():
        export = _make_export(signal, signal in wired, delivery, telemetry, logger)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Export": grpc.unary_unary_rpc_method_handler(export)}),)
        )
    address = _grpc_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        executor.shutdown(wait=False)
        raise listen_error(config.endpoint, _why_bind_fails(host, port), owner=component_id, protocol="gRPC")
    server.start()
    return server, executor, bound


def stop_grpc_server(server: grpc.Server, executor: ThreadPoolExecutor, grace: float) -> None:
    """Blocking: stop accepting calls, give running ones ``grace`` seconds, free the threads."""
    server.stop(grace).wait()
    executor.shutdown(wait=True)


def _make_export(
    signal: Signal,
    wired: bool,
    delivery: Delivery,
    telemetry: ComponentTelemetry,
    logger: logging.Logger,
) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    request_class = signal.request_class

    def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
        if not wired:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no pipeline takes {signal} from this receiver")
        try:
            batch = Batch.from_bytes(signal, raw)
        except DecodeError as exc:
            telemetry.bad_input("grpc_undecodable")
            logger.debug("gRPC %s export from %s is not a valid %s: %s", signal, context.peer(), request_class.__name__, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode {request_class.__name__}: {exc}")
        if batch.count == 0:
            return _EMPTY_RESPONSE  # nothing to deliver
        refused = delivery.deliver_from_thread(batch, context.time_remaining())
        if refused == "timeout":
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the pipeline stayed full until the call's deadline")
        if refused is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{REFUSAL_TEXT[refused]}; retry later")
        return _EMPTY_RESPONSE

    return export


def _ms(seconds: float) -> int:
    """A duration as grpcio's channel arguments take it: whole milliseconds, at least 1."""
    return max(1, round(seconds * 1000))


def _grpc_address(host: str, port: int) -> str:
    return join_host_port(host or "::", port)


def _why_bind_fails(host: str, port: int) -> OSError | str:
    """grpcio does not say why a bind failed; find out with a plain socket."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, type_, proto, _, addr in infos:
        with socket.socket(family, type_, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                return exc
    return "grpcio could not bind it"
