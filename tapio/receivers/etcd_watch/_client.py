"""An etcd v3 client over the JSON gateway (httpx under trio): unary calls and watch streams, with failover.

Invariants:
- Every call goes to the current endpoint; `fail_over` moves to the next
  one (in the configured order, round robin). The client never retries on
  its own except once after etcd said the auth token is invalid (tokens
  are per member and expire): the caller decides when to fail over and how
  long to wait.
- Errors are sorted for the caller: `Unavailable` (the member cannot be
  reached or cannot serve: connection errors, timeouts, a stream that
  ended, HTTP 5xx, gRPC UNAVAILABLE, "no leader") means try another
  member; `Compacted` means the revision asked for is gone; `AuthFailed`
  means the credentials are wrong; anything else is an `EtcdError`.
- The password is sent only in the body of ``/v3/auth/authenticate`` and
  never appears in an error message or a log line; the token only in the
  ``Authorization`` header.
- Watches carry the ``hasleader`` metadata (the gateway forwards
  ``Grpc-Metadata-*`` headers), so a member that loses its leader cancels
  them instead of staying silent; idle TCP connections are probed with
  keepalives, so a member that vanished is noticed within ~25 s.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn

import httpx
import trio

from tapio.tls import client_ssl_context

from ._config import Config
from ._gateway import (
    CODE_OUT_OF_RANGE,
    CODE_UNAUTHENTICATED,
    CODE_UNAVAILABLE,
    Header,
    MalformedResponse,
    StreamError,
    parse_error,
    parse_header,
    parse_token,
)

#: TCP keepalive on every connection: first probe after 10 s idle, then every 5 s, 3 misses close it
KEEPALIVE = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10),
             (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3))
#: the most of an error answer read (its JSON is a few hundred bytes)
MAX_ERROR_BODY = 64 * 1024
class EtcdError(Exception):
    """etcd answered with an error (``code`` is its gRPC status code, 0 when unknown)."""

    def __init__(self, endpoint: str, message: str, code: int = 0) -> None:
        super().__init__(f"{endpoint}: {message}")
        self.endpoint = endpoint
        self.code = code
        self.detail = message


class Unavailable(EtcdError):
    """The member cannot be reached or cannot serve now: another member may."""


class Compacted(EtcdError):
    """The revision asked for was compacted away."""


class AuthFailed(EtcdError):
    """etcd refused the username or password (or needs them and none are configured)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class EtcdClient:
    """One connection pool to the configured members. Create, `open`, use from trio, `aclose`."""

    def __init__(self, config: Config, logger: logging.Logger, *, connections: int) -> None:
        self._config = config
        self._log = logger
        self.endpoints = [e.rstrip("/") for e in config.endpoints]
        self._index = 0
        self._connections = connections
        self._tokens: dict[str, str] = {}
        self._client: httpx.AsyncClient | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    def open(self) -> None:
        """Create the pool (connections open on first use). Raises OSError for unreadable TLS files."""
        verify: ssl.SSLContext | bool = client_ssl_context(self._config.tls) if self._config.uses_tls else True
        transport = httpx.AsyncHTTPTransport(
            verify=verify,
            limits=httpx.Limits(max_connections=self._connections, max_keepalive_connections=self._connections),
            socket_options=KEEPALIVE,
        )
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def fail_over(self, failed: str) -> None:
        """Move on from ``failed`` to the next endpoint (if another caller has not moved already)."""
        if self.endpoint == failed:
            self._index = (self._index + 1) % len(self.endpoints)

    def forget_token(self, endpoint: str) -> None:
        """etcd said the token is no longer valid: the next call authenticates again."""
        self._tokens.pop(endpoint, None)

    # ---------------------------------------------------------------- unary

    async def call(self, path: str, body: dict[str, Any]) -> bytes:
        """POST ``body`` to ``path`` of the current endpoint; the answer's bytes (raises as the module says)."""
        endpoint = self.endpoint
        for attempt in range(2):
            headers = await self._auth_headers(endpoint)
            status, data = await self._post(endpoint, path, body, headers)
            if status == 200:
                return data
            error = _error_of(data, status)
            if attempt == 0 and self._token_expired(endpoint, error):
                continue
            raise classify(endpoint, status, error)
        raise AssertionError("unreachable")

    async def current(self, key: bytes) -> Header:
        """The header of a linearizable read (through the leader): the cluster and its current revision."""
        return parse_header(await self.call("/v3/kv/range", {"key": b64(key), "count_only": True}))

    # ---------------------------------------------------------------- watch

    async def watch(self, request: dict[str, Any], handle: Callable[[bytes], Awaitable[None]]) -> NoReturn:
        """Open a watch on the current endpoint and hand ``handle`` each piece of the stream as it is read.

        Runs until the stream fails or ``handle`` raises (how the caller ends
        a watch). Raises `Unavailable` when the stream cannot be opened,
        breaks or ends, and the errors of `call` for an error answer.
        """
        assert self._client is not None, "watch before open"
        endpoint = self.endpoint
        headers = await self._auth_headers(endpoint)
        headers["grpc-metadata-hasleader"] = "true"
        timeout = httpx.Timeout(connect=float(self._config.dial_timeout), read=None, write=float(self._config.request_timeout), pool=None)
        try:
            async with self._send(endpoint + "/v3/watch", request, headers, timeout, stream=True) as response:
                if response.status_code != 200:
                    data = await _read_some(response)
                    error = _error_of(data, response.status_code)
                    self._token_expired(endpoint, error)
                    raise classify(endpoint, response.status_code, error)
                await _read_stream(response, handle)
        except httpx.HTTPError as exc:
            raise Unavailable(endpoint, f"watch failed: {_describe(exc)}") from None
        raise Unavailable(endpoint, "the watch stream ended")

    # ---------------------------------------------------------------- internals

    async def _post(self, endpoint: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        assert self._client is not None, "call before open"
        timeout = float(self._config.request_timeout)
        with trio.move_on_after(timeout) as scope:
            try:
                async with self._send(endpoint + path, body, headers, httpx.Timeout(timeout, connect=float(self._config.dial_timeout))) as response:
                    pass
            except httpx.HTTPError as exc:
                raise Unavailable(endpoint, f"{path} failed: {_describe(exc)}") from None
            return response.status_code, response.content
        assert scope.cancelled_caught
        raise Unavailable(endpoint, f"{path} took longer than request_timeout ({self._config.request_timeout})")

    @contextlib.asynccontextmanager
    async def _send(self, url: str, body: dict[str, Any], headers: dict[str, str], timeout: httpx.Timeout, *, stream: bool = False) -> AsyncIterator[httpx.Response]:
        """POST ``body`` as JSON; the response (its body unread with ``stream``), closed on exit."""
        assert self._client is not None, "call before open"
        data = json.dumps(body).encode()
        request = self._client.build_request("POST", url, content=data, headers=headers, timeout=timeout)
        request.stream = _Body(data)
        response = await self._client.send(request, stream=stream)
        try:
            yield response
        finally:
            await response.aclose()

    async def _auth_headers(self, endpoint: str) -> dict[str, str]:
        if not self._config.username:
            return {}
        token = self._tokens.get(endpoint)
        if token is None:
            credentials = {"name": self._config.username, "password": self._config.password}
            status, data = await self._post(endpoint, "/v3/auth/authenticate", credentials, {})
            if status != 200:
                raise classify(endpoint, status, _error_of(data, status), authenticating=True)
            try:
                token = parse_token(data)
            except MalformedResponse as exc:
                raise EtcdError(endpoint, f"authenticate: {exc}") from None
            self._tokens[endpoint] = token
            self._log.debug("authenticated to %s as %s", endpoint, self._config.username)
        return {"authorization": token}

    def _token_expired(self, endpoint: str, error: StreamError) -> bool:
        """Forget the token etcd refused; True if a call with a new one may succeed."""
        if error.code == CODE_UNAUTHENTICATED and "token" in error.message and self._config.username:
            self.forget_token(endpoint)
            return True
        return False


class _Body(httpx.AsyncByteStream):
    """A request body that is an iterator object, not a generator.

    httpx's own body is an async generator: a send that fails mid-write (a
    refused TLS handshake) leaves it suspended, and trio warns when it is
    collected (encode/httpx#3686).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._sent = False

    def __aiter__(self) -> "_Body":
        self._sent = False
        return self

    async def __anext__(self) -> bytes:
        if self._sent:
            raise StopAsyncIteration
        self._sent = True
        return self._data


def classify(endpoint: str, status: int, error: StreamError, *, authenticating: bool = False) -> EtcdError:
    """The exception for an error answer (see the module docstring)."""
    message = error.message or f"HTTP {status}"
    if status >= 500 and error.code == 0 or error.code == CODE_UNAVAILABLE or "no leader" in message:
        return Unavailable(endpoint, message, error.code)
    if error.code == CODE_OUT_OF_RANGE and "compacted" in message:
        return Compacted(endpoint, message, error.code)
    if authenticating or "authentication failed" in message or "user name is empty" in message:
        return AuthFailed(endpoint, message, error.code)
    return EtcdError(endpoint, message, error.code)


def _error_of(data: bytes, status: int) -> StreamError:
    try:
        doc = json.loads(data)
        if isinstance(doc, dict):
            return parse_error(doc)
    except (ValueError, RecursionError):
        pass
    text = data[:200].decode("utf-8", "replace").strip()
    return StreamError(0, f"HTTP {status}" + (f": {text}" if text else ""))


async def _read_stream(response: httpx.Response, handle: Callable[[bytes], Awaitable[None]]) -> None:
    """Hand ``handle`` each piece of ``response`` until it ends or ``handle`` raises (then raise that).

    httpx reads a body through a chain of async generators. Leaving the loop
    by an exception of ``handle`` would leave every one of them suspended
    (trio warns when they are collected); cancelling the next read instead
    unwinds the chain from its innermost await, so each generator finishes.
    """
    failure: BaseException | None = None
    with trio.CancelScope() as reading:
        async for chunk in response.aiter_raw():
            try:
                await handle(chunk)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, once the read is unwound
                failure = exc
                reading.cancel()
    if failure is not None:
        raise failure


async def _read_some(response: httpx.Response) -> bytes:
    out = bytearray()
    async for chunk in response.aiter_raw():
        out += chunk
        if len(out) >= MAX_ERROR_BODY:
            break
    return bytes(out[:MAX_ERROR_BODY])


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
