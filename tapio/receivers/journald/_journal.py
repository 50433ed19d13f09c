"""Reading the journal through libsystemd (systemd-python's low-level ``_Reader``). Blocking: runs on the `_worker` thread.

Invariants:
- Every method runs on one thread (see `_worker`); nothing here touches trio.
- A read hands back one `ReadResult` per call: the mapped records of up to
  ``limit`` entries as one OTLP request (a `Batch`), and the cursor of the
  last entry read, whether or not it passed ``grep``. Entries cross to trio
  as batches, never one by one.
- Positions: a cursor means "after that entry". Seeking to a cursor lands on
  the first entry after it that passes the filters, also when the cursor's
  own entry does not pass them (the entry at the cursor is skipped only if
  it is that very entry), and at the oldest entry left when the journal no
  longer holds it (vacuumed): then ``cursor_found`` is False.
- The journal's inotify fd is taken right after opening (libsystemd
  requires that to watch every file it opens later); after it turns
  readable, `read` calls ``process()`` first, which picks up new, rotated
  and deleted (vacuumed) files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tapio import otlpwire as enc
from tapio.pdata import Batch, Signal

from . import _filters
from ._config import Config
from ._mapping import EntryMapper

SCOPE = enc.scope("tapio.journald", "0.1.0")
#: the records carry their host in attributes (a journal directory can hold other machines' files)
RESOURCE = b""

#: sd-journal.h's SD_JOURNAL_ALL_NAMESPACES (systemd-python has no name for it)
ALL_NAMESPACES = 1 << 5
#: where the local system journal keeps its files
LOCAL_DIRECTORIES = ("/var/log/journal", "/run/log/journal")


def load_library():
    """systemd-python's reader module, or None when it is not installed."""
    try:
        from systemd import _reader
    except ImportError:
        return None
    return _reader


@dataclass(frozen=True, slots=True)
class Position:
    """Where to start reading: after ``cursor``, or at the head or tail when it is None."""

    cursor: str | None
    at: str = "head"  # head | tail, when cursor is None


@dataclass(slots=True)
class ReadResult:
    batch: Batch | None
    #: entries read (passed the journal's matches), records mapped (passed grep too)
    entries: int = 0
    records: int = 0
    #: cursor of the last entry read, None when none was read
    cursor: str | None = None
    #: True when ``limit`` entries were read: more may be waiting
    more: bool = False
    #: entries that could not be read (corrupt data), by reason
    bad: dict[str, int] = field(default_factory=dict)
    #: a read error that stopped this read early (message), or ""
    error: str = ""
    #: unit state events among the records, by ``systemd.unit.event``
    unit_events: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Opened:
    """What `LibraryJournal.open` found, for the start message."""

    fd: int
    has_files: bool
    usage_bytes: int
    #: the cursor reading continues after (the tail entry with start_at end), None: the start
    start: str | None
    #: False when a saved cursor named an entry the journal no longer holds
    cursor_found: bool
    #: how long to wait for the fd at most, in ms, as libsystemd asks (-1: no limit)
    wait_ms: int = -1


class LibraryJournal:
    """One open journal with the receiver's filters; use every method from the same worker thread."""

    def __init__(self, config: Config, mapper: EntryMapper, library) -> None:
        self._config = config
        self._mapper = mapper
        self._library = library
        self._reader = None
        #: the entry the reader stands on was not read yet (after seeking to a cursor that is gone)
        self._unread_current = False

    def open(self, position: Position) -> Opened:
        """Open the journal, apply the filters and seek to ``position``.

        Raises OSError (with what was opened) when libsystemd cannot open it.
        """
        lib, config = self._library, self._config
        try:
            if config.directory:
                reader = lib._Reader(path=config.directory)
            elif config.files:
                reader = lib._Reader(files=list(config.files))
            elif config.namespace:
                flags = ALL_NAMESPACES if config.namespace == "*" else 0
                reader = lib._Reader(flags, namespace=None if config.namespace == "*" else config.namespace)
            else:
                reader = lib._Reader(lib.LOCAL_ONLY)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {config.source}: {exc.strerror or exc}") from None
        self._reader = reader
        fd = reader.fileno()
        _filters.apply(reader, _filters.plan(config))
        start, found = self.seek(position)
        has_files = bool(reader.has_persistent_files() or reader.has_runtime_files()) if not config.files else True
        return Opened(
            fd=fd, has_files=has_files, usage_bytes=reader.get_usage(), start=start, cursor_found=found, wait_ms=reader.get_timeout_ms()
        )

    def seek(self, position: Position) -> tuple[str | None, bool]:
        """Go to ``position``; returns (the cursor reading continues after, whether a given cursor was found)."""
        r = self._reader
        self._unread_current = False
        if position.cursor is not None:
            r.seek_cursor(position.cursor)
            if not r._next():
                return position.cursor, True  # nothing after it (yet)
            if r.test_cursor(position.cursor):
                return position.cursor, True
            # The reader stands on the first entry after the cursor: unread.
            self._unread_current = True
            return position.cursor, self._still_holds(position.cursor)
        if position.at == "tail":
            r.seek_tail()
            if r._previous():
                return r._get_cursor(), True
            # No entry passes the filters yet: every one that will is new. Reading from the
            # head says so without relying on a tail position that no entry anchors.
            r.seek_head()
            return None, True
        r.seek_head()
        return None, True

    def _still_holds(self, cursor: str) -> bool:
        """Whether the journal still reaches back to the cursor's entry (it was filtered out, not vacuumed)."""
        # A cursor carries its entry's realtime as t=<hex µs>; when the journal no longer
        # holds it, the reader lands on an entry written later than the oldest it holds.
        parts = dict(p.split("=", 1) for p in cursor.split(";") if "=" in p)
        try:
            saved_us = int(parts["t"], 16)
        except (KeyError, ValueError):
            return True
        head_us = self._oldest_realtime()
        return head_us is None or head_us <= saved_us

    def _oldest_realtime(self) -> int | None:
        try:
            return self._reader._get_start()
        except OSError:
            return None

    def read(self, limit: int) -> ReadResult:
        """Up to ``limit`` entries after the current position, mapped; never waits for new ones."""
        r, mapper = self._reader, self._mapper
        r.process()  # resets the fd's readability; opens new files, forgets deleted ones
        observed = time.time_ns()
        records: list[bytes] = []
        result = ReadResult(None)
        entries = 0
        while entries < limit:
            if self._unread_current:
                self._unread_current = False
            else:
                try:
                    if not r._next():
                        break
                except OSError as exc:
                    result.error = f"reading the journal failed: {exc.strerror or exc}"
                    break
            entries += 1
            try:
                fields = r._get_all()
                realtime = r._get_realtime()
            except OSError as exc:
                reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower().replace(" ", "_")[:40]
                result.bad[reason] = result.bad.get(reason, 0) + 1
                continue
            record = mapper.record(fields, realtime, observed)
            if record is not None:
                records.append(record)
        if entries:
            result.cursor = r._get_cursor()
        result.entries, result.records, result.more = entries, len(records), entries >= limit
        result.unit_events = mapper.take_unit_events()
        if records:
            result.batch = Batch.from_bytes(Signal.LOGS, enc.request(RESOURCE, SCOPE, records))
        return result

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
