"""OTLP/HTTP sending with httpx on trio: POST /v1/<signal>, protobuf or JSON, optionally gzipped.

Invariants:
- Each request is bounded by the configured timeout as a whole (connect,
  write and read together), not only per phase.
- Compression of large bodies runs in a worker thread (zlib releases the
  GIL), so the trio loop keeps serving the other consumers meanwhile.
- `export` never raises for a failed request: every failure is an `Outcome`.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import zlib

import httpx
import trio
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from tapio import otlpjson
from tapio.pdata import Signal
from tapio.tls import client_ssl_context

from ._config import HttpExporterConfig
from ._retry import RESPONSE_CLASS, Outcome, Verdict, classify_http, partial_success

#: gzip level: OTLP payloads shrink ~6-10x at level 1, and higher levels cost
#: several times the CPU for a few percent more (the sender is CPU-bound)
GZIP_LEVEL = 1
#: bodies at least this large are compressed in a worker thread
THREAD_COMPRESS_BYTES = 64 * 1024
#: how much of an error response's body we keep for the log message
MAX_ERROR_TEXT = 300

def gzip_compress(data: bytes) -> bytes:
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    return c.compress(data) + c.flush()


class HttpSender:
    """One httpx client (a connection pool of ``concurrency`` connections) to the backend.

    Ownership: `open` creates the client, `aclose` closes it (both from trio).
    """

    def __init__(self, config: HttpExporterConfig, concurrency: int, logger: logging.Logger) -> None:
        self._config = config
        self._log = logger
        self._concurrency = concurrency
        self._urls = {s: config.signal_url(s.value) for s in Signal}
        self._json = config.encoding == "json"
        self._gzip = config.compression == "gzip"
        headers = {k: v for k, v in config.headers.items()}
        headers["content-type"] = "application/json" if self._json else "application/x-protobuf"
        if self._gzip:
            headers["content-encoding"] = "gzip"
        self._headers = headers
        self._client: httpx.AsyncClient | None = None

    @property
    def target(self) -> str:
        return self._config.endpoint or ", ".join(self._urls.values())

    def open(self) -> None:
        """Create the client (connections open on the first request). Raises OSError for unreadable TLS files."""
        needs_tls = any(url.startswith("https:") for url in self._urls.values())
        verify: ssl.SSLContext | bool = client_ssl_context(self._config.tls) if needs_tls else True
        self._client = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(float(self._config.timeout)),
            limits=httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency),
            headers=self._headers,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def encode(self, signal: Signal, payload: bytes) -> bytes:
        """The request body for a serialized export request: re-encoded as JSON if asked, then compressed."""
        body = payload
        if self._json:
            body = otlpjson.encode(signal.request_class.FromString(payload))
        if self._gzip:
            if len(body) >= THREAD_COMPRESS_BYTES:
                body = await trio.to_thread.run_sync(gzip_compress, body, abandon_on_cancel=True)
            else:
                body = gzip_compress(body)
        return body

    async def export(self, signal: Signal, payload: bytes) -> Outcome:
        """Send one serialized export request; the outcome says whether it was sent and what to do if not."""
        assert self._client is not None, "export before open"
        body = await self.encode(signal, payload)
        response = None
        with trio.move_on_after(float(self._config.timeout)):
            try:
                request = self._client.build_request("POST", self._urls[signal], content=body)
                request.stream = _Body(body)
                response = await self._client.send(request)
            except httpx.TimeoutException:
                pass
            except httpx.RequestError as exc:  # connection, TLS, protocol or body-decoding failures
                return Outcome(Verdict.RETRY, "connection_error", None, f"{type(exc).__name__}: {exc}")
        if response is None:
            return Outcome(Verdict.RETRY, "timeout", None, f"no response within {self._config.timeout}")
        status = response.status_code
        if 200 <= status < 300:
            return self._success(signal, response)
        outcome = classify_http(status, response.headers.get("retry-after"), _error_text(response), now=time.time())
        return outcome

    def _success(self, signal: Signal, response: httpx.Response) -> Outcome:
        if not response.content:
            return Outcome(Verdict.SENT)
        try:
            if response.headers.get("content-type", "").startswith("application/json"):
                parsed = otlpjson.decode(RESPONSE_CLASS[signal], response.content)
            else:
                parsed = RESPONSE_CLASS[signal].FromString(response.content)
        except (DecodeError, ValueError):
            return Outcome(Verdict.SENT, message="the server's response could not be decoded")
        return partial_success(signal.value, parsed)


class _Body(httpx.AsyncByteStream):
    """A request body that is not an async generator.

    httpx's own byte stream is one; when a send fails mid-body (a TLS peer
    hanging up) it is left unfinished and trio warns when it is collected.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> "_Once":
        return _Once(self._data)


class _Once:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> "_Once":
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


def _error_text(response: httpx.Response) -> str:
    """The server's explanation: the google.rpc.Status message OTLP/HTTP servers send, else the body's text."""
    body = response.content
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("application/x-protobuf"):
        try:
            return status_pb2.Status.FromString(body).message
        except DecodeError:
            pass
    elif ctype.startswith("application/json"):
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                return doc["message"]
        except ValueError:
            pass
    return body[:MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
