"""Lines of one CNI log file → one OTLP logs request, as bytes. Pure: no I/O, no clocks.

Invariants:
- One log record per line, in file order: the body is the line as read
  (decoded, without its newline), so nothing of the raw payload is lost;
  time is the line's own (0 when it has none), observed time the time it
  was read; severity from the line's level; attributes are the parser's,
  then ``log.file.path`` and ``log.file.name``, then
  ``tapio.cni.truncated`` when the line was cut at the maximum line size.
- The request has one resource (this host) and one scope (``tapio.cni_log``).
- `RecordWriter.write` counts lines per style and reports the ones no style
  recognised, so the receiver can count them by reason.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field

from tapio import otlpwire

from ._parser import LineParser, plugin_for_path, severity

SCOPE_NAME = "tapio.cni_log"
SCOPE_VERSION = "0.1.0"
_FIXED64 = struct.Struct("<Q").pack
_MASK64 = (1 << 64) - 1
_SMALL = [bytes([i]) for i in range(128)]


@dataclass(slots=True)
class Written:
    """What `RecordWriter.write` made of a list of lines."""

    request: bytes
    count: int
    styles: Counter[str] = field(default_factory=Counter)


class RecordWriter:
    """Turns lines into export requests; one per receiver, shared by its files (not thread-safe: one caller at a time)."""

    def __init__(self, parser: LineParser, resource_attrs: list[tuple[str, str]]) -> None:
        self.parser = parser
        self._resource = otlpwire.attributes(otlpwire.T_ATTR_RESOURCE, resource_attrs)
        self._scope = otlpwire.scope(SCOPE_NAME, SCOPE_VERSION)
        self._file_pieces: dict[str, tuple[bytes, str]] = {}
        self._heads: dict[str, bytes] = {}

    def _file(self, path: str) -> tuple[bytes, str]:
        """The file's attributes as framed LogRecord fields, and its plugin hint."""
        found = self._file_pieces.get(path)
        if found is None:
            if len(self._file_pieces) >= 1024:
                self._file_pieces.clear()
            pieces = otlpwire.kv_pieces((("log.file.path", path), ("log.file.name", os.path.basename(path))))
            found = self._file_pieces[path] = (otlpwire.frame(otlpwire.T_ATTR_LOG, pieces), plugin_for_path(path))
        return found

    def _severity_head(self, level: str) -> bytes:
        """A LogRecord's severity fields for a level word, as `otlpwire.log_record` writes them."""
        head = self._heads.get(level)
        if head is None:
            number, text = severity(level)
            head = otlpwire.log_record(
                time_unix_nano=0, observed_time_unix_nano=0, severity_number=number, severity_text=text,
                body=None, attrs=b"", event_name="",
            )
            if len(self._heads) >= 256:
                self._heads.clear()
            self._heads[level] = head
        return head

    def write(self, path: str, lines: list[str], observed_ns: int, truncated: frozenset[int] = frozenset()) -> Written:
        """The request for ``lines`` of the file at ``path``; ``truncated`` holds the indexes of lines that were cut.

        Each record is what `otlpwire.log_record` writes (tests compare), put
        together here from pieces made once per batch (the observed time, the
        file's attributes) or per level (the severity fields).
        """
        file_frame, hint = self._file(path)
        parse = self.parser.parse
        kv_pieces, varint, fixed64 = otlpwire.kv_pieces, otlpwire.varint, _FIXED64
        tag = otlpwire.T_ATTR_LOG
        heads = self._heads
        observed = b"\x59" + fixed64(observed_ns & _MASK64) if observed_ns else b""
        cut_frame = otlpwire.frame(tag, kv_pieces((("tapio.cni.truncated", True),)))
        counts: dict[str, int] = {}
        items = []
        append = items.append
        for i, line in enumerate(lines):
            event = parse(line, hint)
            style = event.style
            counts[style] = counts.get(style, 0) + 1
            pieces = kv_pieces(event.attributes.items())
            attrs = tag + tag.join(pieces) + file_frame if pieces else file_frame
            if truncated and i in truncated:
                attrs += cut_frame
            body = line.encode()
            n = len(body)
            value = b"\x0a" + (_SMALL[n] if n < 128 else varint(n)) + body
            n = len(value)
            t = event.time_unix_nano
            record = b"".join((
                b"\x09" + fixed64(t & _MASK64) if t else b"",
                heads.get(event.level) or self._severity_head(event.level),
                b"\x2a" + (_SMALL[n] if n < 128 else varint(n)) + value,
                attrs,
                observed,
            ))
            n = len(record)
            append(b"\x12" + (_SMALL[n] if n < 128 else varint(n)) + record)
        return Written(otlpwire.request(self._resource, self._scope, items), len(items), Counter(counts))
