"""Configuration of the ``otlp`` (gRPC) and ``otlphttp`` exporters, as the OTel Collector's.

Invariants:
- Every field has the OTel Collector's default, except where a field says
  otherwise; `validate` reports every problem, each prefixed with its dotted key.
- The two exporters share `TLSConfig`, `RetryConfig` and `QueueConfig`; only
  the endpoint keys, the timeout default and ``encoding`` differ.
"""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from tapio.component import StorageRef, setting
from tapio.tls import client_tls_problems
from tapio.units import Duration

TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    insecure: bool = setting(
        False,
        doc="gRPC only: send in plaintext, without TLS (an endpoint written `http://host:port` means the same). "
        "For otlphttp the endpoint's scheme decides: `http://` is plaintext, `https://` is TLS.",
    )
    ca_file: str = setting("", doc="PEM file of the CA(s) that signed the server's certificate; empty trusts the system's CAs.")
    cert_file: str = setting("", doc="PEM client certificate for mutual TLS; empty sends none. Needs `key_file`.")
    key_file: str = setting("", doc="PEM private key of `cert_file`; empty with an empty `cert_file`.")
    insecure_skip_verify: bool = setting(
        False,
        doc="otlphttp only: use TLS but accept any server certificate (testing only; grpcio cannot do this).",
    )
    min_version: Literal["1.0", "1.1", "1.2", "1.3"] = setting(
        "1.2",
        doc="Oldest TLS version accepted. otlphttp sets it as its TLS context's minimum (OpenSSL 3 at its default "
        "security level refuses 1.0 and 1.1 anyway). The gRPC exporter accepts only 1.2: grpcio always negotiates "
        "TLS 1.2 or 1.3 and has no setting to change either bound.",
    )

    def validate(self, grpc: bool, prefix: str = "tls") -> list[str]:
        problems = client_tls_problems(self, prefix, TLS_VERSIONS)
        if grpc:
            if self.insecure_skip_verify:
                problems.append(
                    f"{prefix}.insecure_skip_verify: not supported by the gRPC exporter (grpcio always verifies); "
                    "give the server's CA in ca_file instead"
                )
            if self.min_version in ("1.0", "1.1"):
                problems.append(
                    f"{prefix}.min_version: the gRPC exporter cannot use TLS {self.min_version}: grpcio never negotiates "
                    "older than 1.2 and has no setting for it, so a server that needs 1.0 or 1.1 cannot be reached; write 1.2"
                )
            elif self.min_version == "1.3":
                problems.append(
                    f"{prefix}.min_version: the gRPC exporter cannot require TLS 1.3: grpcio negotiates 1.2 or 1.3 "
                    "(1.3 whenever the server offers it) and has no setting to refuse 1.2; write 1.2, "
                    "or use otlphttp, which can require 1.3"
                )
        elif self.insecure:
            problems.append(f"{prefix}.insecure: not used by otlphttp; write the endpoint with http:// for plaintext")
        return problems


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    enabled: bool = setting(True, doc="Retry failed sends that a retry may fix; false drops a batch after its first failure (counted).")
    initial_interval: Duration = setting(Duration(5.0), doc="Wait before the first retry.")
    max_interval: Duration = setting(Duration(30.0), doc="Longest wait between two retries.")
    max_elapsed_time: Duration = setting(
        Duration(300.0),
        doc="Give up on a batch (drop it, counted) once it has been retried this long; 0 retries forever.",
    )
    multiplier: float = setting(1.5, doc="Each wait is the previous one times this (capped at `max_interval`).")
    randomization_factor: float = setting(
        0.5,
        doc="Jitter: each wait is drawn from [w*(1-f), w*(1+f)]; 0 waits exactly.",
    )

    def validate(self, prefix: str = "retry_on_failure") -> list[str]:
        problems: list[str] = []
        if not self.enabled:
            return problems
        if self.initial_interval <= 0:
            problems.append(f"{prefix}.initial_interval: must be more than 0")
        if self.max_interval < self.initial_interval:
            problems.append(
                f"{prefix}.max_interval: must be >= initial_interval ({self.initial_interval}), got {self.max_interval}"
            )
        if not math.isfinite(self.multiplier) or self.multiplier < 1:
            problems.append(f"{prefix}.multiplier: must be at least 1, got {self.multiplier}")
        if not math.isfinite(self.randomization_factor) or not 0 <= self.randomization_factor <= 1:
            problems.append(f"{prefix}.randomization_factor: must be between 0 and 1, got {self.randomization_factor}")
        return problems


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    enabled: bool = setting(
        True,
        doc="Queue batches and send them from `num_consumers` tasks; false sends each batch from the input loop, "
        "one at a time (backpressure then reaches the receivers while the backend is slow or down).",
    )
    num_consumers: int = setting(10, doc="Batches sent at once (concurrent requests).")
    queue_size: int = setting(1000, doc="Most batches the queue holds (in memory or on disk).")
    storage: StorageRef | None = setting(
        None,
        doc="The id of a storage extension (listed in `service.extensions`, e.g. `storage`) to keep the queue in, "
        "so it survives a restart or crash of tapio; empty keeps it in memory.",
    )
    block_on_overflow: bool = setting(
        False,
        doc="When the queue is full: true waits for room (backpressure reaches the receivers); "
        "false drops the batch, counts it in `exporter_enqueue_failed` and tells its sources it was not delivered.",
    )

    @property
    def durable(self) -> bool:
        """Whether what the queue holds survives a crash (kept in storage)."""
        return self.enabled and self.storage is not None

    def validate(self, prefix: str = "sending_queue") -> list[str]:
        problems: list[str] = []
        if not self.enabled:
            if self.storage is not None:
                problems.append(f"{prefix}.storage: needs the queue enabled (sending_queue.enabled: true)")
            return problems
        if self.num_consumers < 1:
            problems.append(f"{prefix}.num_consumers: must be at least 1, got {self.num_consumers}")
        if self.queue_size < 1:
            problems.append(f"{prefix}.queue_size: must be at least 1, got {self.queue_size}")
        return problems


def _common_problems(
    headers: dict[str, str], timeout: float, tls: TLSConfig, retry: RetryConfig, queue: QueueConfig, grpc: bool
) -> list[str]:
    problems: list[str] = []
    for key, value in headers.items():
        if not key or any(c.isspace() or c == ":" for c in key):
            problems.append(f"headers.{key}: not a valid header name")
        elif grpc and key.lower() != key:
            problems.append(f"headers.{key}: gRPC metadata keys must be lowercase")
        if "\n" in value or "\r" in value:
            problems.append(f"headers.{key}: the value must not contain line breaks")
    if timeout <= 0:
        problems.append("timeout: must be more than 0")
    problems += tls.validate(grpc)
    problems += retry.validate()
    problems += queue.validate()
    return problems


@dataclass(frozen=True, kw_only=True)
class GrpcExporterConfig:
    endpoint: str = setting(
        "",
        doc="host:port of the OTLP/gRPC server (e.g. tempo:4317). `http://host:port` means plaintext, "
        "`https://host:port` TLS; a bare host:port uses TLS unless `tls.insecure` is true.",
    )
    tls: TLSConfig = setting(default_factory=TLSConfig, doc="Transport security.")
    headers: dict[str, str] = setting(default_factory=dict, doc="gRPC metadata sent with every call (e.g. an auth token); keys lowercase. Never logged.", secret=True)
    compression: Literal["gzip", "none"] = setting("gzip", doc="`gzip` compresses every request; `none` sends it as is.")
    timeout: Duration = setting(Duration(5.0), doc="Deadline of each export call.")
    retry_on_failure: RetryConfig = setting(default_factory=RetryConfig, doc="Retries of failed sends.")
    sending_queue: QueueConfig = setting(default_factory=QueueConfig, doc="Queue between the pipeline and the senders.")

    queues_durably = property(lambda self: self.sending_queue.durable, doc="Whether what this exporter accepted survives a crash.")

    def validate(self) -> list[str]:
        problems: list[str] = []
        try:
            grpc_target(self.endpoint)
        except ValueError as exc:
            problems.append(f"endpoint: {exc}")
        if self.compression not in ("gzip", "none"):
            problems.append(f"compression: must be gzip or none, got {self.compression!r}")
        return problems + _common_problems(
            self.headers, self.timeout, self.tls, self.retry_on_failure, self.sending_queue, grpc=True
        )

    def plaintext(self) -> bool:
        """True if calls go without TLS (by `tls.insecure` or an ``http://`` endpoint)."""
        scheme = self.endpoint.partition("://")[0] if "://" in self.endpoint else ""
        if scheme == "https":
            return False
        return scheme == "http" or self.tls.insecure


def grpc_target(endpoint: str) -> str:
    """The ``host:port`` grpcio dials, from an endpoint with or without an http(s):// scheme.

    Raises ValueError with a message fit to follow the key name.
    """
    text = endpoint.strip()
    if not text:
        raise ValueError("required: host:port of the OTLP/gRPC server, e.g. otel-collector:4317")
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r} is not supported: write host:port, http://host:port or https://host:port")
        text = text.rstrip("/")
        if "/" in text:
            raise ValueError(f"{endpoint!r}: a gRPC endpoint has no path")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{endpoint!r} has no port: write host:port, e.g. otel-collector:4317")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{endpoint!r}: port {port!r} is not a number from 1 to 65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{endpoint!r}: write an IPv6 address in brackets, e.g. [::1]:4317")
    return f"{host}:{port}"


@dataclass(frozen=True, kw_only=True)
class HttpExporterConfig:
    endpoint: str = setting(
        "",
        doc="Base URL of the OTLP/HTTP server (e.g. https://otel-collector:4318); /v1/traces, /v1/metrics "
        "and /v1/logs are appended. Empty needs all three of the signal endpoints below.",
    )
    traces_endpoint: str = setting("", doc="Full URL for traces, used as is; empty derives it from `endpoint`.")
    metrics_endpoint: str = setting("", doc="Full URL for metrics, used as is; empty derives it from `endpoint`.")
    logs_endpoint: str = setting("", doc="Full URL for logs, used as is; empty derives it from `endpoint`.")
    encoding: Literal["proto", "json"] = setting("proto", doc="Body encoding: `proto` (application/x-protobuf) or `json` (OTLP/JSON).")
    tls: TLSConfig = setting(default_factory=TLSConfig, doc="Transport security (for https:// URLs).")
    headers: dict[str, str] = setting(default_factory=dict, doc="HTTP headers sent with every request (e.g. an auth token). Never logged.", secret=True)
    compression: Literal["gzip", "none"] = setting("gzip", doc="`gzip` compresses every request body; `none` sends it as is.")
    timeout: Duration = setting(Duration(30.0), doc="Deadline of each request.")
    retry_on_failure: RetryConfig = setting(default_factory=RetryConfig, doc="Retries of failed sends.")
    sending_queue: QueueConfig = setting(default_factory=QueueConfig, doc="Queue between the pipeline and the senders.")

    queues_durably = property(lambda self: self.sending_queue.durable, doc="Whether what this exporter accepted survives a crash.")

    def validate(self) -> list[str]:
        problems: list[str] = []
        if self.endpoint:
            problems += _url_problems("endpoint", self.endpoint)
        for key in ("traces_endpoint", "metrics_endpoint", "logs_endpoint"):
            value = getattr(self, key)
            if value:
                problems += _url_problems(key, value)
            elif not self.endpoint:
                problems.append(f"{key}: required when endpoint is empty (or set endpoint, e.g. http://otel-collector:4318)")
        if self.encoding not in ("proto", "json"):
            problems.append(f"encoding: must be proto or json, got {self.encoding!r}")
        if self.compression not in ("gzip", "none"):
            problems.append(f"compression: must be gzip or none, got {self.compression!r}")
        return problems + _common_problems(
            self.headers, self.timeout, self.tls, self.retry_on_failure, self.sending_queue, grpc=False
        )

    def signal_url(self, signal_name: str) -> str:
        """The URL a signal is posted to: its own ``*_endpoint``, else ``endpoint`` + ``/v1/<signal>``."""
        own = getattr(self, f"{signal_name}_endpoint")
        if own:
            return own
        return self.endpoint.rstrip("/") + f"/v1/{signal_name}"


def _url_problems(key: str, url: str) -> list[str]:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return [f"{key}: {url!r} is not a URL: {exc}"]
    if parts.scheme not in ("http", "https"):
        return [f"{key}: {url!r} must start with http:// or https://"]
    if not parts.hostname:
        return [f"{key}: {url!r} has no host"]
    return []
