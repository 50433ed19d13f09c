"""A small HTTP/1.1 server on trio and h11, for tapio's listeners (OTLP/HTTP, /metrics).

Invariants:
- The handler sees a request only once its whole body is read and within
  ``max_body_bytes``; a body announced larger (Content-Length) is refused with
  413 before it is read, and a chunked body is refused as soon as it grows past
  the limit. Memory per connection is bounded by the limit plus h11's head
  buffer (`MAX_HEAD_BYTES`).
- Every response carries Content-Length. A connection is reused (keep-alive)
  only when h11 says both sides can; after any error response it is closed.
- Bad input from a peer (malformed HTTP, oversize bodies, timeouts mid-request)
  is answered 400/413/408 when possible, counted through ``on_bad_request``,
  logged at debug level with the peer address, and never ends the server.
- At most ``max_connections`` connections are served at once; further
  clients wait in the kernel's accept backlog.
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

#: largest request line + headers we buffer (h11's own default)
MAX_HEAD_BYTES = 16 * 1024
#: bytes asked of the socket per read
READ_SIZE = 64 * 1024
#: after refusing a body, how long we keep reading (and discarding) it so the
#: client sees our response instead of a connection reset
LINGER_SECONDS = 1.0
#: and at most this much of it
LINGER_BYTES = 64 * 1024 * 1024
#: time left to tell a client "503 shutting down" when its handler is cancelled
SHUTDOWN_REPLY_SECONDS = 0.5
#: pause after accept() fails for lack of file descriptors or memory
ACCEPT_BACKOFF_SECONDS = 0.1

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


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


async def open_http_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Bind ``host:port`` for `serve_http_listeners` (``None`` or ``""``: every interface; port 0: a free one).

    Raises:
        OSError: with the address and the reason, e.g.
            ``cannot listen on 127.0.0.1:4318: address already in use``.
    """
    try:
        return await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        error = OSError(f"cannot listen on {_peer((host or '*', port))}: {reason}")
        error.errno = exc.errno  # kept for callers; the message stays free of "[Errno n]"
        raise error from exc


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
    idle_timeout: float = 60.0,
    max_connections: int = 256,
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
        idle_timeout: seconds a connection may wait for a request's head to
            complete, for each read of a body, and for each write of a response.
        max_connections: connections served at once.
        on_bad_request: called with a short reason (``malformed``,
            ``body_too_large``, ``timeout``) for each refused request.
        name: used in log messages.

    Raises:
        OSError: the address cannot be bound (before ``task_status.started``),
            as from `open_http_listeners`.
    """
    listeners = await open_http_listeners(host, port)
    await serve_http_listeners(
        handler,
        listeners,
        max_body_bytes=max_body_bytes,
        task_status=task_status,
        logger=logger,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
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
    idle_timeout: float = 60.0,
    max_connections: int = 256,
    on_bad_request: BadRequestCallback | None = None,
    name: str = "http",
) -> None:
    """`serve_http` on listeners bound beforehand (by `open_http_listeners`), which it owns and closes.

    Binding first lets a caller report a bind error plainly, outside any nursery.
    """
    log = logger or logging.getLogger(__name__)
    slots = trio.Semaphore(max_connections)
    server = _Server(handler, max_body_bytes, idle_timeout, log, on_bad_request or (lambda reason: None), name)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(server.accept_loop, listener, slots, nursery)
            task_status.started(bound_port(listeners))
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


class _Timeout(Exception):
    pass


class _Server:
    def __init__(
        self,
        handler: Handler,
        max_body_bytes: int,
        idle_timeout: float,
        log: logging.Logger,
        on_bad_request: BadRequestCallback,
        name: str,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        self.log = log
        self.on_bad_request = on_bad_request
        self.name = name

    async def accept_loop(
        self, listener: trio.SocketListener, slots: trio.Semaphore, nursery: trio.Nursery
    ) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    self.log.warning("%s: accept failed (%s); retrying", self.name, exc)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(self._connection_task, stream, slots)

    async def _connection_task(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            try:
                peer = stream.socket.getpeername()[:2]
            except OSError:  # already reset by the peer
                return
            conn = _Connection(self, stream, (str(peer[0]), int(peer[1])))
            await conn.serve()
        finally:
            slots.release()
            with trio.CancelScope(shield=True):
                await stream.aclose()


class _Connection:
    """One client connection: requests in order, one at a time."""

    def __init__(self, server: _Server, stream: trio.SocketStream, client: tuple[str, int]) -> None:
        self.server = server
        self.stream = stream
        self.client = client
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def serve(self) -> None:
        try:
            while True:
                keep_going = await self._one_request()
                if not keep_going:
                    return
                if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Timeout):
            return  # the peer went away or stalled; nothing more to say to it

    async def _one_request(self) -> bool:
        """Serve one request; False when the connection is to be closed."""
        server = self.server
        try:
            with trio.move_on_after(server.idle_timeout) as head_timer:
                event = await self._next_event()
            if head_timer.cancelled_caught:
                if self._in_request():
                    self._bad("timeout", "timed out reading the request head")
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
            server.log.exception("%s: handler failed on %s %s from %s", server.name, request.method, request.target, _peer(self.client))
            await self._send_error(500, "internal error")
            return False
        await self._send_response(response, close=False)
        return True

    def _in_request(self) -> bool:
        # h11 has bytes of a request buffered, or a request is under way
        return bool(self.h11.trailing_data[0]) or self.h11.their_state is not h11.IDLE

    async def _read_body(self, request: h11.Request) -> bytes | None:
        """The request's body, or None after answering 413/408 (the connection then closes)."""
        server = self.server
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
        while True:
            with trio.move_on_after(server.idle_timeout) as timer:
                event = await self._next_event()
            if timer.cancelled_caught:
                self._bad("timeout", "timed out reading the request body")
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

    async def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, OSError):
                data = b""
            self.h11.receive_data(data)

    async def _send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            with trio.move_on_after(self.server.idle_timeout) as timer:
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
            self.server.log.exception("%s: invalid response for %s", self.server.name, _peer(self.client))
            raise trio.BrokenResourceError("invalid response") from None
        except OSError:
            raise trio.BrokenResourceError("peer went away") from None

    async def _send_error(self, status: int, message: str) -> None:
        try:
            await self._send_response(
                Response(status, [("content-type", "text/plain; charset=utf-8")], (message + "\n").encode()),
                close=True,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Timeout):
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
        self.server.log.debug("%s: bad request from %s: %s", self.server.name, _peer(self.client), detail)
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


def _peer(client: tuple[str, int]) -> str:
    host, port = client
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
