"""A reference OTLP backend for exporter tests: gRPC and HTTP servers that record and answer as scripted.

Invariants:
- Every export request is answered by the next scripted `Reply` (in arrival
  order, across both protocols), or by `OtlpSink.default` once the script
  is used up. A request is *recorded as received* (`OtlpSink.received`)
  only when its reply accepts it (OK, possibly with a partial success);
  every request, accepted or not, is in `OtlpSink.attempts`.
- Recording is thread-safe (grpcio handlers run in worker threads) and the
  waiting helpers wake on the change itself, never by polling.
- `stop` closes both listeners (clients see connection refused, as from a
  backend that is down); `start` opens them again on the same ports.

Failures are the OTLP specification's: gRPC status codes with an optional
google.rpc.RetryInfo in the ``grpc-status-details-bin`` trailer; HTTP
statuses with a google.rpc.Status body and an optional Retry-After header.
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc
import trio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from tapio import otlpjson
from tapio.httpserver import Request, Response, open_http_listeners, serve_http_listeners
from tapio.pdata import Request as ExportRequest
from tapio.pdata import Signal, count_items

SERVICES = {
    Signal.TRACES: "opentelemetry.proto.collector.trace.v1.TraceService",
    Signal.METRICS: "opentelemetry.proto.collector.metrics.v1.MetricsService",
    Signal.LOGS: "opentelemetry.proto.collector.logs.v1.LogsService",
}
PATHS = {f"/v1/{s.value}": s for s in Signal}
#: the HTTP status the sink answers for a gRPC code when a Reply names none (OTLP spec's mapping)
HTTP_FOR_CODE = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    """How the sink answers one export request.

    ``code``: the gRPC status (OK accepts). ``http_status``: the HTTP status,
    derived from ``code`` when None. ``retry_delay``: sent as RetryInfo (gRPC)
    or Retry-After seconds (HTTP); ``retry_after`` overrides the HTTP header
    text (e.g. an HTTP date). ``delay``: seconds to wait before answering.
    ``rejected``/``partial_message``: a partial success in an accepted reply.
    """

    code: grpc.StatusCode = grpc.StatusCode.OK
    http_status: int | None = None
    message: str = ""
    retry_delay: float | None = None
    retry_after: str | None = None
    delay: float = 0.0
    rejected: int = 0
    partial_message: str = ""

    @property
    def status(self) -> int:
        return self.http_status if self.http_status is not None else HTTP_FOR_CODE.get(self.code, 500)

    @property
    def accepts(self) -> bool:
        return self.code is grpc.StatusCode.OK and self.http_status in (None, 200)


OK = Reply()


@dataclass
class Received:
    """One export request as the sink saw it."""

    transport: str  # "grpc" | "http"
    signal: Signal
    request: ExportRequest
    count: int
    #: lowercase header / metadata names
    headers: dict[str, str]
    #: the HTTP body arrived compressed (Content-Encoding); always False for gRPC, whose compression grpcio hides
    compressed: bool
    #: "proto" or "json"
    encoding: str
    reply: Reply = OK
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SinkTLS:
    """Server certificate, and for mutual TLS the CA that client certificates must chain to.

    ``max_version`` (``"1.2"`` or ``"1.3"``; empty: OpenSSL's newest) caps the
    TLS version of the HTTP server, to test a client's minimum version;
    grpcio's server offers no such setting, so the gRPC server ignores it.
    """

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    max_version: str = ""


class OtlpSink:
    """The recorder and its script; `open_otlp_sink` runs the servers around one."""

    def __init__(self, *, keep_requests: bool = True) -> None:
        #: False keeps only counts (for benchmarks)
        self.keep_requests = keep_requests
        self.received: list[Received] = []
        self.attempts: list[Received] = []
        self.default = OK
        self.item_counts = {s: 0 for s in Signal}
        self.grpc_port = 0
        self.http_port = 0
        self.host = "127.0.0.1"
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()
        self._servers: "_Servers | None" = None

    # -- scripting

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order (after any already scripted)."""
        with self._lock:
            self._script.extend(replies)

    @property
    def scripted_left(self) -> int:
        with self._lock:
            return len(self._script)

    # -- reading

    @property
    def grpc_endpoint(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def http_url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.http_port}"

    def items(self, signal: Signal = Signal.LOGS) -> int:
        """Items received (accepted) of a signal; partially rejected items count too."""
        with self._lock:
            return self.item_counts[signal]

    def requests(self, signal: Signal = Signal.LOGS) -> list[ExportRequest]:
        with self._lock:
            return [r.request for r in self.received if r.signal is signal]

    async def wait_for_items(self, n: int, signal: Signal = Signal.LOGS) -> None:
        await self.wait_until(lambda: self.item_counts[signal] >= n)

    async def wait_for_attempts(self, n: int) -> None:
        await self.wait_until(lambda: len(self.attempts) >= n)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    # -- answering (any thread)

    def handle(self, transport: str, signal: Signal, request: ExportRequest, headers: dict[str, str], compressed: bool, encoding: str) -> Reply:
        """Record one request and return the reply to give it."""
        count = count_items(signal, request)
        with self._lock:
            reply = self._script.popleft() if self._script else self.default
            rec = Received(transport, signal, request if self.keep_requests else signal.request_class(), count, headers, compressed, encoding, reply)
            if self.keep_requests:
                self.attempts.append(rec)
            if reply.accepts:
                self.item_counts[signal] += count
                if self.keep_requests:
                    self.received.append(rec)
        self._notify_from_anywhere()
        return reply

    def _notify_from_anywhere(self) -> None:
        if self._token is None:
            return
        try:
            trio.lowlevel.current_trio_token()
            in_trio = True
        except RuntimeError:
            in_trio = False
        if in_trio:
            self._notify()
            return
        try:
            trio.from_thread.run_sync(self._notify, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- listeners

    async def stop(self) -> None:
        """Close both listeners: clients get connection refused until `start`."""
        if self._servers is not None:
            await self._servers.stop()

    async def start(self) -> None:
        """Listen again, on the same ports as before."""
        if self._servers is not None:
            await self._servers.start()


# ---------------------------------------------------------------- replies on the wire


def _retry_status(reply: Reply) -> bytes:
    status = status_pb2.Status(code=reply.code.value[0], message=reply.message)
    if reply.retry_delay is not None:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(reply.retry_delay), nanos=int(round((reply.retry_delay % 1) * 1e9))
        ))
        status.details.add().Pack(info)
    return status.SerializeToString()


def _response_bytes(signal: Signal, reply: Reply, as_json: bool) -> bytes:
    from tapio.exporters.otlp._retry import RESPONSE_CLASS  # the three Export*ServiceResponse classes

    response = RESPONSE_CLASS[signal]()
    if reply.rejected or reply.partial_message:
        field_name = {"logs": "rejected_log_records", "metrics": "rejected_data_points", "traces": "rejected_spans"}[signal.value]
        setattr(response.partial_success, field_name, reply.rejected)
        response.partial_success.error_message = reply.partial_message
    return otlpjson.encode(response) if as_json else response.SerializeToString()


def _grpc_handler(sink: OtlpSink, signal: Signal):
    def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        request = signal.request_class.FromString(raw)
        reply = sink.handle("grpc", signal, request, headers, False, "proto")
        if reply.delay:
            time.sleep(reply.delay)
        if not reply.accepts:
            if reply.retry_delay is not None:
                context.set_trailing_metadata((("grpc-status-details-bin", _retry_status(reply)),))
            context.abort(reply.code, reply.message or reply.code.name)
        return _response_bytes(signal, reply, False)

    return export


def _grpc_server(sink: OtlpSink, host: str, port: int, tls: SinkTLS | None) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="otlpsink"), options=[("grpc.so_reuseport", 0)])
    for signal, service in SERVICES.items():
        handler = grpc.unary_unary_rpc_method_handler(_grpc_handler(sink, signal))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
        client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)
        bound = server.add_secure_port(address, creds)
    if not bound:
        raise OSError(f"otlp sink: cannot listen on {address} for gRPC")
    server.start()
    return server, bound


def _http_handler(sink: OtlpSink):
    async def handle(req: Request) -> Response:
        signal = PATHS.get(req.path)
        if signal is None or req.method != "POST":
            return Response(404, [("content-type", "text/plain")], b"not an OTLP path\n")
        body = req.body
        encoding = req.header("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        ctype = req.header("content-type", "")
        as_json = ctype.startswith("application/json")
        try:
            request = otlpjson.decode(signal, body) if as_json else signal.request_class.FromString(body)
        except Exception as exc:  # a malformed body is the exporter's bug: tell it plainly
            return Response(400, [("content-type", "text/plain")], f"undecodable body: {exc}\n".encode())
        headers = dict(req.headers)
        reply = sink.handle("http", signal, request, headers, bool(encoding), "json" if as_json else "proto")
        if reply.delay:
            await trio.sleep(reply.delay)
        out_type = "application/json" if as_json else "application/x-protobuf"
        if reply.accepts:
            return Response(200, [("content-type", out_type)], _response_bytes(signal, reply, as_json))
        extra = []
        if reply.retry_after is not None:
            extra.append(("retry-after", reply.retry_after))
        elif reply.retry_delay is not None:
            extra.append(("retry-after", str(int(reply.retry_delay))))
        status = status_pb2.Status(code=reply.code.value[0], message=reply.message or reply.code.name)
        return Response(reply.status, [("content-type", "application/x-protobuf"), *extra], status.SerializeToString())

    return handle


class _TLSStream(trio.abc.Stream):
    """A TLS stream that also exposes the raw socket (tapio.httpserver asks it for the peer)."""

    def __init__(self, inner: trio.SSLStream, sock) -> None:
        self._inner = inner
        self.socket = sock

    async def send_all(self, data) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _TLSListener(trio.abc.Listener):
    def __init__(self, inner: trio.SocketListener, context: ssl.SSLContext) -> None:
        self._inner = inner
        self._context = context
        self.socket = inner.socket

    async def accept(self) -> _TLSStream:
        stream = await self._inner.accept()
        return _TLSStream(trio.SSLStream(stream, self._context, server_side=True), stream.socket)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _server_ssl_context(tls: SinkTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.max_version:
        ctx.maximum_version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[tls.max_version]
    if tls.client_ca_file:
        ctx.load_verify_locations(tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Servers:
    def __init__(self, sink: OtlpSink, nursery: trio.Nursery, host: str, grpc_on: bool, http_on: bool, tls: SinkTLS | None) -> None:
        self.sink = sink
        self.nursery = nursery
        self.host = host
        self.grpc_on = grpc_on
        self.http_on = http_on
        self.tls = tls
        self.grpc_server: grpc.Server | None = None
        self.http_scope: trio.CancelScope | None = None
        self.http_stopped = trio.Event()

    async def start(self) -> None:
        sink = self.sink
        if self.grpc_on and self.grpc_server is None:
            self.grpc_server, sink.grpc_port = await trio.to_thread.run_sync(_grpc_server, sink, self.host, sink.grpc_port, self.tls)
        if self.http_on and self.http_scope is None:
            listeners = await open_http_listeners(self.host, sink.http_port)
            if self.tls is not None:
                ctx = _server_ssl_context(self.tls)
                listeners = [_TLSListener(l, ctx) for l in listeners]
            sink.http_port = await self.nursery.start(self._serve_http, listeners)

    async def _serve_http(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        stopped = self.http_stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self.http_scope = scope
                await serve_http_listeners(_http_handler(self.sink), listeners, max_body_bytes=MAX_BODY, task_status=task_status, name="otlpsink")
        finally:
            stopped.set()

    async def stop(self) -> None:
        server, self.grpc_server = self.grpc_server, None
        if server is not None:
            await trio.to_thread.run_sync(lambda: server.stop(None).wait())
        scope, self.http_scope = self.http_scope, None
        if scope is not None:
            scope.cancel()
            await self.http_stopped.wait()  # every connection closed: nothing more is recorded


@asynccontextmanager
async def open_otlp_sink(
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 0,
    http_port: int = 0,
    grpc_server: bool = True,
    http_server: bool = True,
    tls: SinkTLS | None = None,
    keep_requests: bool = True,
) -> AsyncIterator[OtlpSink]:
    """Run an `OtlpSink` with its gRPC and/or HTTP server until the block ends.

    Ports 0 pick free ones; read them from ``sink.grpc_port`` / ``sink.http_port``
    (or ``sink.grpc_endpoint`` / ``sink.http_url()``).
    """
    sink = OtlpSink(keep_requests=keep_requests)
    sink.host = host
    sink.grpc_port, sink.http_port = grpc_port, http_port
    sink._token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        servers = _Servers(sink, nursery, host, grpc_server, http_server, tls)
        sink._servers = servers
        await servers.start()
        try:
            yield sink
        finally:
            with trio.CancelScope(shield=True):
                await servers.stop()
            nursery.cancel_scope.cancel()
