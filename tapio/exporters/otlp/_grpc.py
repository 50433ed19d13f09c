"""OTLP/gRPC sending with grpcio, from trio: each call in a worker thread, with a deadline.

Invariants:
- Payloads are sent as the bytes they are (the method has no serializer),
  so a batch serialized once for the queue is never encoded again.
- Every call carries ``timeout=``, so a worker thread is never held longer
  than the configured timeout, even when trio abandoned the call.
- Calls run under the sender's own capacity limiter (one thread per
  consumer), never the process-wide default.
- `export` never raises for a failed call: every failure is an `Outcome`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import trio
from google.protobuf.message import DecodeError

from tapio.pdata import Signal

from ._config import GrpcExporterConfig, grpc_target
from ._retry import RESPONSE_CLASS, STATUS_DETAILS_KEY, Outcome, Verdict, classify_grpc, partial_success

#: fully qualified method names of the OTLP export RPCs
METHODS = {
    Signal.TRACES: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    Signal.METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    Signal.LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
#: grpcio's reconnect backoff grows to 120 s by default; our retry schedule
#: paces the attempts, and a long channel backoff would keep failing calls
#: long after the backend is back
MAX_RECONNECT_BACKOFF_MS = 2000
MIN_RECONNECT_BACKOFF_MS = 250


def _identity(data: bytes) -> bytes:
    return data


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read tls.{what} {path}: {exc.strerror or exc}") from exc


def channel_credentials(config: GrpcExporterConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials from the config's files (None for plaintext). Raises OSError naming an unreadable file."""
    if config.plaintext():
        return None
    tls = config.tls
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file") if tls.ca_file else None,
        private_key=_read(tls.key_file, "key_file") if tls.key_file else None,
        certificate_chain=_read(tls.cert_file, "cert_file") if tls.cert_file else None,
    )


class GrpcSender:
    """One grpcio channel to the backend and an export method per signal.

    Ownership: `open` creates the channel, `aclose` closes it (both from trio).
    """

    def __init__(self, config: GrpcExporterConfig, concurrency: int, logger: logging.Logger) -> None:
        self._config = config
        self._log = logger
        self._limiter = trio.CapacityLimiter(concurrency)
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items()) or None
        self._compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        self._channel: grpc.Channel | None = None
        self._methods: dict[Signal, grpc.UnaryUnaryMultiCallable] = {}

    @property
    def target(self) -> str:
        return grpc_target(self._config.endpoint)

    def open(self) -> None:
        """Create the channel (connection happens on the first call). Raises OSError for unreadable TLS files."""
        options = [
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
            ("grpc.initial_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
            ("grpc.max_send_message_length", -1),
            # our retry schedule decides about retries, not grpcio's
            ("grpc.enable_retries", 0),
        ]
        credentials = channel_credentials(self._config)
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._methods = {
            signal: self._channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
            for signal, method in METHODS.items()
        }

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await trio.to_thread.run_sync(channel.close)

    async def export(self, signal: Signal, payload: bytes) -> Outcome:
        """Send one serialized export request; the outcome says whether it was sent and what to do if not."""
        method = self._methods[signal]
        timeout = float(self._config.timeout)
        metadata = self._metadata
        compression = self._compression

        def call() -> tuple[bytes | None, grpc.StatusCode, str, bytes | None]:
            try:
                response, _ = method.with_call(payload, timeout=timeout, metadata=metadata, compression=compression)
                return response, grpc.StatusCode.OK, "", None
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                details = err.details() if hasattr(err, "details") else str(err)
                status_bin = None
                for key, value in (err.trailing_metadata() if hasattr(err, "trailing_metadata") else None) or ():
                    if key == STATUS_DETAILS_KEY:
                        status_bin = value
                return None, code or grpc.StatusCode.UNKNOWN, details or "", status_bin

        response, code, details, status_bin = await trio.to_thread.run_sync(
            call, abandon_on_cancel=True, limiter=self._limiter
        )
        if code is not grpc.StatusCode.OK:
            return classify_grpc(code, details, status_bin)
        try:
            parsed = RESPONSE_CLASS[signal].FromString(response or b"")
        except DecodeError:
            return Outcome(Verdict.SENT, message="the server's response could not be decoded")
        return partial_success(signal.value, parsed)

