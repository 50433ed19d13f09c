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
from collections import Counter
from dataclasses import dataclass, field

from tapio import otlpwire

from ._parser import LineParser, plugin_for_path, severity

SCOPE_NAME = "tapio.cni_log"
SCOPE_VERSION = "0.1.0"


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
        self._file_pieces: dict[str, tuple[list[bytes], str]] = {}

    def _file(self, path: str) -> tuple[list[bytes], str]:
        found = self._file_pieces.get(path)
        if found is None:
            if len(self._file_pieces) >= 1024:
                self._file_pieces.clear()
            pieces = otlpwire.kv_pieces((("log.file.path", path), ("log.file.name", os.path.basename(path))))
            found = self._file_pieces[path] = (pieces, plugin_for_path(path))
        return found

    def write(self, path: str, lines: list[str], observed_ns: int, truncated: frozenset[int] = frozenset()) -> Written:
        """The request for ``lines`` of the file at ``path``; ``truncated`` holds the indexes of lines that were cut."""
        file_pieces, hint = self._file(path)
        parse = self.parser.parse
        kv_pieces, frame, log_record, item = otlpwire.kv_pieces, otlpwire.frame, otlpwire.log_record, otlpwire.item
        tag = otlpwire.T_ATTR_LOG
        styles: Counter[str] = Counter()
        items = []
        for i, line in enumerate(lines):
            event = parse(line, hint)
            styles[event.style] += 1
            pieces = kv_pieces(event.attributes.items())
            pieces += file_pieces
            if truncated and i in truncated:
                pieces += kv_pieces((("tapio.cni.truncated", True),))
            number, text = severity(event.level)
            items.append(
                item(
                    log_record(
                        time_unix_nano=event.time_unix_nano,
                        observed_time_unix_nano=observed_ns,
                        severity_number=number,
                        severity_text=text,
                        body=line,
                        attrs=frame(tag, pieces),
                        event_name="",
                    )
                )
            )
        return Written(otlpwire.request(self._resource, self._scope, items), len(items), styles)
