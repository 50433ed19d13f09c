"""A small HTTP/1.1 server on trio and h11, for tapio's listeners (OTLP/HTTP, /metrics, self-telemetry).

Invariants:
- The handler sees a request only once its whole body is read and within
  ``max_body_bytes``; a body announced larger (Content-Length) is refused with
  413 before it is read, and a chunked body is refused as soon as it grows past
  the limit. Memory per connection is bounded by the limit plus h11's head
  buffer (`MAX_HEAD_BYTES`).
- Every response carries Content-Length. A connection is reused (keep-alive)
  only when h11 says both sides can; after any error response it is closed.
- A slow client cannot hold a connection for long (`Limits`): a request head
  must be complete within ``read_header_timeout`` of the connection's start
  (or of the first byte of a later request), a body must keep up with
  ``min_body_rate`` after a ``read_body_timeout`` allowance, a response must
  be taken within `WRITE_TIMEOUT_SECONDS`, and a connection may wait at most
  ``idle_timeout`` between requests. A request cut for being slow is
  answered 408 where it can be, and counted as ``timeout``.
- At most ``max_connections`` connections are open at once. When that many
  are open and another client is waiting to connect, the connection that
  has gone longest without sending a complete request head is closed to
  make room: first those that never completed one, then keep-alive
  connections waiting between requests. A connection that is receiving a
  body, being handled or answered is never closed to make room; when all
  are, new clients wait in the kernel's accept backlog. A connection closed
  while it had sent part of a request is answered 503 and counted as
  ``shed``.
- Bad input from a peer (malformed HTTP, oversize bodies, slowness) is
  answered 400/413/408 when possible, counted through ``on_bad_request``,
  logged at debug level with the peer address, and never ends the server.
- Cancellation (shutdown) closes idle connections at once. A request whose
  handler is cancelled gets a 503 with ``Connection: close`` when there is
  still time to send one (``SHUTDOWN_REPLY_SECONDS``), so the client knows to
  retry elsewhere or later.
"""

from __future__ import annotations

import errno
import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import h11
import trio

from tapio.units import join_host_port

#: largest request line + headers we buffer (h11's own default)
MAX_HEAD_BYTES = 16 * 1024
#: bytes asked of the socket per read
READ_SIZE = 64 * 1024
#: how long sending one response may take: Prometheus' default scrape timeout, so a scraper gives up no later than we do
WRITE_TIMEOUT_SECONDS = 10.0
#: after refusing a body, how long we keep reading (and discarding) it so the
#: client sees our response instead of a connection reset
LINGER_SECONDS = 1.0
#: and at most this much of it
LINGER_BYTES = 64 * 1024 * 1024
#: time left to tell a client "503 shutting down" when its handler is cancelled
SHUTDOWN_REPLY_SECONDS = 0.5
#: time given to tell a connection closed to make room "503" (its socket buffer is empty: this is one write)
SHED_REPLY_SECONDS = 0.1
#: pause after accept() fails for lack of file descriptors or memory
ACCEPT_BACKOFF_SECONDS = 0.1

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How long and how many: what keeps slow or idle clients from holding a listener.

    The defaults suit a node agent's listeners; see docs/components/otlp-receiver.md
    ("Slow and idle clients") for the reasoning and the measured cost per connection.
    """

    #: connections open at once (each costs one file descriptor and ~50 KB; see the docs)
    max_connections: int = 512
    #: seconds from a connection's start, or from a later request's first byte, until its head is complete:
    #: a real client sends a head in one segment, and 5 s still covers two lost segments (TCP retransmits after 1 s, then 2 s)
    read_header_timeout: float = 5.0
    #: seconds a body may take before ``min_body_rate`` counts
    read_body_timeout: float = 10.0
    #: bytes per second that extend the body's time: it may take ``read_body_timeout`` plus one second per
    #: this many bytes received; 0: the whole body within ``read_body_timeout``
    min_body_rate: int = 64 * 1024
    #: seconds a keep-alive connection may wait for its next request
    idle_timeout: float = 60.0

    def body_deadline(self, started: float, received: int) -> float:
        """When a body that began arriving at ``started`` and has brought ``received`` bytes so far is too slow."""
        allowance = received / self.min_body_rate if self.min_body_rate else 0.0
        return started + self.read_body_timeout + allowance


#: for listeners only scrapers and probes use (the prometheus exporter, self-telemetry): a Prometheus or two keep
#: one connection each, kubelet probes open one per probe; the rest of the fd budget belongs to OTLP clients
SCRAPE_LIMITS = Limits(max_connections=64)


@dataclass
class Request:
    """One complete HTTP request as the handler sees it."""

    method: str
    #: the request target as sent, e.g. ``/v1/logs?x=1``
    target: str
    #: the target's path, percent-decoded
    path: str
    query: dict[str, list[str]]
    #: header names lowercased, values decoded as latin-1, in the order received
    headers: list[tuple[str, str]]
    body: bytes
    #: the peer's (host, port)
    client: tuple[str, int]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (``name`` lowercase), or ``default``."""
        for k, v in self.headers:
            if k == name:
                return v
        return default


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]
BadRequestCallback = Callable[[str], None]


class ListenError(OSError):
    """An address that cannot be bound. ``str()`` is the whole message; ``strerror`` the reason alone, ``errno`` kept."""

    def __init__(self, message: str, errno_: int | None, reason: str) -> None:
        super().__init__(errno_, reason)
        self.message = message

    def __str__(self) -> str:
        return self.message


def listen_error(address: str, cause: OSError | str, *, owner: str = "", protocol: str = "") -> ListenError:
    """The error to raise when ``address`` cannot be bound, e.g. ``otlp: cannot listen on 127.0.0.1:4318 for HTTP: address already in use``.

    Args:
        address: as the user wrote it (or ``host:port``).
        cause: the bind's OSError, or the reason as text when the library does not say (grpcio).
        owner: who wanted it (a component id), put in front.
        protocol: what for (``HTTP``, ``gRPC``), when one owner listens twice.
    """
    if isinstance(cause, OSError):
        reason = os.strerror(cause.errno).lower() if cause.errno else str(cause)
        errno_ = cause.errno
    else:
        reason, errno_ = cause, None
    where = f"{address} for {protocol}" if protocol else address
    return ListenError(f"{owner + ': ' if owner else ''}cannot listen on {where}: {reason}", errno_, reason)


async def open_http_listeners(
    host: str | None, port: int, *, owner: str = "", address: str | None = None, protocol: str = ""
) -> list[trio.SocketListener]:
    """Bind ``host:port`` for `serve_http_listeners` (``None`` or ``""``: every interface; port 0: a free one).

    Raises:
        ListenError: with the address and the reason (see `listen_error`; ``address``
            is how to show it, ``host:port`` by default).
    """
    try:
        return await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        shown = address if address is not None else join_host_port(host or "*", port)
        raise listen_error(shown, exc, owner=owner, protocol=protocol) from None


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The TCP port the listeners are bound to (the first one's, when port 0 gave several)."""
    return int(listeners[0].socket.getsockname()[1])


async def serve_http(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    max_body_bytes: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    logger: logging.Logger | None = None,
    limits: Limits = Limits(),
    on_bad_request: BadRequestCallback | None = None,
    name: str = "http",
) -> None:
    """Serve HTTP/1.1 on ``host:port`` until cancelled.

    Args:
        handler: called once per complete request; its exceptions become a 500
            (logged), its cancellation a 503.
        host: address to bind (``None`` or ``""``: every interface).
        port: TCP port; 0 picks a free one.
        max_body_bytes: largest request body accepted (413 beyond).
        task_status: receives the bound port once the socket listens.
        logger: where connection problems are logged (debug) and handler
            failures (error); defaults to ``tapio.httpserver``.
        limits: timeouts and the connection limit (see `Limits`).
        on_bad_request: called with a short reason (``malformed``,
            ``closed`` (the client closed mid-request), ``body_too_large``,
            ``timeout``, ``shed``) for each refused request.
        name: used in log messages.

    Raises:
        ListenError: the address cannot be bound (before ``task_status.started``),
            as from `open_http_listeners`.
    """
    listeners = await open_http_listeners(host, port)
    await serve_http_listeners(
        handler,
        listeners,
        max_body_bytes=max_body_bytes,
        task_status=task_status,
        logger=logger,
        limits=limits,
        on_bad_request=on_bad_request,
        name=name,
    )


async def serve_http_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    *,
    max_body_bytes: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    logger: logging.Logger | None = None,
    limits: Limits = Limits(),
    on_bad_request: BadRequestCallback | None = None,
    name: str = "http",
) -> None:
    """`serve_http` on listeners bound beforehand (by `open_http_listeners`), which it owns and closes.

    Binding first lets a caller report a bind error plainly, outside any nursery.
    """
    log = logger or logging.getLogger(__name__)
    server = _Server(handler, max_body_bytes, limits, log, on_bad_request or (lambda reason: None), name)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(server.accept_loop, listener, nursery)
            task_status.started(bound_port(listeners))
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


class _Timeout(Exception):
    pass


class _Server:
    """The listeners' shared state: which connections are open, and which may be closed to make room."""

    def __init__(
        self,
        handler: Handler,
        max_body_bytes: int,
        limits: Limits,
        log: logging.Logger,
        on_bad_request: BadRequestCallback,
        name: str,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.log = log
        self.on_bad_request = on_bad_request
        self.name = name
        #: open connections, not counting those closed to make room
        self.open: set[_Connection] = set()
        #: connections that never sent a complete request head, oldest first
        self.fresh: dict[_Connection, None] = {}
        #: keep-alive connections waiting for (the head of) their next request, longest waiting first
        self.between: dict[_Connection, None] = {}
        #: set when a connection closes or may be closed to make room
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def forget(self, conn: _Connection) -> None:
        self.open.discard(conn)
        self.fresh.pop(conn, None)
        self.between.pop(conn, None)
        self.changed()

    def _victim(self) -> _Connection | None:
        for waiting in (self.fresh, self.between):
            for conn in waiting:
                return conn
        return None

    async def _make_room(self, listener: trio.SocketListener) -> None:
        """Return once there is room for one more connection, closing one without a complete head if need be."""
        while len(self.open) >= self.limits.max_connections:
            if self._victim() is None:
                await self._changed.wait()  # every connection is busy with a request: new clients wait in the backlog
                continue
            # close one only for a client that is actually waiting to connect
            await trio.lowlevel.wait_readable(listener.socket)
            victim = self._victim()
            if len(self.open) >= self.limits.max_connections and victim is not None:
                victim.shed()

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._make_room(listener)
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    self.log.warning("%s: accept failed (%s); retrying", self.name, exc)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                raise
            try:
                peer = stream.socket.getpeername()[:2]
            except OSError:  # already reset by the peer
                await stream.aclose()
                continue
            conn = _Connection(self, stream, (str(peer[0]), int(peer[1])))
            self.open.add(conn)
            self.fresh[conn] = None
            nursery.start_soon(conn.run)


class _Connection:
    """One client connection: requests in order, one at a time."""

    def __init__(self, server: _Server, stream: trio.SocketStream, client: tuple[str, int]) -> None:
        self.server = server
        self.stream = stream
        self.client = client
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.started = trio.current_time()
        self.served = 0
        #: cancelled to close the connection to make room
        self.scope = trio.CancelScope()
        self.is_shed = False

    def shed(self) -> None:
        """Close this connection (waiting for a request head) to make room for another."""
        server = self.server
        self.is_shed = True
        server.open.discard(self)
        server.fresh.pop(self, None)
        server.between.pop(self, None)
        self.scope.cancel()

    async def run(self) -> None:
        try:
            with self.scope:
                await self.serve()
            if self.is_shed:
                await self._after_shed()
        finally:
            self.server.forget(self)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _after_shed(self) -> None:
        if self.served == 0 or self._in_request():
            self._bad("shed", f"closed to make room, {self._head_progress()}")
        if self._in_request():
            with trio.move_on_after(SHED_REPLY_SECONDS):
                await self._send_error(503, "too many connections; retry", retry_after=1)

    async def serve(self) -> None:
        try:
            while True:
                keep_going = await self._one_request()
                if not keep_going:
                    return
                if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
                self.served += 1
                self.server.between[self] = None
                self.server.changed()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Timeout):
            return  # the peer went away or stalled; nothing more to say to it

    async def _one_request(self) -> bool:
        """Serve one request; False when the connection is to be closed."""
        server, limits = self.server, self.server.limits
        try:
            if self.served == 0:
                head_deadline = self.started + limits.read_header_timeout
            else:
                if not self._in_request():
                    with trio.move_on_after(limits.idle_timeout) as idle_timer:
                        await self._receive()
                    if idle_timer.cancelled_caught:
                        return False  # idle too long between requests: closed without a word, as keep-alive allows
                head_deadline = trio.current_time() + limits.read_header_timeout
            try:
                with trio.move_on_at(head_deadline) as head_timer:
                    event = await self._next_event()
            finally:  # from here on it is not closed to make room
                server.fresh.pop(self, None)
                server.between.pop(self, None)
            if head_timer.cancelled_caught:
                if self.served == 0 or self._in_request():
                    self._bad("timeout", f"no complete request head within {limits.read_header_timeout:g}s, {self._head_progress()}")
                if self._in_request():
                    await self._send_error(408, "request head not received in time")
                return False
            if isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request), event
            request_event = event
            body = await self._read_body(request_event)
            if body is None:
                return False
        except h11.RemoteProtocolError as exc:
            if self.h11.trailing_data[1]:  # the peer closed in the middle of a request: nobody to answer
                self._bad("closed", f"the client closed the connection in the middle of a request ({exc})")
                return False
            self._bad("malformed", f"malformed HTTP: {exc}")
            await self._send_error(exc.error_status_hint, "malformed HTTP request")
            return False

        request = _make_request(request_event, body, self.client)
        try:
            response = await server.handler(request)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_REPLY_SECONDS):
                await self._send_response(
                    Response(503, [("retry-after", "1"), ("content-type", "text/plain")], b"server shutting down\n"),
                    close=True,
                )
            raise
        except Exception:
            server.log.exception("%s: handler failed on %s %s from %s", server.name, request.method, request.target, join_host_port(*self.client))
            await self._send_error(500, "internal error")
            return False
        await self._send_response(response, close=False)
        return True

    def _in_request(self) -> bool:
        # h11 has bytes of a request buffered, or a request is under way
        return bool(self.h11.trailing_data[0]) or self.h11.their_state is not h11.IDLE

    def _head_progress(self) -> str:
        return f"{len(self.h11.trailing_data[0])} bytes of a request head received"

    async def _read_body(self, request: h11.Request) -> bytes | None:
        """The request's body, or None after answering 413/408 (the connection then closes)."""
        server, limits = self.server, self.server.limits
        limit = server.max_body_bytes
        length = _content_length(request)
        if length is not None and length > limit:
            self._bad("body_too_large", f"body of {length} bytes exceeds {limit}")
            await self._refuse_body(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
            return None
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        started = trio.current_time()
        while True:
            with trio.move_on_at(limits.body_deadline(started, size)) as timer:
                event = await self._next_event()
            if timer.cancelled_caught:
                took = trio.current_time() - started
                self._bad("timeout", f"request body too slow: {size} bytes in {took:.1f}s")
                await self._send_error(408, "request body not received in time")
                return None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    self._bad("body_too_large", f"chunked body exceeds {limit} bytes")
                    await self._refuse_body(413, f"request body exceeds the limit of {limit} bytes")
                    return None
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises first
                raise trio.BrokenResourceError("peer closed mid-body")

    async def _receive(self) -> None:
        """Read once from the socket into h11 (an empty read: the peer closed)."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, OSError):
            data = b""
        self.h11.receive_data(data)

    async def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive()

    async def _send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            with trio.move_on_after(WRITE_TIMEOUT_SECONDS) as timer:
                await self.stream.send_all(data)
            if timer.cancelled_caught:
                raise _Timeout()

    async def _send_response(self, response: Response, *, close: bool) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [(k, v) for k, v in response.headers if k.lower() != "content-length"]
        headers.append(("content-length", str(len(response.body))))
        if close:
            headers.append(("connection", "close"))
        try:
            await self._send(h11.Response(status_code=response.status, headers=headers))
            if response.body:
                await self._send(h11.Data(data=response.body))
            await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # e.g. a handler's header h11 refuses; the connection cannot continue
            self.server.log.exception("%s: invalid response for %s", self.server.name, join_host_port(*self.client))
            raise trio.BrokenResourceError("invalid response") from None
        except OSError:
            raise trio.BrokenResourceError("peer went away") from None

    async def _send_error(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        headers = [("content-type", "text/plain; charset=utf-8")]
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        try:
            await self._send_response(Response(status, headers, (message + "\n").encode()), close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Timeout, h11.LocalProtocolError):
            pass

    async def _refuse_body(self, status: int, message: str) -> None:
        """Answer without reading the body, then discard what the client still sends, briefly."""
        await self._send_error(status, message)
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await self.stream.send_eof()
                drained = 0
                while drained < LINGER_BYTES:
                    data = await self.stream.receive_some(READ_SIZE)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _bad(self, reason: str, detail: str) -> None:
        self.server.log.debug("%s: bad request from %s: %s", self.server.name, join_host_port(*self.client), detail)
        try:
            self.server.on_bad_request(reason)
        except Exception:
            self.server.log.exception("%s: on_bad_request callback failed", self.server.name)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


def _make_request(event: h11.Request, body: bytes, client: tuple[str, int]) -> Request:
    target = event.target.decode("latin-1")
    split = urllib.parse.urlsplit(target)
    return Request(
        method=event.method.decode("latin-1"),
        target=target,
        path=urllib.parse.unquote(split.path),
        query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
        body=body,
        client=client,
    )
