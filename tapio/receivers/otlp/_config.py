"""The otlp receiver's configuration, shaped like the OpenTelemetry Collector's otlpreceiver.

Invariants:
- A protocol is enabled exactly when its group is not None. The default
  config enables both, on 127.0.0.1; a config that names only ``grpc`` (or
  only ``http``) under ``protocols`` enables only that one, because the
  groups' own defaults are None.
- `validate` reports every problem, each prefixed with its dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tapio.component import setting
from tapio.httpserver import Limits
from tapio.units import ByteSize, Duration, parse_listen_address

DEFAULT_GRPC_ENDPOINT = "127.0.0.1:4317"
DEFAULT_HTTP_ENDPOINT = "127.0.0.1:4318"
#: the OTel Collector's default for an HTTP server's max_request_body_size
DEFAULT_MAX_REQUEST_BODY = ByteSize(20 * 1024 * 1024)
#: tapio.httpserver's default: see docs/components/otlp-receiver.md, "Slow and idle clients"
DEFAULT_MAX_CONNECTIONS = Limits().max_connections


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split a receiver endpoint ``host:port`` (see `tapio.units.parse_listen_address`)."""
    return parse_listen_address(text, example="127.0.0.1:4317")


def _endpoint_problems(key: str, endpoint: str) -> list[str]:
    try:
        parse_endpoint(endpoint)
    except ValueError as exc:
        return [f"{key}: {exc}"]
    return []


@dataclass(frozen=True, kw_only=True)
class GrpcConfig:
    endpoint: str = setting(
        DEFAULT_GRPC_ENDPOINT,
        doc="host:port to listen on for OTLP/gRPC ([addr]:port for IPv6; an empty host listens on every interface; port 0 picks a free port).",
    )
    max_recv_msg_size_mib: int = setting(4, doc="Largest request message accepted, in MiB; larger ones fail with RESOURCE_EXHAUSTED.")
    max_concurrent_streams: int = setting(0, doc="Concurrent calls per HTTP/2 connection; 0 leaves grpcio's default (no limit).")
    workers: int = setting(
        4,
        doc="Threads that hand received gRPC requests into the pipeline; each waits while the pipeline is full, so this bounds the requests in flight (a call still receiving its message takes none).",
    )
    handshake_timeout: Duration = setting(
        Duration(5.0),
        doc="How long a new connection may take to start HTTP/2 (the client's preface and settings); slower ones are closed.",
    )
    max_connection_idle: Duration = setting(
        Duration(300.0),
        doc="A connection without calls for this long is closed (with GOAWAY: clients reconnect when they next send). "
        "0: never.",
    )
    max_connection_age: Duration = setting(
        Duration(0.0),
        doc="A connection open this long is asked to go away (GOAWAY), and closed `max_connection_age_grace` later "
        "with whatever call is still unfinished on it. 0: never.",
    )
    max_connection_age_grace: Duration = setting(
        Duration(30.0),
        doc="How long calls in flight may finish after `max_connection_age` before their connection is closed.",
    )

    def validate(self, prefix: str = "protocols.grpc") -> list[str]:
        problems = _endpoint_problems(f"{prefix}.endpoint", self.endpoint)
        if self.handshake_timeout <= 0:
            problems.append(f"{prefix}.handshake_timeout: must be more than 0")
        if self.max_recv_msg_size_mib < 1:
            problems.append(f"{prefix}.max_recv_msg_size_mib: must be at least 1 (got {self.max_recv_msg_size_mib})")
        if self.max_concurrent_streams < 0:
            problems.append(f"{prefix}.max_concurrent_streams: must be 0 (no limit) or more (got {self.max_concurrent_streams})")
        if self.workers < 1:
            problems.append(f"{prefix}.workers: must be at least 1 (got {self.workers})")
        return problems


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    endpoint: str = setting(
        DEFAULT_HTTP_ENDPOINT,
        doc="host:port to listen on for OTLP/HTTP ([addr]:port for IPv6; an empty host listens on every interface; port 0 picks a free port).",
    )
    traces_url_path: str = setting("/v1/traces", doc="Path that accepts traces.")
    metrics_url_path: str = setting("/v1/metrics", doc="Path that accepts metrics.")
    logs_url_path: str = setting("/v1/logs", doc="Path that accepts logs.")
    max_request_body_size: ByteSize = setting(
        DEFAULT_MAX_REQUEST_BODY,
        doc="Largest request body accepted, both as sent and after decompression; larger ones get 413.",
    )
    read_header_timeout: Duration = setting(
        Duration(5.0),
        doc="How long a request head (request line and headers) may take to arrive, from the connection's start or from "
        "the first byte of a later request on it; a slower one is answered 408 and its connection closed.",
    )
    read_body_timeout: Duration = setting(
        Duration(10.0),
        doc="How long a request body may take to arrive, plus one second for every `min_body_rate` bytes received; "
        "a slower one is answered 408 and its connection closed.",
    )
    min_body_rate: ByteSize = setting(
        ByteSize(64 * 1024),
        doc="Bytes per second a body must keep up on average, beyond `read_body_timeout`. 0: the whole body within "
        "`read_body_timeout`.",
    )
    idle_timeout: Duration = setting(
        Duration(60.0),
        doc="How long a keep-alive connection may wait for its next request before it is closed.",
    )
    max_connections: int = setting(
        DEFAULT_MAX_CONNECTIONS,
        doc="Connections open at once. When all are taken and another client connects, the one that has waited "
        "longest without sending a complete request head is closed to make room.",
    )

    def limits(self) -> Limits:
        """What these settings ask of the HTTP server."""
        return Limits(
            max_connections=self.max_connections,
            read_header_timeout=float(self.read_header_timeout),
            read_body_timeout=float(self.read_body_timeout),
            min_body_rate=int(self.min_body_rate),
            idle_timeout=float(self.idle_timeout),
        )

    def validate(self, prefix: str = "protocols.http") -> list[str]:
        problems = _endpoint_problems(f"{prefix}.endpoint", self.endpoint)
        paths = {
            "traces_url_path": self.traces_url_path,
            "metrics_url_path": self.metrics_url_path,
            "logs_url_path": self.logs_url_path,
        }
        for key, path in paths.items():
            if not path.startswith("/"):
                problems.append(f"{prefix}.{key}: must start with '/' (got {path!r})")
        seen: dict[str, str] = {}
        for key, path in paths.items():
            if path in seen:
                problems.append(f"{prefix}.{key}: {path!r} is already used by {seen[path]}")
            seen.setdefault(path, key)
        if self.max_request_body_size < 1:
            problems.append(f"{prefix}.max_request_body_size: must be at least 1 byte")
        for key in ("read_header_timeout", "read_body_timeout", "idle_timeout"):
            if getattr(self, key) <= 0:
                problems.append(f"{prefix}.{key}: must be more than 0")
        if self.max_connections < 1:
            problems.append(f"{prefix}.max_connections: must be at least 1 (got {self.max_connections})")
        return problems


@dataclass(frozen=True, kw_only=True)
class Protocols:
    grpc: GrpcConfig | None = setting(None, doc="OTLP/gRPC server; enabled when the key is present (an empty `grpc:` takes the defaults).")
    http: HttpConfig | None = setting(None, doc="OTLP/HTTP server (protobuf and JSON); enabled when the key is present (an empty `http:` takes the defaults).")


def _both_protocols() -> Protocols:
    return Protocols(grpc=GrpcConfig(), http=HttpConfig())


@dataclass(frozen=True, kw_only=True)
class Config:
    protocols: Protocols = setting(
        default_factory=_both_protocols,
        doc="Which servers to run. Without a `protocols` key both run with their defaults.",
    )
    acknowledge: Literal["accepted", "delivered"] = setting(
        "accepted",
        doc="When a request is answered with success. `accepted`: once its data is in the pipeline (as the OTel Collector; "
        "a crash of tapio loses what it still holds). `delivered`: once every exporter delivered it or committed it to a "
        "storage-backed sending queue, so a SIGKILL loses nothing acknowledged (clients wait about a batch timeout longer, "
        "and retry what was not delivered: at-least-once).",
    )
    delivery_timeout: Duration = setting(
        Duration(30.0),
        doc="With `acknowledge: delivered`, how long a request waits for delivery before it is answered as retryable "
        "(HTTP 503, gRPC UNAVAILABLE); a gRPC client's own deadline applies too. `0` waits without limit.",
    )

    @property
    def acknowledges_before_delivery(self) -> str | None:
        """The config key that makes clients hear success before export (see tapio.config's durability warning), or None."""
        return "acknowledge" if self.acknowledge == "accepted" else None

    def validate(self) -> list[str]:
        problems: list[str] = []
        grpc, http = self.protocols.grpc, self.protocols.http
        if grpc is None and http is None:
            problems.append("protocols: must enable at least one of grpc, http")
        if grpc is not None:
            problems += grpc.validate()
        if http is not None:
            problems += http.validate()
        if grpc is not None and http is not None:
            try:
                if parse_endpoint(grpc.endpoint) == parse_endpoint(http.endpoint) and parse_endpoint(grpc.endpoint)[1] != 0:
                    problems.append(f"protocols.http.endpoint: {http.endpoint} is also the grpc endpoint")
            except ValueError:
                pass  # reported above
        return problems
