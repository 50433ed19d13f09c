"""Templates and the record decoders compiled from them.

Invariants:
- A `Decoder` is built once per distinct field list (cached, bounded) and
  turns a data set's body into one tuple per record, values in template
  order with padding fields left out; ``columns`` describes each value.
- A template whose fields all have a fixed length decodes with one
  precompiled `struct.Struct` over the whole set (``iter_unpack``); bytes
  after the last whole record are padding (RFC 7011 §3.3.1, RFC 3954 §5.3).
  A template with variable-length fields (length 65535, IPFIX only) decodes
  record by record in runs of fixed fields between the variable ones.
- A value is an ``int`` when its column's ``is_int`` is true (numbers of 1,
  2, 4 or 8 bytes) and ``bytes`` otherwise (addresses, strings, octet
  arrays, numbers of other lengths); decoding never fails on a value, only
  on a record running past the end of its set (`MalformedError`).
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from . import _ie

#: the length that marks a variable-length field in an IPFIX template (RFC 7011 §7)
VARIABLE = 65535
#: decoders kept for distinct field lists (templates of many exporters share a few shapes)
DECODER_CACHE_SIZE = 4096
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}


class MalformedError(Exception):
    """A datagram breaks its format; ``reason`` is a short label for counters, the message says where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Field(NamedTuple):
    """One template field: element id (without the enterprise bit), length in bytes, enterprise number (0: IANA)."""

    id: int
    length: int
    pen: int = 0


class Column(NamedTuple):
    """One value of a decoded record."""

    id: int
    pen: int
    length: int
    kind: str
    is_int: bool


class Decoder:
    """Decodes the records of one template shape (see the module invariants)."""

    __slots__ = ("fields", "columns", "min_length", "fixed", "_struct", "_runs")

    def __init__(self, fields: tuple[Field, ...]) -> None:
        self.fields = fields
        columns: list[Column] = []
        # runs: a struct for the fixed fields up to the next variable one, then None for it
        runs: list[struct.Struct | None] = []
        codes: list[str] = []
        for f in fields:
            if f.length == VARIABLE:
                runs.append(struct.Struct("!" + "".join(codes)))
                runs.append(None)
                codes = []
                columns.append(Column(f.id, f.pen, 0, _ie.kind_of(f.id, f.pen), False))
                continue
            if f.id == _ie.PADDING and not f.pen:
                codes.append(f"{f.length}x")
                continue
            kind = _ie.kind_of(f.id, f.pen)
            code = None
            if kind in _ie.NUMERIC:
                code = _INT_CODES.get(f.length)
            elif kind == _ie.SIGNED:
                code = _SIGNED_CODES.get(f.length)
            elif kind == _ie.FLOAT and f.length in (4, 8):
                code = "f" if f.length == 4 else "d"
            columns.append(Column(f.id, f.pen, f.length, kind, code is not None and kind != _ie.FLOAT))
            codes.append(code or f"{f.length}s")
        runs.append(struct.Struct("!" + "".join(codes)))
        self.columns = tuple(columns)
        self.fixed = len(runs) == 1
        self._struct = runs[0]
        self._runs = tuple(r for r in runs if r is None or r.size or r.format != "!")
        #: bytes of the shortest record (variable fields counted as empty with a one-byte length)
        self.min_length = sum(r.size if r is not None else 1 for r in self._runs)

    def decode(self, body: memoryview) -> list[tuple]:
        """The records of a data set body (set header removed); trailing bytes shorter than a record are padding."""
        if self.fixed:
            size = self._struct.size
            if size == 0:
                return []
            n = len(body) // size
            return list(self._struct.iter_unpack(body[: n * size])) if n else []
        return self._decode_variable(body)

    def _decode_variable(self, body: memoryview) -> list[tuple]:
        rows: list[tuple] = []
        end = len(body)
        pos = 0
        minimum = self.min_length
        while end - pos >= minimum:
            row: list = []
            for run in self._runs:
                if run is not None:
                    if pos + run.size > end:
                        raise MalformedError("record_beyond_set", f"a record runs {pos + run.size - end} bytes past the end of its set")
                    row.extend(run.unpack_from(body, pos))
                    pos += run.size
                    continue
                if pos >= end:
                    raise MalformedError("record_beyond_set", "a variable-length field starts past the end of its set")
                n = body[pos]
                pos += 1
                if n == 255:  # RFC 7011 §7: 255 then a two-byte length
                    if pos + 2 > end:
                        raise MalformedError("record_beyond_set", "a variable-length field's length runs past the end of its set")
                    n = body[pos] << 8 | body[pos + 1]
                    pos += 2
                if pos + n > end:
                    raise MalformedError("record_beyond_set", f"a variable-length field of {n} bytes runs past the end of its set")
                row.append(bytes(body[pos : pos + n]))
                pos += n
            rows.append(tuple(row))
        return rows


@functools.lru_cache(maxsize=DECODER_CACHE_SIZE)
def decoder_for(fields: tuple[Field, ...]) -> Decoder:
    """The decoder of a field list, built once and shared by every template of that shape."""
    return Decoder(fields)


class Template:
    """A data or options template of one session, with its compiled decoder.

    ``scope_count`` is the number of scope fields of an options template
    (0 for a data template); ``options`` tells the two apart.
    """

    __slots__ = ("id", "fields", "scope_count", "options", "decoder")

    def __init__(self, template_id: int, fields: tuple[Field, ...], *, options: bool = False, scope_count: int = 0) -> None:
        self.id = template_id
        self.fields = fields
        self.options = options
        self.scope_count = scope_count
        self.decoder = decoder_for(fields)

    def same_as(self, other: "Template | None") -> bool:
        return other is not None and other.fields == self.fields and other.options == self.options and other.scope_count == self.scope_count

    def to_bytes(self) -> bytes:
        """A compact serialization for persisting (see `from_bytes`)."""
        head = struct.pack("!HBH", self.id, 1 if self.options else 0, self.scope_count)
        return head + b"".join(struct.pack("!HHI", f.id, f.length, f.pen) for f in self.fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Template":
        """Raises ValueError on bytes `to_bytes` did not write."""
        if len(data) < 5 or (len(data) - 5) % 8:
            raise ValueError("not a serialized template")
        tid, options, scope = struct.unpack_from("!HBH", data)
        fields = tuple(Field(*struct.unpack_from("!HHI", data, 5 + 8 * i)) for i in range((len(data) - 5) // 8))
        if not fields or any(f.length == 0 for f in fields):
            raise ValueError("not a serialized template")
        return cls(tid, fields, options=bool(options), scope_count=scope)
