"""OTLP/gRPC: a grpc.aio server on an asyncio loop of its own, whose handlers hand each request into trio.

Invariants:
- A call is answered OK only after ``output.send`` returned for its batch,
  i.e. once the batch is in the pipeline; every other outcome is an error
  status the client can act on: INVALID_ARGUMENT (undecodable, not retried),
  UNAVAILABLE (pipeline closed or shutting down, retried), UNIMPLEMENTED (no
  pipeline for the signal), DEADLINE_EXCEEDED (the client's deadline passed
  while the pipeline was full).
- A call whose message has not fully arrived holds no thread: grpc.aio
  waits for it on the asyncio loop. (grpcio's thread-pool server takes a
  worker for every call as it starts and blocks it until the message is
  complete, so ``workers`` calls that never finish their message would lock
  every other client out.) Threads are taken only to hand a complete batch
  into trio: at most ``workers`` at once, each through `Delivery`; once
  `Delivery.close` ran, no batch enters the pipeline and no thread stays
  blocked.
- Slow or idle connections are cut by grpcio itself (see `_channel_options`):
  HTTP/2 not started within ``handshake_timeout``, no call for
  ``max_connection_idle``, and (when set) older than ``max_connection_age``.
- Requests are parsed once, from the raw bytes grpcio hands over (the
  method handlers have no deserializer), so no message is decoded twice.
- The asyncio loop runs in a thread from trio's thread cache
  (`trio.lowlevel.start_thread_soon`) from `GrpcServer.start` until
  `GrpcServer.stop` returned; a bind failure ends it before `start` returns.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import grpc
import trio
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


class GrpcServer:
    """The OTLP/gRPC server of one receiver. Create, `start` and `stop` it from trio."""

    def __init__(
        self,
        config: GrpcConfig,
        *,
        delivery: Delivery,
        wired: frozenset[Signal],
        telemetry: ComponentTelemetry,
        logger: logging.Logger,
        component_id: str,
    ) -> None:
        self._config = config
        self._component_id = component_id
        self._logger = logger
        # the threads that wait on trio for each delivery: this bounds the requests in flight into the pipeline
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=f"{component_id}-grpc")
        self._handlers = [
            grpc.method_handlers_generic_handler(
                service,
                {"Export": grpc.unary_unary_rpc_method_handler(
                    _make_export(signal, signal in wired, delivery, telemetry, logger, self._executor)
                )},
            )
            for signal, service in SERVICES.items()
        ]
        self._token = trio.lowlevel.current_trio_token()
        self._bound = trio.Event()
        self._finished = trio.Event()
        self._started = False
        self._error: BaseException | None = None
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._grace = 0.0

    async def start(self) -> int:
        """Bind and start serving; returns the bound port.

        Raises:
            ListenError: the endpoint cannot be bound, saying which and why
                (nothing is left running).
        """
        self._started = True
        trio.lowlevel.start_thread_soon(self._run, self._ran, name=f"{self._component_id} gRPC")
        await self._bound.wait()
        if self._error is not None:
            await self._finished.wait()
            raise self._error
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, give running ones ``grace`` seconds, and wait for the loop's thread to end.

        Cancellation (the caller's deadline) leaves the thread to finish on its own.
        """
        if not self._started:
            return
        with self._lock:
            self._stop_requested = True
            self._grace = grace
            if self._loop is not None and self._stop_event is not None:
                self._loop.call_soon_threadsafe(self._stop_event.set)
        await self._finished.wait()

    # ------------------------------------------------------------ the loop's thread

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._executor.shutdown(wait=False)

    def _ran(self, outcome: Any) -> None:
        """Called in the loop's thread once it is done: tell trio (which may have finished already)."""
        try:
            outcome.unwrap()
        except BaseException as exc:  # an error of the loop itself, not of a call
            if self._error is None:
                self._error = exc
            self._logger.error("%s: the gRPC server's loop failed: %r", self._component_id, exc)

        def done() -> None:
            self._bound.set()
            self._finished.set()

        try:
            self._token.run_sync_soon(done)
        except trio.RunFinishedError:
            pass

    async def _serve(self) -> None:
        config = self._config
        host, port = parse_endpoint(config.endpoint)
        server = grpc.aio.server(options=_channel_options(config))
        server.add_generic_rpc_handlers(self._handlers)
        try:
            bound = server.add_insecure_port(join_host_port(host or "::", port))
        except RuntimeError:
            bound = 0
        if not bound:
            await server.stop(None)
            self._error = listen_error(config.endpoint, _why_bind_fails(host, port), owner=self._component_id, protocol="gRPC")
            self._token.run_sync_soon(self._bound.set)
            return
        await server.start()
        self.port = bound
        stop_event = asyncio.Event()
        with self._lock:
            self._loop, self._stop_event = asyncio.get_running_loop(), stop_event
            if self._stop_requested:
                stop_event.set()
        self._token.run_sync_soon(self._bound.set)
        await stop_event.wait()
        await server.stop(self._grace)


def _channel_options(config: GrpcConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
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
    return options


def _make_export(
    signal: Signal,
    wired: bool,
    delivery: Delivery,
    telemetry: ComponentTelemetry,
    logger: logging.Logger,
    executor: ThreadPoolExecutor,
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    request_class = signal.request_class

    def deliver(batch: Batch, deadline: float | None) -> str | None:
        # in a worker thread; the call may have waited for it past its deadline
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return "timeout"
        return delivery.deliver_from_thread(batch, remaining)

    async def export(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not wired:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no pipeline takes {signal} from this receiver")
        try:
            batch = Batch.from_bytes(signal, raw)
        except DecodeError as exc:
            telemetry.bad_input("grpc_undecodable")
            logger.debug("gRPC %s export from %s is not a valid %s: %s", signal, context.peer(), request_class.__name__, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode {request_class.__name__}: {exc}")
        if batch.count == 0:
            return _EMPTY_RESPONSE  # nothing to deliver
        batch.client_address = peer_address(context.peer())
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        refused = await asyncio.get_running_loop().run_in_executor(executor, deliver, batch, deadline)
        if refused == "timeout":
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the pipeline stayed full until the call's deadline")
        if refused is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{REFUSAL_TEXT[refused]}; retry later")
        return _EMPTY_RESPONSE

    return export


def _ms(seconds: float) -> int:
    """A duration as grpcio's channel arguments take it: whole milliseconds, at least 1."""
    return max(1, round(seconds * 1000))


def peer_address(peer: str) -> str:
    """The IP address in a grpcio peer string (``ipv4:10.0.0.5:4711``, ``ipv6:[::1]:4711``); "" for others (unix sockets)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


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
