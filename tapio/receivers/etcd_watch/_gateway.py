"""etcd's v3 JSON gateway, parsed: watch stream lines and range responses. Pure: no I/O.

The gateway is grpc-gateway in front of etcd's gRPC API. Its JSON follows
the proto3 JSON mapping of etcdserverpb: keys and values are base64, int64
and uint64 fields are decimal strings, and fields at their default value are
left out — so a PUT event has no ``type`` (PUT is enum value 0) and a key
without a lease has no ``lease``. A watch answers with one JSON object per
line, ``{"result": WatchResponse}``, or ``{"error": {...}}`` when the stream
itself fails; unary calls answer the message itself, or ``{"error": text,
"code": grpc_code, "message": text}`` with an HTTP error status.

Invariants:
- `parse_watch_line` and `parse_range` either return fully typed values or
  raise `MalformedResponse` (a ValueError) saying what was wrong; no other
  exception escapes for any input.
- `LineSplitter` never holds more than its limit: a longer line raises
  `MalformedResponse` instead of growing the buffer.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

#: gRPC status codes etcd answers with (google.rpc.Code)
CODE_INVALID_ARGUMENT = 3
CODE_PERMISSION_DENIED = 7
CODE_OUT_OF_RANGE = 11  # a compacted (or future) revision
CODE_UNAVAILABLE = 14
CODE_UNAUTHENTICATED = 16

_MAX_INT64 = (1 << 63) - 1
_MAX_UINT64 = (1 << 64) - 1


class MalformedResponse(ValueError):
    """The gateway sent something that is not what etcd's API defines (the message says what)."""


@dataclass(slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(slots=True)
class Event:
    """One watch event: a PUT or a DELETE of ``kv.key`` at ``kv.mod_revision``."""

    deleted: bool
    kv: KeyValue
    #: the key's previous version (only when the watch asked for prev_kv and there was one)
    prev: KeyValue | None


@dataclass(slots=True)
class Header:
    cluster_id: int
    member_id: int
    #: the store's revision when the response was made
    revision: int


@dataclass(slots=True)
class WatchResponse:
    header: Header
    created: bool = False
    canceled: bool = False
    #: when canceled because the start revision was compacted: the oldest revision still kept
    compact_revision: int = 0
    cancel_reason: str = ""
    events: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class StreamError:
    """The watch stream failed (the gateway's ``{"error": ...}`` line, or an error answer)."""

    code: int
    message: str


@dataclass(slots=True)
class RangePage:
    header: Header
    kvs: list[KeyValue]
    #: more keys follow (the request's limit cut the page)
    more: bool


def parse_watch_line(line: bytes) -> WatchResponse | StreamError:
    """One line of a ``/v3/watch`` stream."""
    doc = _json_object(line)
    if "result" in doc:
        return _watch_response(_obj(doc["result"], "result"))
    if "error" in doc:
        return parse_error(doc)
    raise MalformedResponse("a watch line holds neither 'result' nor 'error'")


def parse_error(doc: dict[str, Any]) -> StreamError:
    """The error of a gateway answer: ``{"error": {"grpc_code", "message"}}`` (streams) or ``{"code", "message"}`` (unary)."""
    err = doc.get("error")
    if isinstance(err, dict):
        return StreamError(_int(err.get("grpc_code", err.get("code", 0)), "error.grpc_code"), _str(err.get("message", ""), "error.message"))
    message = doc.get("message", err if isinstance(err, str) else "")
    return StreamError(_int(doc.get("code", 0), "code"), _str(message, "message"))


def parse_range(body: bytes) -> RangePage:
    """The answer of ``/v3/kv/range``."""
    doc = _json_object(body)
    kvs = doc.get("kvs", [])
    if not isinstance(kvs, list):
        raise MalformedResponse("kvs: expected a list")
    more = doc.get("more", False)
    if not isinstance(more, bool):
        raise MalformedResponse("more: expected true or false")
    return RangePage(_header(doc), [_kv(kv, f"kvs[{i}]") for i, kv in enumerate(kvs)], more)


def parse_header(body: bytes) -> Header:
    """The header of any unary answer (put, delete, status …)."""
    return _header(_json_object(body))


def parse_token(body: bytes) -> str:
    """The token of an ``/v3/auth/authenticate`` answer."""
    token = _json_object(body).get("token")
    if not isinstance(token, str) or not token:
        raise MalformedResponse("an authenticate answer without a token")
    return token


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedResponse(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedResponse(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _watch_response(doc: dict[str, Any]) -> WatchResponse:
    events = doc.get("events", [])
    if not isinstance(events, list):
        raise MalformedResponse("result.events: expected a list")
    return WatchResponse(
        header=_header(doc),
        created=_bool(doc.get("created", False), "result.created"),
        canceled=_bool(doc.get("canceled", False), "result.canceled"),
        compact_revision=_int(doc.get("compact_revision", 0), "result.compact_revision"),
        cancel_reason=_str(doc.get("cancel_reason", ""), "result.cancel_reason"),
        events=[_event(_obj(e, f"events[{i}]"), i) for i, e in enumerate(events)],
    )


def _event(doc: dict[str, Any], i: int) -> Event:
    kind = doc.get("type", "PUT")
    if kind not in ("PUT", "DELETE", 0, 1):
        raise MalformedResponse(f"events[{i}].type: unknown event type {kind!r}")
    if "kv" not in doc:
        raise MalformedResponse(f"events[{i}]: an event without kv")
    prev = doc.get("prev_kv")
    return Event(
        deleted=kind in ("DELETE", 1),
        kv=_kv(doc["kv"], f"events[{i}].kv"),
        prev=None if prev is None else _kv(prev, f"events[{i}].prev_kv"),
    )


def _kv(doc: Any, where: str) -> KeyValue:
    doc = _obj(doc, where)
    return KeyValue(
        key=_b64(doc.get("key", ""), f"{where}.key"),
        value=_b64(doc.get("value", ""), f"{where}.value"),
        create_revision=_int(doc.get("create_revision", 0), f"{where}.create_revision"),
        mod_revision=_int(doc.get("mod_revision", 0), f"{where}.mod_revision"),
        version=_int(doc.get("version", 0), f"{where}.version"),
        lease=_int(doc.get("lease", 0), f"{where}.lease"),
    )


def _header(doc: dict[str, Any]) -> Header:
    h = _obj(doc.get("header", {}), "header")
    return Header(
        cluster_id=_int(h.get("cluster_id", 0), "header.cluster_id", _MAX_UINT64),
        member_id=_int(h.get("member_id", 0), "header.member_id", _MAX_UINT64),
        revision=_int(h.get("revision", 0), "header.revision"),
    )


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedResponse(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, maximum: int = _MAX_INT64) -> int:
    # proto3 JSON writes 64-bit integers as strings; numbers are accepted too
    if isinstance(value, str) and value.isascii() and (value.isdigit() or (value[:1] == "-" and value[1:].isdigit())):
        n = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        raise MalformedResponse(f"{where}: expected an integer, got {value!r:.40}")
    if not -maximum - 1 <= n <= maximum or (maximum == _MAX_UINT64 and n < 0):
        raise MalformedResponse(f"{where}: {n} is out of range")
    return n


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedResponse(f"{where}: expected true or false, got {value!r:.40}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedResponse(f"{where}: expected a string, got {value!r:.40}")
    return value


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedResponse(f"{where}: expected base64 text, got {value!r:.40}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedResponse(f"{where}: not valid base64") from None


class LineSplitter:
    """Cuts a byte stream into newline-terminated lines, buffering at most ``limit`` bytes of one line."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._held = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The lines completed by ``data`` (without their newline; blank lines dropped).

        Raises `MalformedResponse` when a line grows past the limit.
        """
        lines = data.split(b"\n")
        if len(lines) == 1:
            self._hold(data)
            return []
        first = b"".join(self._parts) + lines[0] if self._parts else lines[0]
        if len(first) > self._limit:
            raise MalformedResponse(f"a line longer than {self._limit} bytes")
        self._parts, self._held = [], 0
        self._hold(lines[-1])
        out = [first] if first.strip() else []
        for line in lines[1:-1]:
            if len(line) > self._limit:
                raise MalformedResponse(f"a line longer than {self._limit} bytes")
            if line.strip():
                out.append(line)
        return out

    def _hold(self, data: bytes) -> None:
        if data:
            self._held += len(data)
            if self._held > self._limit:
                raise MalformedResponse(f"a line longer than {self._limit} bytes")
            self._parts.append(data)

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held."""
        return self._held
