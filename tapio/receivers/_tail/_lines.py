"""Bytes of a file, as they are read, → its lines or multiline records. Sans-IO.

Invariants:
- `LineSplitter.consumed` is the file offset just after the last record
  returned: everything before it has been returned exactly once, nothing
  after it has. A reader that restarts at ``consumed`` repeats nothing and
  loses nothing (so it is what a checkpoint saves).
- A record is at most ``max_size`` bytes of the file: a longer line keeps its
  first ``max_size`` bytes and the cut is reported (`Lines.cut`); what it
  drops is never held in memory, so a 10 MB line costs at most ``max_size``.
- Bytes that are not valid in the encoding are replaced (U+FFFD) and the
  records holding them reported (`Lines.invalid`); nothing raises.
- A line's end is a newline in the encoding (``\\n``; ``\\n\\x00`` / ``\\x00\\n``
  at an even offset for UTF-16); a ``\\r`` before it is dropped. A byte order
  mark at the start of the file is dropped.
- With a multiline pattern, a record holds the lines from one that matches
  ``line_start`` up to the next one that does (or up to and including one
  that matches ``line_end``); the record being built is held until then, or
  until `flush`.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

#: encodings whose newline is one byte and never part of another character
_ONE_BYTE_NEWLINE = frozenset(("utf-8", "ascii", "latin-1", "iso8859-1", "cp1252"))


def normalize_encoding(name: str) -> str:
    """The codec name Python uses for ``name`` (``UTF8`` → ``utf-8``); raises LookupError when unknown."""
    return codecs.lookup(name).name


def supported_encoding(name: str) -> str | None:
    """Why ``name`` cannot be tailed, or None: lines are split on a newline of one byte, or two for UTF-16."""
    try:
        codec = normalize_encoding(name)
    except LookupError:
        return f"unknown encoding {name!r}"
    if codec in ("utf-16-le", "utf-16-be"):
        return None
    try:
        newline = "\n".encode(codec)
    except (UnicodeError, LookupError):
        return f"encoding {name!r} cannot write a newline"
    if newline != b"\n" or codec not in _ONE_BYTE_NEWLINE and not _ascii_compatible(codec):
        return f"encoding {name!r} is not supported: use utf-8, ascii, latin-1, utf-16le or utf-16be"
    return None


def _ascii_compatible(codec: str) -> bool:
    try:
        return bytes(range(128)).decode(codec) == "".join(map(chr, range(128)))
    except (UnicodeError, LookupError):
        return False


@dataclass(slots=True)
class Lines:
    """Records returned by one `LineSplitter.feed` or `flush`."""

    texts: list[str] = field(default_factory=list)
    #: the file offset after the last of them (`LineSplitter.consumed` then)
    end: int = 0
    #: index in ``texts`` → bytes cut off that record (it was longer than the maximum size)
    cut: dict[int, int] = field(default_factory=dict)
    #: indexes in ``texts`` of records that held bytes invalid in the encoding
    invalid: list[int] = field(default_factory=list)


class LineSplitter:
    """Splits the bytes of one file into records, as they arrive; see the module docstring.

    Args:
        position: the file offset of the first byte fed.
        encoding: a codec for which `supported_encoding` says None.
        max_size: most bytes of the file one record may take (at least 1).
        line_start, line_end: multiline patterns (at most one); None for one record per line.
    """

    def __init__(
        self,
        *,
        position: int = 0,
        encoding: str = "utf-8",
        max_size: int = 1 << 20,
        line_start: re.Pattern[str] | None = None,
        line_end: re.Pattern[str] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if line_start is not None and line_end is not None:
            raise ValueError("give line_start or line_end, not both")
        self.encoding = normalize_encoding(encoding)
        self._nl = "\n".encode(self.encoding)
        self._wide = len(self._nl) == 2
        self._fast = not self._wide and line_start is None and line_end is None
        self.max_size = max_size
        self._start = line_start
        self._end = line_end
        #: bytes fed so far, as a file offset
        self.position = position
        self._held = b""  # the incomplete last line (at most max_size bytes of it)
        self._skipped = 0  # bytes of that line dropped beyond max_size
        self._discard = False  # after a forced flush of a cut line: drop the rest of it
        self._record: list[str] = []  # multiline: the lines of the record being built
        self._record_bytes = 0
        self._record_cut = 0
        self._record_invalid = False
        self._first = position == 0  # the next record is the file's first: a byte order mark is dropped

    @property
    def consumed(self) -> int:
        """The file offset after the last record returned (see the module invariants)."""
        return self.position - len(self._held) - self._skipped - self._record_bytes

    @property
    def pending(self) -> bool:
        """Whether bytes are held that no record returned yet (an incomplete line or multiline record)."""
        return bool(self._held or self._skipped or self._record)

    # ------------------------------------------------------------- feeding

    def feed(self, data: bytes) -> Lines:
        """Take the next bytes of the file; return the records they complete."""
        out = Lines()
        if not data:
            out.end = self.consumed
            return out
        self.position += len(data)
        if self._discard or self._skipped:
            i = self._newline(data, 0)
            if i < 0:
                if self._discard:
                    out.end = self.consumed
                    return out
                self._skipped += len(data)
                out.end = self.consumed
                return out
            rest = data[i + len(self._nl) :]
            if self._discard:
                self._discard = False
            else:
                held, cut = self._held, self._skipped + i
                self._held, self._skipped = b"", 0
                self._physical(out, [held], {0: cut})
            data = rest
        buf = self._held + data if self._held else data
        if self._wide:
            parts = self._split_wide(buf)
        else:
            parts = buf.split(b"\n")
        tail = parts.pop()
        if len(tail) > self.max_size:
            self._held, self._skipped = tail[: self.max_size], len(tail) - self.max_size
        else:
            self._held = tail
        if parts:
            self._physical(out, parts, None)
        out.end = self.consumed
        return out

    def flush(self) -> Lines:
        """Return what is held as records (the file's writer stopped mid-line, or a multiline record is complete)."""
        out = Lines()
        if self._held or self._skipped:
            cut = {0: self._skipped} if self._skipped else None
            if self._skipped:
                self._discard = True
            held = self._held
            self._held, self._skipped = b"", 0
            self._physical(out, [held], cut, complete=False)
        if self._record:
            self._emit_record(out)
        out.end = self.consumed
        return out

    # ------------------------------------------------------------ internals

    def _newline(self, data: bytes, start: int) -> int:
        i = data.find(self._nl, start)
        if self._wide:
            while i >= 0 and i % 2:
                i = data.find(self._nl, i + 1)
        return i

    def _split_wide(self, buf: bytes) -> list[bytes]:
        parts, pos = [], 0
        while True:
            i = self._newline(buf, pos)
            if i < 0:
                parts.append(buf[pos:])
                return parts
            parts.append(buf[pos:i])
            pos = i + 2

    def _physical(self, out: Lines, parts: list[bytes], cut: dict[int, int] | None, complete: bool = True) -> None:
        """Complete lines (bytes without their newline) → records in ``out``."""
        max_size = self.max_size
        if cut is None and max(map(len, parts)) > max_size:
            cut = {}
            for i, p in enumerate(parts):
                if len(p) > max_size:
                    cut[i] = len(p) - max_size
                    parts[i] = p[:max_size]
        if self._fast:
            self._fast_records(out, parts, cut)
            return
        nl = len(self._nl)
        for i, p in enumerate(parts):
            cut_here = cut.get(i, 0) if cut else 0
            text, bad = self._decode(p, cut_here > 0)
            size = len(p) + cut_here + (nl if complete else 0)
            if self._start is None and self._end is None:
                self._add(out, text, cut_here, bad)
                continue
            if self._start is not None and self._record and self._start.search(text):
                self._emit_record(out)
            self._append_to_record(text, size, cut_here, bad)
            if self._end is not None and self._end.search(text):
                self._emit_record(out)
        # in multiline mode the bytes of held records are counted in _record_bytes

    def _fast_records(self, out: Lines, parts: list[bytes], cut: dict[int, int] | None) -> None:
        """One decode and one split for the whole batch; line by line only where lines were cut or are invalid."""
        texts: list[str] | None = None
        if not cut:
            try:
                text = b"\n".join(parts).decode(self.encoding)
            except UnicodeDecodeError:
                pass
            else:
                texts = text.split("\n")
                if "\r" in text:
                    texts = [t[:-1] if t.endswith("\r") else t for t in texts]
        if texts is None:
            base = len(out.texts)
            texts = []
            for i, p in enumerate(parts):
                cut_here = cut.get(i, 0) if cut else 0
                t, bad = self._decode(p, cut_here > 0)
                if bad:
                    out.invalid.append(base + i)
                if cut_here:
                    out.cut[base + i] = cut_here
                texts.append(t)
        if self._first:
            self._first = False
            if texts[0].startswith("\ufeff"):
                texts[0] = texts[0][1:]
        out.texts.extend(texts)

    def _decode(self, data: bytes, was_cut: bool) -> tuple[str, bool]:
        try:
            text = data.decode(self.encoding)
            bad = False
        except UnicodeDecodeError:
            if was_cut:
                # the cut may split a character: only what comes before the cut's last partial character is judged
                text = data.decode(self.encoding, "ignore")
                bad = data.decode(self.encoding, "replace").rstrip("\ufffd") != text.rstrip("\ufffd")
            else:
                text, bad = data.decode(self.encoding, "replace"), True
        if text.endswith("\r"):
            text = text[:-1]
        return text, bad

    def _add(self, out: Lines, text: str, cut: int, bad: bool) -> None:
        i = len(out.texts)
        if self._first:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        out.texts.append(text)
        if cut:
            out.cut[i] = cut
        if bad:
            out.invalid.append(i)

    def _append_to_record(self, text: str, size: int, cut: int, bad: bool) -> None:
        kept = sum(len(t) for t in self._record) + len(self._record)
        if kept + len(text) > self.max_size:
            room = max(0, self.max_size - kept)
            self._record_cut += len(text) - room + cut
            text = text[:room]
            if not text and self._record:
                self._record_bytes += size
                return
        else:
            self._record_cut += cut
        self._record.append(text)
        self._record_bytes += size
        self._record_invalid = self._record_invalid or bad

    def _emit_record(self, out: Lines) -> None:
        text = "\n".join(self._record)
        cut, bad = self._record_cut, self._record_invalid
        self._record, self._record_bytes, self._record_cut, self._record_invalid = [], 0, 0, False
        self._add(out, text, cut, bad)
