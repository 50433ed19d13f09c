"""OTLP export requests as bytes: find association attributes, add resource attributes, regroup items by pod.

Pure functions on serialized ``Export{Logs,Trace,Metrics}ServiceRequest``
bytes; no protobuf objects, no I/O.

Why bytes: a batch that arrived as OTLP keeps its arrival bytes
(`tapio.pdata.Batch.raw`) and exporters send them as they are. Adding
attributes to a resource is then an append (below), and regrouping records
by pod moves each record's bytes unparsed; only the envelopes are read.

Invariants:
- Field numbers are opentelemetry-proto's: a request holds its resources in
  field 1; ResourceLogs/ResourceSpans/ResourceMetrics hold ``resource`` (1)
  and their scopes (2); ScopeLogs/ScopeSpans hold ``scope`` (1) and their
  items (2); a LogRecord's attributes are field 6, a Span's field 9;
  Resource.attributes is field 1 and KeyValue is ``key`` 1, ``value`` 2
  (AnyValue ``string_value`` 1).
- `add_resource_attributes` appends a second ``resource`` field to a
  ResourceX: protobuf merges repeated occurrences of a message field, so the
  result parses to the resource with the new attributes after the old ones,
  exactly what appending them to the parsed message gives.
- `find_attributes` reads only top-level fields of one item, so a key that
  appears inside a string (a body holding serialized OTLP, say) is never
  taken for an attribute; only string values are returned.
- `regroup` keeps every item exactly once and in order within each group,
  each under a copy of its own resource and scope envelopes (every field but
  the items); malformed input raises `WireError` and nothing is changed.
"""

from __future__ import annotations

from typing import Iterable, Sequence


class WireError(ValueError):
    """The bytes are not a well-formed export request."""


#: the attributes field tag of a log record (6) and of a span (9), both length-delimited
LOG_ATTRIBUTES_TAG = 0x32
SPAN_ATTRIBUTES_TAG = 0x4A
_T1 = b"\x0a"  # field 1, length-delimited
_T2 = b"\x12"  # field 2, length-delimited


def read_varint(b: bytes, i: int) -> tuple[int, int]:
    """The varint at ``b[i:]`` and the offset after it."""
    try:
        x = b[i]
        if x < 0x80:
            return x, i + 1
        result, shift = x & 0x7F, 7
        i += 1
        while True:
            x = b[i]
            result |= (x & 0x7F) << shift
            i += 1
            if x < 0x80:
                return result, i
            shift += 7
            if shift > 63:
                raise WireError("varint longer than 10 bytes")
    except IndexError:
        raise WireError("truncated varint") from None


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def key_value(key: str, value: str | int) -> bytes:
    """A KeyValue message with a string value (AnyValue field 1) or an int value (field 3, int64)."""
    if isinstance(value, int):
        any_value = b"\x18" + varint(value & ((1 << 64) - 1))
    else:
        any_value = _ld(_T1, value.encode())
    return _ld(_T1, key.encode()) + _ld(_T2, any_value)


def resource_attributes(pairs: Iterable[tuple[str, str | int]]) -> bytes:
    """Resource message bytes holding ``pairs`` as attributes (field 1 each)."""
    return b"".join(_ld(_T1, key_value(k, v)) for k, v in pairs)


def fields(b: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """Top-level fields of the message in ``b[start:end]``: (field number, field start, payload start, end).

    Only wire types 0, 1, 2 and 5 exist in OTLP; anything else is a `WireError`.
    """
    out = []
    i = start
    while i < end:
        tag, j = read_varint(b, i)
        wire = tag & 7
        if wire == 2:
            n, j = read_varint(b, j)
            k = j + n
        elif wire == 0:
            _, k = read_varint(b, j)
        elif wire == 1:
            k = j + 8
        elif wire == 5:
            k = j + 4
        else:
            raise WireError(f"unsupported wire type {wire}")
        if k > end:
            raise WireError("a field runs past its message")
        out.append((tag >> 3, i, j, k))
        i = k
    return out


def resources(raw: bytes) -> list[tuple[int, int, int]]:
    """The ResourceX messages of a request: (field start, payload start, end), in order."""
    out = []
    for number, fs, ps, end in fields(raw, 0, len(raw)):
        if number != 1:
            raise WireError(f"unexpected field {number} in an export request")
        out.append((fs, ps, end))
    return out


def add_resource_attributes(resource_x: bytes, extra: bytes) -> bytes:
    """A ResourceX payload with ``extra`` (Resource message bytes) merged into its resource (see the invariants)."""
    return resource_x + _ld(_T1, extra) if extra else resource_x


def frame_resource(payload: bytes) -> bytes:
    """A ResourceX payload as a request's field 1."""
    return _ld(_T1, payload)


def find_attributes(b: bytes, start: int, end: int, attr_tag: int, wanted: tuple[bytes, ...]) -> dict[bytes, bytes | None]:
    """Attributes of one item whose KeyValue starts with one of ``wanted`` (`key_prefix` output): key -> string value bytes.

    A value that is not a string is None. The first occurrence of a key wins.
    """
    lengths = _KEY_LENGTHS.get(wanted)
    if lengths is None:
        lengths = _KEY_LENGTHS[wanted] = frozenset(p[1] for p in wanted)
    found: dict[bytes, bytes | None] = {}
    i = start
    while i < end:
        tag = b[i]
        if tag == attr_tag and i + 2 < end and b[i + 1] < 0x80:
            # the common case, an attribute of fewer than 128 bytes: tag, one length byte, KeyValue
            j = i + 2
            k = j + b[i + 1]
            if k > end:
                raise WireError("a field runs past its item")
            if b[j + 1] in lengths and b.startswith(wanted, j):
                key = b[j + 2 : j + 2 + b[j + 1]]
                if key not in found:
                    found[key] = _string_value(b, j + 2 + b[j + 1], k)
            i = k
            continue
        if tag < 0x80:
            i += 1
        else:
            tag, i = read_varint(b, i)
        wire = tag & 7
        if wire == 2:
            if i >= end:
                raise WireError("truncated field")
            n = b[i]
            if n < 0x80:
                j = i + 1
            else:
                n, j = read_varint(b, i)
            k = j + n
            if k > end:
                raise WireError("a field runs past its item")
            if tag == attr_tag and b.startswith(wanted, j):
                key_len = b[j + 1]
                key = b[j + 2 : j + 2 + key_len]
                if key not in found:
                    found[key] = _string_value(b, j + 2 + key_len, k)
            i = k
        elif wire == 0:
            _, i = read_varint(b, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
    if i != end:
        raise WireError("an item's last field runs past its end")
    return found


#: the key lengths of each ``wanted`` tuple `find_attributes` was called with (few: one per processor config)
_KEY_LENGTHS: dict[tuple[bytes, ...], frozenset[int]] = {}


def _string_value(b: bytes, i: int, end: int) -> bytes | None:
    """The string of the KeyValue ``value`` field (2) at ``b[i:end]``, if it holds a string_value."""
    if i >= end or b[i] != 0x12:
        return None
    if end - i < 0x80 and i + 3 < end:
        # short values (ids, addresses): both lengths are one byte
        if b[i + 1] == end - i - 2 and b[i + 2] == 0x0A and b[i + 3] == end - i - 4:
            return b[i + 4 : end]
    n, j = read_varint(b, i + 1)
    if j + n != end or j >= end or b[j] != 0x0A:
        return None
    m, k = read_varint(b, j + 1)
    if k + m != end:
        return None
    return b[k:end]


def key_prefix(key: str) -> bytes:
    """The bytes a KeyValue with ``key`` starts with (keys of fewer than 128 bytes)."""
    data = key.encode()
    if len(data) >= 0x80:
        raise ValueError(f"association keys are shorter than 128 bytes: {key!r}")
    return _T1 + bytes([len(data)]) + data + _T2


class ResourceLayout:
    """One ResourceX payload taken apart: its envelope and, per scope, the scope envelope and the items' spans."""

    __slots__ = ("envelope", "scopes")

    def __init__(self, b: bytes, start: int, end: int) -> None:
        envelope: list[bytes] = []
        #: (scope envelope bytes, [(item field start, item payload start, item end)])
        self.scopes: list[tuple[bytes, list[tuple[int, int, int]]]] = []
        for number, fs, ps, fe in fields(b, start, end):
            if number != 2:
                envelope.append(b[fs:fe])
                continue
            scope_env: list[bytes] = []
            items = []
            for n2, fs2, ps2, fe2 in fields(b, ps, fe):
                if n2 == 2:
                    items.append((fs2, ps2, fe2))
                else:
                    scope_env.append(b[fs2:fe2])
            self.scopes.append((b"".join(scope_env), items))
        self.envelope = b"".join(envelope)


def regroup(b: bytes, layout: ResourceLayout, groups: Sequence[int], extras: Sequence[bytes]) -> list[bytes]:
    """ResourceX payloads for the items of ``layout``: group 0 keeps the resource as it is, group g > 0 gets ``extras[g]`` merged in.

    ``groups`` gives each item's group, items numbered across scopes in
    order. Returns one payload per group that has items, group 0 first, then
    the others in the order their first item appears.
    """
    order: list[int] = []
    # group -> list of scope blocks (scope index, [item frames])
    parts: dict[int, list[tuple[int, list[bytes]]]] = {}
    index = 0
    for s, (_, items) in enumerate(layout.scopes):
        for fs, _, fe in items:
            g = groups[index]
            index += 1
            blocks = parts.get(g)
            if blocks is None:
                blocks = parts[g] = []
                order.append(g)
            if not blocks or blocks[-1][0] != s:
                blocks.append((s, []))
            blocks[-1][1].append(b[fs:fe])
    if 0 in parts:
        order.remove(0)
        order.insert(0, 0)
    out = []
    for g in order:
        scopes = b"".join(_ld(_T2, layout.scopes[s][0] + b"".join(frames)) for s, frames in parts[g])
        payload = layout.envelope + scopes
        out.append(add_resource_attributes(payload, extras[g]) if g else payload)
    return out
