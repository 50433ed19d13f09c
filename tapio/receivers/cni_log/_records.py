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
- Two paths, one output: when the compiled helper (_fast.c) is built, it
  parses and writes every line it is sure about (the same bytes, the same
  style counts) and leaves the others to the Python loop here, which is the
  reference (the tests compare both on fixtures, the bench corpus and fuzzed
  lines). ``TAPIO_CNI_LOG_PYTHON=1`` in the environment, or
  ``compiled=False``, makes every line go through Python.
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tapio import otlpwire

from . import _parser
from ._parser import LineParser, plugin_for_path, severity

#: set (to anything but "" or "0") to write every line in Python, the compiled helper built or not
PYTHON_ONLY_ENV = "TAPIO_CNI_LOG_PYTHON"
#: how the compiled helper gets built (for messages and tests)
COMPILED_HOW = "scripts/setup.sh builds tapio/receivers/cni_log/_fast.c (gcc, python3-dev)"


#: the parser's patterns _fast.c emulates (it says which in ASSUMES; these must all be there)
_PATTERNS = {
    "_TIME", "_CALICO", "_BRACKETED", "_FIELD_SCAN", "_SIMPLE_TAIL", "_SIMPLE_PAIR", "_KEY_EQ", "_LOGFMT", "_LOOSE_PAIR", "_AWS_MARKERS",
    "_CNI_ARG", "_MULTUS_POD", "_OPERATION", "_AWS_PAREN", "_AWS_RESPONSE", "_AWS_FOR_POD", "_GO_STRUCT_FIELD", "_MESSAGE_IPS",
}
_SETS = ("_CMD_KEYS", "_ARGS_KEYS", "_IP_KEYS", "_CALLER_KEYS", "_MULTUS_LEVELS", "_ERROR_LEVELS")


def _load_compiled() -> tuple[Any, str]:
    """The compiled parser and writer (tapio/receivers/cni_log/_fast.c), or None and why it is not used."""
    if os.environ.get(PYTHON_ONLY_ENV, "") not in ("", "0"):
        return None, f"{PYTHON_ONLY_ENV} is set"
    try:
        from . import _fast  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the compiled line parser is not built ({exc}; {COMPILED_HOW})"
    ours = {  # what _fast.c copied from the parser; the differential tests check the code that reads them
        "PATTERNS": {name: getattr(getattr(_parser, name, None), "pattern", None) for name in _fast.ASSUMES.get("PATTERNS", {})},
        **{name: getattr(_parser, name) for name in (
            "SEVERITIES", "_STYLE_PLUGIN", "STYLES", "_FIELD_ATTR", "_OPERATIONS", "_AWS_PAREN_ATTR", "_GO_STRUCT_ATTR",
            "EXTRA_PREFIX", "MAX_EXTRA_FIELDS", "MAX_EXTRA_VALUE",
        )},
        **{name: tuple(getattr(_parser, name)) for name in ("_LEVEL_KEYS", "_MESSAGE_KEYS", "_TIME_KEYS")},
        **{name: frozenset(getattr(_parser, name)) for name in _SETS},
    }
    theirs = dict(_fast.ASSUMES)
    for name in _SETS:
        theirs[name] = frozenset(theirs.get(name, ()))
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    if ours["PATTERNS"].keys() != _PATTERNS:
        differ.append("PATTERNS")
    if differ:
        return None, f"the compiled line parser was written for another version of the parser ({', '.join(differ)} differ; update _fast.c)"
    _fast.configure(_parser._IPS_IN, _parser.ips_in)
    return _fast, ""


SCOPE_NAME = "tapio.cni_log"
SCOPE_VERSION = "0.1.0"
_FIXED64 = struct.Struct("<Q").pack
_MASK64 = (1 << 64) - 1
_SMALL = [bytes([i]) for i in range(128)]
#: the compiled parser and writer (its ``write``), or None; and why it is None
COMPILED, COMPILED_MISSING = _load_compiled()


@dataclass(slots=True)
class Written:
    """What `RecordWriter.write` made of a list of lines."""

    request: bytes
    count: int
    styles: Counter[str] = field(default_factory=Counter)


class RecordWriter:
    """Turns lines into export requests; one per receiver, shared by its files (not thread-safe: one caller at a time).

    ``compiled``: let the compiled helper write the lines it is sure about
    when it is built (`COMPILED`); the bytes are the same either way.
    """

    def __init__(self, parser: LineParser, resource_attrs: list[tuple[str, str]], *, compiled: bool = True) -> None:
        self.parser = parser
        self._resource = otlpwire.attributes(otlpwire.T_ATTR_RESOURCE, resource_attrs)
        self._scope = otlpwire.scope(SCOPE_NAME, SCOPE_VERSION)
        self._file_pieces: dict[str, tuple[bytes, str]] = {}
        self._heads: dict[str, bytes] = {}
        # the compiled path parses as LineParser(style="auto") with naive times in UTC or (per line) leaves them to Python
        self._fast = COMPILED.write if compiled and COMPILED is not None and parser.style == "auto" else None
        self._naive_utc = parser._naive_tz is _dt.timezone.utc

    @property
    def compiled(self) -> bool:
        """Whether the compiled helper writes the lines it is sure about."""
        return self._fast is not None

    def summary(self) -> str:
        """Which path writes records, for the start summary."""
        if self._fast is not None:
            return "lines parsed and written by the compiled helper (the rest in Python)"
        if COMPILED is not None and self.parser.style != "auto":
            return f"lines parsed in Python (the compiled helper takes parser: auto only, not {self.parser.style})"
        return f"lines parsed in Python: {COMPILED_MISSING or 'the compiled helper is turned off'}"

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
        observed = b"\x59" + _FIXED64(observed_ns & _MASK64) if observed_ns else b""
        cut_frame = otlpwire.frame(otlpwire.T_ATTR_LOG, otlpwire.kv_pieces((("tapio.cni.truncated", True),)))
        if self._fast is None:
            counts: dict[str, int] = {}
            items = [self._record(line, i in truncated, hint, file_frame, cut_frame, observed, counts) for i, line in enumerate(lines)]
        else:
            items, rest, counts = self._fast(lines if type(lines) is list else list(lines), hint, file_frame, cut_frame, observed, truncated, self._naive_utc)
            for i in rest:
                items[i] = self._record(lines[i], i in truncated, hint, file_frame, cut_frame, observed, counts)
        return Written(otlpwire.request(self._resource, self._scope, items), len(items), Counter(counts))

    def _record(self, line: str, cut: bool, hint: str, file_frame: bytes, cut_frame: bytes, observed: bytes, counts: dict[str, int]) -> bytes:
        """One line's item, in Python (the reference the compiled path matches)."""
        event = self.parser.parse(line, hint)
        style = event.style
        counts[style] = counts.get(style, 0) + 1
        pieces = otlpwire.kv_pieces(event.attributes.items())
        tag = otlpwire.T_ATTR_LOG
        attrs = tag + tag.join(pieces) + file_frame if pieces else file_frame
        if cut:
            attrs += cut_frame
        body = line.encode()
        n = len(body)
        value = b"\x0a" + (_SMALL[n] if n < 128 else otlpwire.varint(n)) + body
        n = len(value)
        t = event.time_unix_nano
        record = b"".join((
            b"\x09" + _FIXED64(t & _MASK64) if t else b"",
            self._heads.get(event.level) or self._severity_head(event.level),
            b"\x2a" + (_SMALL[n] if n < 128 else otlpwire.varint(n)) + value,
            attrs,
            observed,
        ))
        n = len(record)
        return b"\x12" + (_SMALL[n] if n < 128 else otlpwire.varint(n)) + record
