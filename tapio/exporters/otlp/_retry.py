"""What an export's outcome means (sent, retry, drop) and when to try again. Pure: no I/O.

Invariants:
- `classify_grpc` and `classify_http` map every outcome to exactly one of
  `SENT`, `RETRY` or `PERMANENT`, following the OTLP specification's
  "Failures" sections: for gRPC, UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED,
  ABORTED, OUT_OF_RANGE and DATA_LOSS are retryable, RESOURCE_EXHAUSTED only
  when the server sent a RetryInfo; for HTTP, 429, 502, 503 and 504.
  Everything else is permanent.
- A delay the server asked for (RetryInfo, Retry-After) is never negative
  and never shortened: `Backoff.next_delay` waits at least that long.
- `Backoff` gives up (returns None) only when a wait would end after
  ``max_elapsed_time`` from the first failure (0 = never gives up).
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tapio.pdata import Signal

#: the trailing metadata key carrying a serialized google.rpc.Status
STATUS_DETAILS_KEY = "grpc-status-details-bin"

RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
    }
)
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
#: longest server-requested delay we honour; a longer one (or a date far ahead) is capped
MAX_SERVER_DELAY = 3600.0
#: the response message of each signal's export call
RESPONSE_CLASS = {
    Signal.LOGS: ExportLogsServiceResponse,
    Signal.METRICS: ExportMetricsServiceResponse,
    Signal.TRACES: ExportTraceServiceResponse,
}


class Verdict(enum.Enum):
    SENT = "sent"
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    #: short, metric-label-safe reason: a gRPC code name (``unavailable``) or ``http_503``, ``timeout`` …
    reason: str = ""
    #: the delay the server asked for (RetryInfo / Retry-After), in seconds
    delay: float | None = None
    #: a human-readable explanation (server's message)
    message: str = ""
    #: items the server rejected in a partial success (verdict SENT)
    rejected: int = 0


SENT = Outcome(Verdict.SENT)


def retry_info_delay(status_details: bytes | None) -> float | None:
    """The RetryInfo delay in a serialized google.rpc.Status (the ``grpc-status-details-bin`` trailer), or None."""
    if not status_details:
        return None
    try:
        status = status_pb2.Status.FromString(status_details)
    except DecodeError:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                return min(max(delay, 0.0), MAX_SERVER_DELAY)
    return None


def classify_grpc(code: grpc.StatusCode, message: str = "", status_details: bytes | None = None) -> Outcome:
    """What a failed gRPC export call means; ``status_details`` is the ``grpc-status-details-bin`` trailer."""
    reason = code.name.lower()
    if code is grpc.StatusCode.OK:
        return SENT
    delay = retry_info_delay(status_details)
    if code in RETRYABLE_GRPC:
        return Outcome(Verdict.RETRY, reason, delay, message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
        return Outcome(Verdict.RETRY, reason, delay, message)
    return Outcome(Verdict.PERMANENT, reason, None, message)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (``now`` = Unix time).

    None when absent or unreadable; a date in the past means 0.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(int(text)), MAX_SERVER_DELAY)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None  # RFC 9110 dates are always GMT; a zoneless one is not an HTTP date
    return min(max(when.timestamp() - now, 0.0), MAX_SERVER_DELAY)


def classify_http(status: int, retry_after: str | None = None, message: str = "", *, now: float = 0.0) -> Outcome:
    """What an OTLP/HTTP response status means (``retry_after``: the header's value; ``now``: Unix time)."""
    if 200 <= status < 300:
        return SENT
    reason = f"http_{status}"
    if status in RETRYABLE_HTTP:
        return Outcome(Verdict.RETRY, reason, parse_retry_after(retry_after, now), message)
    return Outcome(Verdict.PERMANENT, reason, None, message)


class Backoff:
    """The wait before each retry of one batch: exponential, capped, jittered, with a total limit.

    Args:
        initial, maximum, multiplier, randomization: the schedule (see RetryConfig).
        max_elapsed: seconds after `start` past which no retry starts (0: retry forever).
        start: clock time of the first attempt.
        rng: the random source for jitter (a seeded one in tests).
    """

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        multiplier: float,
        randomization: float,
        max_elapsed: float,
        start: float,
        rng: random.Random | None = None,
    ) -> None:
        self._interval = initial
        self._max = maximum
        self._multiplier = multiplier
        self._randomization = randomization
        self._max_elapsed = max_elapsed
        self._start = start
        self._rng = rng or random.Random()

    def next_delay(self, now: float, server_delay: float | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up.

        The wait is the jittered interval, or the server's delay when that is longer.
        """
        interval = self._interval
        self._interval = min(self._interval * self._multiplier, self._max)
        spread = interval * self._randomization
        delay = interval - spread + self._rng.random() * 2 * spread
        if server_delay is not None and math.isfinite(server_delay):
            delay = max(delay, server_delay)
        if self._max_elapsed > 0 and now + delay - self._start > self._max_elapsed:
            return None
        return delay


_REJECTED_FIELD = {"logs": "rejected_log_records", "metrics": "rejected_data_points", "traces": "rejected_spans"}


def partial_success(signal_name: str, response) -> Outcome:
    """The SENT outcome of a successful export, with the server's partial-success report if any.

    ``response`` is a parsed Export*ServiceResponse of the signal named
    ``signal_name`` (``logs``, ``metrics``, ``traces``).
    """
    if not response.HasField("partial_success"):
        return SENT
    ps = response.partial_success
    rejected = int(getattr(ps, _REJECTED_FIELD[signal_name]))
    if rejected <= 0 and not ps.error_message:
        return SENT
    return Outcome(Verdict.SENT, "partial_success", None, ps.error_message, max(rejected, 0))
