"""OTLP/HTTP: the request handler behind `tapio.httpserver`, protobuf and JSON.

Invariants (OTLP specification, "OTLP/HTTP"):
- 200 with an empty Export*ServiceResponse, in the request's encoding, only
  after ``output.send`` returned: the batch is in the pipeline.
- Errors carry a google.rpc.Status body in the request's encoding (protobuf
  unless the request was JSON): 400 for undecodable payloads and bad
  compression (not retryable), 413 for bodies over the limit (also after
  decompression), 415 for other content types or encodings, 404 for unknown
  paths and for signals no pipeline takes, 405 for methods other than POST,
  503 with Retry-After when the pipeline is closed or decoding did not get
  its turn in time (retryable).
- Decompression never produces more than ``max_request_body_size`` bytes.
- Nothing that takes more than ~50 µs runs on the event loop: a body is
  decompressed and decoded on the loop only when it is uncompressed and
  small enough (`INLINE_PROTOBUF_BYTES`, `INLINE_JSON_BYTES`); every other
  one in a worker thread, at most `DECODE_THREADS` at once, within
  `DECODE_DEADLINE_SECONDS`. (OTLP/JSON is decoded in pieces, see
  `tapio.otlpjson`, so the thread does not hold the GIL for a whole body.)
"""

from __future__ import annotations

import logging
import zlib

import trio
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from tapio import otlpjson
from tapio.component import Consumer
from tapio.httpserver import Request, Response
from tapio.pdata import Batch, Signal
from tapio.telemetry import ComponentTelemetry
from tapio.units import join_host_port

from ._delivery import REFUSAL_TEXT, Delivery
from ._config import HttpConfig

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: seconds a client is asked to wait before retrying a refused request
RETRY_AFTER_SECONDS = 1
#: uncompressed bodies up to these sizes are decoded on the event loop, where that costs less than the hop to a
#: worker thread and back (~50 µs); measured: protobuf parses at ~1.5 ns per byte, OTLP/JSON decodes at ~20 ns
INLINE_PROTOBUF_BYTES = 32 * 1024
INLINE_JSON_BYTES = 2 * 1024
#: decodes in worker threads at once: one large body does not hold up every other request, and more would only
#: share one interpreter lock (and hold more decoded bodies in memory)
DECODE_THREADS = 2
#: longest a request waits for a decoding thread plus its decode (a 20 MiB OTLP/JSON body takes ~0.5 s);
#: beyond it the client is asked to retry (503)
DECODE_DEADLINE_SECONDS = 10.0

# zlib window bits: gzip framing, zlib framing, raw deflate
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


class TooLarge(ValueError):
    """The body exceeds the size limit, as sent or once decompressed."""


class BadEncoding(ValueError):
    """The body is not valid for its Content-Encoding, or the encoding is unknown."""


class Undecodable(ValueError):
    """The (decompressed) body is not an export request in its content type."""


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo a Content-Encoding (``gzip``, ``deflate``, ``identity`` or empty) without exceeding ``limit`` bytes.

    Raises:
        TooLarge: the decoded body would exceed ``limit``.
        BadEncoding: the data is not valid for the encoding, or the encoding is unknown.
    """
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip"):
        return _inflate(data, _GZIP_WBITS, limit)
    if encoding == "deflate":
        # RFC 9110 deflate is zlib-framed; some senders send raw deflate
        try:
            return _inflate(data, _ZLIB_WBITS, limit)
        except BadEncoding:
            return _inflate(data, _RAW_DEFLATE_WBITS, limit)
    raise BadEncoding(f"unsupported content encoding {encoding!r}")


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    rest = data
    while True:  # gzip may hold several members back to back
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise BadEncoding(f"corrupt compressed body: {exc}") from None
        if len(out) > limit:
            raise TooLarge(f"body exceeds {limit} bytes once decompressed")
        if not d.eof:
            if d.unconsumed_tail:  # output limit reached exactly with input left
                raise TooLarge(f"body exceeds {limit} bytes once decompressed")
            raise BadEncoding("truncated compressed body")
        rest = d.unused_data
        if not rest or wbits != _GZIP_WBITS:
            if rest:
                raise BadEncoding("trailing bytes after the compressed body")
            return bytes(out)


def encode_status(code: int, message: str, *, as_json: bool) -> bytes:
    """A google.rpc.Status with ``code`` and ``message`` (no details), as protobuf or JSON."""
    status = status_pb2.Status(code=code, message=message)
    return otlpjson.encode(status) if as_json else status.SerializeToString()


def decode_body(signal: Signal, body: bytes, encoding: str, as_json: bool, limit: int) -> Batch:
    """Decompress and decode one request body into a batch (pure; runs in a worker thread for large bodies).

    Raises:
        TooLarge: the body exceeds ``limit`` once decompressed.
        BadEncoding: the body does not match ``encoding``, or the encoding is unknown.
        Undecodable: the body is not an export request of ``signal``.
    """
    data = decompress(body, encoding, limit)
    try:
        if as_json:
            return Batch.of(signal, otlpjson.decode(signal, data))
        return Batch.from_bytes(signal, data)
    except (DecodeError, ValueError) as exc:
        raise Undecodable(str(exc)) from None


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


class OtlpHttpHandler:
    """Answers OTLP/HTTP export requests; one instance per receiver, called by `tapio.httpserver`."""

    def __init__(
        self,
        config: HttpConfig,
        output: Consumer,
        telemetry: ComponentTelemetry,
        delivery: Delivery,
        logger: logging.Logger,
    ) -> None:
        self._paths = {
            config.traces_url_path: Signal.TRACES,
            config.metrics_url_path: Signal.METRICS,
            config.logs_url_path: Signal.LOGS,
        }
        self._limit = int(config.max_request_body_size)
        self._output = output
        self._delivery = delivery
        self._telemetry = telemetry
        self._log = logger
        self._decoders = trio.CapacityLimiter(DECODE_THREADS)

    async def __call__(self, request: Request) -> Response:
        signal = self._paths.get(request.path)
        if signal is None:
            return _plain(404, f"no OTLP endpoint at {request.path}")
        if request.method != "POST":
            return Response(405, [("allow", "POST"), ("content-type", "text/plain; charset=utf-8")], b"use POST\n")
        media_type = _media_type(request.header("content-type"))
        as_json = media_type == JSON
        if signal not in self._output.signals:
            return _status(404, code_pb2.UNIMPLEMENTED, f"no pipeline takes {signal} from this receiver", as_json)
        if media_type not in (PROTOBUF, JSON):
            self._bad(request, "http_unsupported_media_type", f"content type {media_type!r}")
            return _status(415, code_pb2.INVALID_ARGUMENT, f"unsupported content type {media_type!r}: use {PROTOBUF} or {JSON}", False)

        encoding = (request.header("content-encoding") or "").strip().lower()
        try:
            batch = await self._decode(signal, request.body, encoding, as_json)
        except TooLarge as exc:
            self._bad(request, "http_body_too_large", str(exc))
            return _status(413, code_pb2.RESOURCE_EXHAUSTED, str(exc), as_json)
        except BadEncoding as exc:
            unknown = encoding not in ("gzip", "x-gzip", "deflate")
            self._bad(request, "http_bad_encoding", str(exc))
            return _status(415 if unknown else 400, code_pb2.INVALID_ARGUMENT, str(exc), as_json)
        except Undecodable as exc:
            self._bad(request, "http_undecodable", f"{signal.request_class.__name__}: {exc}")
            what = "OTLP/JSON" if as_json else "protobuf"
            return _status(400, code_pb2.INVALID_ARGUMENT, f"cannot decode {what} {signal.request_class.__name__}: {exc}", as_json)
        if batch is None:
            self._log.debug("OTLP/HTTP request from %s waited %gs to be decoded; asked to retry", join_host_port(*request.client), DECODE_DEADLINE_SECONDS)
            return _retry_later("the receiver is busy decoding other requests", as_json)

        batch.client_address = request.client[0]
        if batch.count:
            refused = await self._delivery.deliver(batch)
            if refused is not None:
                return _retry_later(REFUSAL_TEXT[refused], as_json)
        # an empty Export*ServiceResponse: no bytes in protobuf, {} in JSON
        return Response(200, [("content-type", JSON if as_json else PROTOBUF)], b"{}" if as_json else b"")

    async def _decode(self, signal: Signal, body: bytes, encoding: str, as_json: bool) -> Batch | None:
        """`decode_body`, on the loop when cheap, else in a worker thread; None when it did not finish in time."""
        inline = INLINE_JSON_BYTES if as_json else INLINE_PROTOBUF_BYTES
        if encoding in ("", "identity") and len(body) <= inline:
            return decode_body(signal, body, encoding, as_json, self._limit)
        with trio.move_on_after(DECODE_DEADLINE_SECONDS):
            # abandoned on cancellation: the thread finishes a decode nobody waits for (bounded by the body size)
            return await trio.to_thread.run_sync(
                decode_body, signal, body, encoding, as_json, self._limit, limiter=self._decoders, abandon_on_cancel=True
            )
        return None

    def on_bad_http(self, reason: str) -> None:
        """`tapio.httpserver`'s bad-request callback: HTTP-level problems (it logs them itself)."""
        self._telemetry.bad_input(f"http_{reason}")

    def _bad(self, request: Request, reason: str, detail: str) -> None:
        self._telemetry.bad_input(reason)
        self._log.debug("bad OTLP/HTTP request %s from %s: %s", request.path, join_host_port(*request.client), detail)


def _status(http_status: int, code: int, message: str, as_json: bool) -> Response:
    return Response(
        http_status,
        [("content-type", JSON if as_json else PROTOBUF)],
        encode_status(code, message, as_json=as_json),
    )


def _retry_later(why: str, as_json: bool) -> Response:
    response = _status(503, code_pb2.UNAVAILABLE, f"{why}; retry later", as_json)
    response.headers.append(("retry-after", str(RETRY_AFTER_SECONDS)))
    return response


def _plain(status: int, message: str) -> Response:
    return Response(status, [("content-type", "text/plain; charset=utf-8")], (message + "\n").encode())
