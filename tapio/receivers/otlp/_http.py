"""OTLP/HTTP: the request handler behind `tapio.httpserver`, protobuf and JSON.

Invariants (OTLP specification, "OTLP/HTTP"):
- 200 with an empty Export*ServiceResponse, in the request's encoding, only
  after ``output.send`` returned: the batch is in the pipeline.
- Errors carry a google.rpc.Status body in the request's encoding (protobuf
  unless the request was JSON): 400 for undecodable payloads and bad
  compression (not retryable), 413 for bodies over the limit (also after
  decompression), 415 for other content types or encodings, 404 for unknown
  paths and for signals no pipeline takes, 405 for methods other than POST,
  503 with Retry-After when the pipeline is closed (retryable).
- Decompression never produces more than ``max_request_body_size`` bytes.
"""

from __future__ import annotations

import json
import logging
import zlib

from google.protobuf.message import DecodeError

from tapio import otlpjson
from tapio.component import Consumer
from tapio.httpserver import Request, Response
from tapio.pdata import Batch, Signal
from tapio.telemetry import ComponentTelemetry

from ._delivery import REFUSAL_TEXT, Delivery
from ._config import HttpConfig

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: seconds a client is asked to wait before retrying a refused request
RETRY_AFTER_SECONDS = 1

# google.rpc.Code values used in Status bodies
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_RESOURCE_EXHAUSTED = 8
_UNIMPLEMENTED = 12
_UNAVAILABLE = 14

# zlib window bits: gzip framing, zlib framing, raw deflate
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


class TooLarge(ValueError):
    pass


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo a Content-Encoding (``gzip``, ``deflate``, ``identity`` or empty) without exceeding ``limit`` bytes.

    Raises:
        TooLarge: the decoded body would exceed ``limit``.
        ValueError: the data is not valid for the encoding, or the encoding is unknown.
    """
    if encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip"):
        return _inflate(data, _GZIP_WBITS, limit)
    if encoding == "deflate":
        # RFC 9110 deflate is zlib-framed; some senders send raw deflate
        try:
            return _inflate(data, _ZLIB_WBITS, limit)
        except TooLarge:
            raise
        except ValueError:
            return _inflate(data, _RAW_DEFLATE_WBITS, limit)
    raise ValueError(f"unsupported content encoding {encoding!r}")


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    rest = data
    while True:  # gzip may hold several members back to back
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(f"corrupt compressed body: {exc}") from None
        if len(out) > limit:
            raise TooLarge(f"body exceeds {limit} bytes once decompressed")
        if not d.eof:
            if d.unconsumed_tail:  # output limit reached exactly with input left
                raise TooLarge(f"body exceeds {limit} bytes once decompressed")
            raise ValueError("truncated compressed body")
        rest = d.unused_data
        if not rest or wbits != _GZIP_WBITS:
            if rest:
                raise ValueError("trailing bytes after the compressed body")
            return bytes(out)


def encode_status(code: int, message: str, *, as_json: bool) -> bytes:
    """A google.rpc.Status with ``code`` and ``message`` (no details), as protobuf or JSON."""
    if as_json:
        return json.dumps({"code": code, "message": message}).encode()
    text = message.encode()
    out = bytearray()
    if code:
        out += b"\x08" + _varint(code)  # field 1, varint
    if text:
        out += b"\x12" + _varint(len(text)) + text  # field 2, length-delimited
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


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

    async def __call__(self, request: Request) -> Response:
        signal = self._paths.get(request.path)
        if signal is None:
            return _plain(404, f"no OTLP endpoint at {request.path}")
        if request.method != "POST":
            return Response(405, [("allow", "POST"), ("content-type", "text/plain; charset=utf-8")], b"use POST\n")
        media_type = _media_type(request.header("content-type"))
        as_json = media_type == JSON
        if signal not in self._output.signals:
            return _status(404, _UNIMPLEMENTED, f"no pipeline takes {signal} from this receiver", as_json)
        if media_type not in (PROTOBUF, JSON):
            self._bad(request, "http_unsupported_media_type", f"content type {media_type!r}")
            return _status(415, _INVALID_ARGUMENT, f"unsupported content type {media_type!r}: use {PROTOBUF} or {JSON}", False)

        encoding = (request.header("content-encoding") or "").strip().lower()
        try:
            body = decompress(request.body, encoding, self._limit)
        except TooLarge as exc:
            self._bad(request, "http_body_too_large", str(exc))
            return _status(413, _RESOURCE_EXHAUSTED, str(exc), as_json)
        except ValueError as exc:
            unknown = encoding not in ("gzip", "x-gzip", "deflate")
            self._bad(request, "http_bad_encoding", str(exc))
            return _status(415 if unknown else 400, _INVALID_ARGUMENT, str(exc), as_json)

        try:
            if as_json:
                message = otlpjson.decode(signal, body)
                batch = Batch.of(signal, message)
            else:
                batch = Batch.from_bytes(signal, body)
        except (DecodeError, ValueError) as exc:
            self._bad(request, "http_undecodable", f"{signal.request_class.__name__}: {exc}")
            what = "OTLP/JSON" if as_json else "protobuf"
            return _status(400, _INVALID_ARGUMENT, f"cannot decode {what} {signal.request_class.__name__}: {exc}", as_json)

        if batch.count:
            refused = await self._delivery.deliver(batch)
            if refused is not None:
                response = _status(503, _UNAVAILABLE, f"{REFUSAL_TEXT[refused]}; retry later", as_json)
                response.headers.append(("retry-after", str(RETRY_AFTER_SECONDS)))
                return response
        # an empty Export*ServiceResponse: no bytes in protobuf, {} in JSON
        return Response(200, [("content-type", JSON if as_json else PROTOBUF)], b"{}" if as_json else b"")

    def on_bad_http(self, reason: str) -> None:
        """`tapio.httpserver`'s bad-request callback: HTTP-level problems (it logs them itself)."""
        self._telemetry.bad_input(f"http_{reason}")

    def _bad(self, request: Request, reason: str, detail: str) -> None:
        self._telemetry.bad_input(reason)
        host, port = request.client
        self._log.debug("bad OTLP/HTTP request %s from %s:%s: %s", request.path, host, port, detail)


def _status(http_status: int, code: int, message: str, as_json: bool) -> Response:
    return Response(
        http_status,
        [("content-type", JSON if as_json else PROTOBUF)],
        encode_status(code, message, as_json=as_json),
    )


def _plain(status: int, message: str) -> Response:
    return Response(status, [("content-type", "text/plain; charset=utf-8")], (message + "\n").encode())
