"""Following files by glob: find them, read them as they grow, hand their records on, save offsets after delivery.

Invariants:
- A file is known by its identity, the first ``fingerprint_size`` bytes
  (fewer while it is shorter), not by its name. While tapio holds a file
  open, renaming it changes nothing; another file that begins with the
  same bytes as an open one is a copy of it (logrotate's copytruncate, a
  ``cp``) and is not read on its own. A file that begins like a file read
  before (this run, or a saved checkpoint) is read on from where that one
  was left. A new file with fewer than `MIN_COPY_MATCH` bytes cannot be told
  from a copy being filled (copytruncate creates the copy, then writes it):
  it is opened but provisional, identified (and read) only once it has them,
  or once it has stayed shorter, not empty, for a ``poll_interval``.
- Rotation by rename: the renamed file is read to its end (a writer still
  holding it may add a few lines), closed once it has been out of the globs
  for `ROTATED_GRACE` seconds (not while it still has records to deliver
  or replay); the new file at the name is a new identity, read from its
  beginning. Where inotify pairs the rename's two halves, the renamed file's
  writes at its new name wake it like writes at the old. A matching file
  renamed out of the globs before it was ever opened (the tailer starved for
  the file's whole life) is followed to its new name by the same pair and
  read as a rotated file; one moved out of the watched directories cannot
  be, and is counted (``tapio_tail_files_missed_total``).
- Truncation (copytruncate, truncate-and-rewrite): a file that got shorter
  than what was read, or whose first bytes changed, is read again from its
  beginning as a new identity; the old identity moves to a copy of the old
  content if the globs match one (the rest of the old content is read from
  there), else ends where it was.
- Reading: at most `READ_CHUNK` bytes per read, and reading, splitting and
  converting run in a worker thread (one at a time per tailer, a capacity
  limiter of its own); the event loop only waits. Changes are waited for on
  inotify (see `_watch`), with a rescan and a check of every open file each
  ``poll_interval``; nothing busy-polls. A change of which files exist is
  scanned for at once by the watch task, also while the follow loop waits for
  a read, so a file is open before it can be renamed out of the globs. A
  file waiting for ``max_open_files`` is opened as soon as another closes.
- Delivery: every batch covers a contiguous range of one file. A file's
  committed offset is the end of the longest run of its batches, from the
  first, that were delivered (``Batch.done(True)``); only committed offsets
  are saved. A batch reported not delivered (exporter gave up, memory
  limiter refused) stops that file: once its batches in flight have all
  reported, it is read again from the committed offset, after a backoff
  (1 s doubling to 30 s): at-least-once, later batches already delivered are
  sent again.
- Checkpoints go to the storage extension's worker thread as soon as a
  committed offset moves (coalesced while a write is in progress), and once
  more at shutdown after the batches in flight reported (bounded by the
  shutdown grace). Reading never runs more than ``max_unsaved`` bytes past
  a file's saved offset while some of what it handed on is unsaved: it waits
  for the next write (however long the writes take: a starved node, a busy
  storage). What a SIGKILL repeats is delivered-but-unsaved, a part of
  what was read past the saved offset: at most ``max_unsaved`` bytes of a
  file (more only past a record longer than that: the record and the rest
  of the one read that ended it).
"""

from __future__ import annotations

import base64
import errno
import fnmatch
import glob
import json
import logging
import math
import os
import stat
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from tapio.component import Consumer, Refused
from tapio.pdata import Batch
from tapio.telemetry import COUNTER, GAUGE, ComponentTelemetry

from ._config import TailSettings
from ._lines import Lines, LineSplitter
from ._watch import OVERFLOW, Change, Watcher

#: bytes read per read call (one batch at most): ~1000 lines of a typical CNI log
READ_CHUNK = 256 * 1024
#: chunks read from one file before the others get a turn
CHUNKS_PER_TURN = 4
#: after a change is seen, wait this long for more before reading (a writer writes line by line)
COALESCE_SECONDS = 0.02
#: how long a file that left the globs (renamed, deleted) is still read before it is closed
ROTATED_GRACE = 5.0
#: how long this run remembers a closed file's identity (a copy of it may appear)
RETIRED_KEEP = 300.0
#: saved identities not seen for this long are dropped at startup
CHECKPOINT_TTL = 7 * 24 * 3600.0
#: at most this many saved identities are kept (the least recently seen go first)
MAX_CHECKPOINTS = 1024
#: copies are recognised only when at least this many first bytes agree
MIN_COPY_MATCH = 16
#: a worker-thread read that takes longer than this fails the component (a hung file system)
READ_DEADLINE = 60.0
BACKOFF_INITIAL, BACKOFF_MAX = 1.0, 30.0
#: a warning about one file and reason is repeated at most this often
WARN_EVERY = 60.0

#: the worker-thread conversion a receiver supplies: (path, records, observed unix ns) → the batch to send
#: (None: nothing to send) and a function the tailer then calls on the event loop (to count, say), or None
Convert = Callable[[str, Lines, int], "tuple[Batch | None, Callable[[], None] | None]"]


@dataclass(eq=False, slots=True)
class _Sent:
    """One batch in flight: the file offset after its last record, and what became of it."""

    end: int
    delivered: bool | None = None
    #: the pipeline took it (a send cut short by shutdown never reports)
    handed: bool = False


@dataclass(eq=False)
class _Identity:
    """What is known of one file's content: its fingerprint and how far it was read and delivered."""

    key: str
    fp: bytes
    path: str
    committed: int
    sent: int
    inflight: deque[_Sent] = field(default_factory=deque)
    failed: bool = False
    backoff: float = BACKOFF_INITIAL
    retry_at: float = 0.0
    detached_at: float = 0.0
    #: the committed offset the last checkpoint write saved (what a restart resumes from)
    saved: int = 0
    #: fewer than `MIN_COPY_MATCH` first bytes when found: not told from a copy yet, nothing read (see `_firm`)
    provisional: bool = False

    def settled(self) -> bool:
        """Whether every batch handed on has reported."""
        return all(s.delivered is not None or not s.handed for s in self.inflight)


@dataclass(eq=False)
class _Open:
    """A file tapio holds open."""

    path: str
    fd: int
    dev_ino: tuple[int, int]
    ident: _Identity
    splitter: LineSplitter
    last_growth: float
    gone_since: float | None = None
    wanted: bool = True
    #: reading waits for a checkpoint write: it is `max_unsaved` ahead of the saved offset
    gated: bool = False
    #: for a provisional file: the size it had when last looked at, and since when
    short_size: int = -1


@dataclass(slots=True)
class _ReadResult:
    lines: Lines | None = None
    batch: Batch | None = None
    after: Callable[[], None] | None = None
    read: int = 0
    eof: bool = True
    reset: str = ""
    new_fp: bytes | None = None


def prefix_match(a: bytes, b: bytes, minimum: int = 1) -> bool:
    """Whether one of two fingerprints begins the other, over at least ``minimum`` bytes."""
    n = min(len(a), len(b))
    return n >= minimum and a[:n] == b[:n]


class Tailer:
    """Follows the files of a `TailSettings`; see the module docstring.

    Args:
        settings: the receiver's config (a `TailSettings`).
        convert: called in a worker thread with each file's records; returns the batch to send.
        output: where batches go.
        telemetry, logger, name: the receiver's (``name`` prefixes log lines: its component id).
        storage: the open `tapio.storage.Storage` for checkpoints, or None.
        fallback_include: globs read from their beginning when ``settings.include`` matches no file at start.
        shutdown_grace: how long shutdown waits for batches in flight before saving offsets.
    """

    def __init__(
        self,
        settings: TailSettings,
        *,
        convert: Convert,
        output: Consumer,
        telemetry: ComponentTelemetry,
        logger: logging.Logger,
        name: str,
        storage: Any = None,
        fallback_include: list[str] | tuple[str, ...] = (),
        shutdown_grace: float = 5.0,
    ) -> None:
        self._cfg = settings
        self._convert = convert
        self._output = output
        self._tel = telemetry
        self._log = logger
        self._name = name
        self._storage = storage
        self._checkpoints = storage.checkpoints(f"receiver/{name}") if storage is not None else None
        #: how far reading may run ahead of a file's saved offset (0: no limit; no storage: nothing is saved)
        self._window = int(settings.max_unsaved) if self._checkpoints is not None else 0
        self._fallback = list(fallback_include)
        self._grace = shutdown_grace
        self._include = [os.path.expanduser(p) for p in settings.include]
        self._exclude = [os.path.expanduser(p) for p in settings.exclude]
        self._line_start, self._line_end = settings.multiline.compiled()
        self._open: dict[tuple[int, int], _Open] = {}
        self._by_path: dict[str, _Open] = {}
        self._detached: list[_Identity] = []  # identities without an open file: closed this run, or saved
        self._shadows: set[tuple[int, int]] = set()
        self._dirty: set[_Identity] = set()
        self._forget: set[str] = set()
        self._wake = trio.Event()
        self._saved = trio.Event()
        self._rescan = True
        self._limiter = trio.CapacityLimiter(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._warned: dict[tuple[str, str], float] = {}
        self._waiting = 0
        self.using_fallback = False
        #: what the tailer watches, for the start banner (set when started)
        self.summary = ""
        self._declare()

    # ------------------------------------------------------------ telemetry

    def _declare(self) -> None:
        t = self._tel
        t.declare("tapio_tail_files_open", GAUGE, "Files the tailer holds open.")
        t.declare("tapio_tail_files_waiting", GAUGE, "Matching files not opened because max_open_files are open.")
        t.declare("tapio_tail_bytes_read_total", COUNTER, "Bytes read from tailed files.")
        t.declare("tapio_tail_records_total", COUNTER, "Records (lines, or multiline records) read from tailed files.")
        t.declare("tapio_tail_rotations_total", COUNTER, "Rotations and rewrites seen, by kind (rename, truncate, rewrite, copy).")
        t.declare("tapio_tail_replays_total", COUNTER, "Times a file was read again from its last delivered offset because a batch was not delivered.")
        t.declare("tapio_tail_checkpoint_writes_total", COUNTER, "Transactions that saved read offsets to storage.")
        t.declare("tapio_tail_files_missed_total", COUNTER, "Files that matched the globs but could not be read, by reason (moved_away: renamed out of the watched directories before they were opened; max_open_files).")
        t.gauge("tapio_tail_files_open", lambda: len(self._open))
        t.declare("tapio_tail_files_waiting_for_save", GAUGE, "Files whose reading waits for a checkpoint write: max_unsaved ahead of their saved offset.")
        t.gauge("tapio_tail_files_waiting", lambda: self._waiting)
        t.gauge("tapio_tail_files_waiting_for_save", lambda: sum(of.gated for of in self._open.values()))

    def _warn(self, path: str, reason: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        key = (path, reason)
        if now - self._warned.get(key, -math.inf) >= WARN_EVERY:
            self._warned[key] = now
            if len(self._warned) > 4096:
                self._warned.clear()
            self._log.warning("%s: " + message, self._name, *args)

    # ------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Find the files, report started, follow them until cancelled; then save the offsets delivered."""
        self._token = trio.lowlevel.current_trio_token()
        watcher = Watcher(self._log, self._name)
        try:
            if self._checkpoints is not None:
                await self._load_checkpoints()
            found = self._matching(self._include)
            if not found and self._fallback:
                self.using_fallback = True
                self._include = self._include + [os.path.expanduser(p) for p in self._fallback]
            self._scan(startup=True)
            watcher.watch(self._watch_dirs())
            self.summary = self._describe(watcher.available)
            self._log.info("%s: %s", self._name, self.summary)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_loop, watcher)
                if self._checkpoints is not None:
                    nursery.start_soon(self._checkpoint_loop)
                await self._follow(watcher)
        finally:
            watcher.close()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._grace):
                    await self._settled()
                with trio.move_on_after(self._grace):
                    await self._save()
                for of in list(self._open.values()):
                    self._close(of)

    async def _follow(self, watcher: Watcher) -> None:
        poll = float(self._cfg.poll_interval)
        next_poll = trio.current_time() + poll
        while True:
            now = trio.current_time()
            if now >= next_poll:
                self._rescan = True
                next_poll = now + poll
                for of in self._open.values():
                    of.wanted = True
            if self._rescan:
                self._rescan = False
                self._scan(startup=False)
                watcher.watch(self._watch_dirs())
            more = False
            for of in list(self._open.values()):
                if of.wanted or self._flush_due(of, now) or (of.ident.failed and self._replay_ready(of, now)):
                    more |= await self._turn(of)
            self._close_gone(trio.current_time())
            self._forget_detached(trio.current_time())
            if more or self._rescan:
                await trio.lowlevel.checkpoint()
                continue
            deadline = min([next_poll, *self._deadlines()])
            with trio.move_on_at(deadline):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
                await trio.sleep(COALESCE_SECONDS)

    async def _watch_loop(self, watcher: Watcher) -> None:
        while True:
            followed = self._note(await watcher.wait())
            if self._rescan:
                # at once, not when the follow loop is done reading: a file that is created and
                # renamed out of the globs while a turn converts (a busy node) must be open by then
                self._rescan = False
                self._scan(startup=False)
                watcher.watch(self._watch_dirs())
            for path in followed:
                self._follow_rename(path)
            self._wake.set()

    def _note(self, changes: list[Change]) -> list[str]:
        """Mark the files that changed; return the new names of files renamed out of the globs before they were opened.

        The changes are replayed in order over the names (which open file is
        at which name), so that of two files renamed away from one name in
        one read of events, the one tapio holds open is told from the one it
        never saw.
        """
        at: dict[str, _Open | None] = {}  # names whose file changed in these events: the open file now there, or None

        def occupant(path: str) -> _Open | None:
            return at[path] if path in at else self._by_path.get(path)

        followed: list[str | None] = []
        for ch in changes:
            if ch.path == OVERFLOW or ch.structural:
                self._rescan = True
            of = occupant(ch.path)
            if ch.kind == "move":
                at[ch.path] = None
                if ch.path in followed:  # renamed on again: follow it there (the scan finds it if back in the globs)
                    i = followed.index(ch.path)
                    if ch.moved_to is not None and self._included(ch.moved_to):
                        del followed[i]
                    else:
                        followed[i] = ch.moved_to
                    if ch.moved_to is not None:
                        at[ch.moved_to] = None
                    continue
                if ch.moved_to is not None:
                    at[ch.moved_to] = of
                if of is not None:
                    if ch.moved_to is not None and not self._included(ch.moved_to):
                        self._by_path[ch.moved_to] = of  # out of the globs: its writes there still wake it
                        of.wanted = True
                elif self._included(ch.path) and (ch.moved_to is None or not self._included(ch.moved_to)):
                    followed.append(ch.moved_to)  # never opened, and the next scan will not find it
            elif ch.kind in ("create", "delete"):
                at[ch.path] = None
            elif of is not None:
                of.wanted = True
            elif self._included(ch.path):
                self._rescan = True  # a matching file not open yet changed
        out = []
        for path in followed:
            if path is None:
                self._missed("moved_away", "a file matching the globs was moved out of the watched directories before it could be opened")
            else:
                out.append(path)
        return out

    def _follow_rename(self, path: str) -> None:
        """A file that matched the globs was renamed to ``path``, out of them, before it was opened: read it as a rotated file."""
        try:
            st = os.stat(path)
        except OSError:
            self._missed("moved_away", "a file matching the globs was renamed out of them and was gone before it could be opened")
            return
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode) or key in self._open or key in self._shadows:
            return
        if len(self._open) >= self._cfg.max_open_files:
            self._missed("max_open_files", "a file renamed out of the globs was not read: max_open_files (%d) are open" % self._cfg.max_open_files)
            return
        self._adopt(path, key, startup=False)
        of = self._open.get(key)
        if of is not None:
            of.gone_since = trio.current_time()
            of.wanted = True
            self._tel.add("tapio_tail_rotations_total", kind="rename")
            self._log.debug("%s: %s was renamed out of the globs before it was read: reading it there", self._name, path)

    def _missed(self, reason: str, message: str) -> None:
        self._tel.add("tapio_tail_files_missed_total", reason=reason)
        self._warn("", "missed-" + reason, "%s", message)

    def _included(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) for p in self._include) and not any(fnmatch.fnmatch(path, p) for p in self._exclude)

    def _deadlines(self) -> list[float]:
        out = []
        period = float(self._cfg.force_flush_period)
        for of in self._open.values():
            if period > 0 and of.splitter.pending:
                out.append(of.last_growth + period)
            if of.ident.failed:
                out.append(of.ident.retry_at)
            if of.gone_since is not None and not of.ident.failed and not of.gated:
                out.append(of.gone_since + ROTATED_GRACE)
        return out

    def _flush_due(self, of: _Open, now: float) -> bool:
        period = float(self._cfg.force_flush_period)
        return period > 0 and of.splitter.pending and now >= of.last_growth + period and not of.ident.failed

    # --------------------------------------------------------- discovering

    def _matching(self, patterns: list[str]) -> list[str]:
        paths: set[str] = set()
        for pattern in patterns:
            for path in glob.glob(pattern, recursive=True):
                if not any(fnmatch.fnmatch(path, ex) for ex in self._exclude):
                    paths.add(path)
        return sorted(paths)

    def _watch_dirs(self) -> set[str]:
        dirs: set[str] = set()
        for pattern in self._include:
            parent = os.path.dirname(pattern) or "."
            for d in glob.glob(parent, recursive=True) if glob.has_magic(parent) else [parent]:
                if os.path.isdir(d):
                    dirs.add(d)
        return dirs

    def _scan(self, *, startup: bool) -> None:
        """Match the globs: open new files, note the ones that left.

        A new file shorter than `MIN_COPY_MATCH` bytes (after startup) is
        opened but provisional: it cannot be told from a copy of an open file
        still being written (copytruncate's, created empty and then filled),
        so it is identified only when it has those bytes (see `_firm`).
        """
        seen: set[tuple[int, int]] = set()
        waiting = 0
        for path in self._matching(self._include):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            seen.add(key)
            of = self._open.get(key)
            if of is not None:
                if of.path != path:
                    if of.gone_since is None:
                        self._tel.add("tapio_tail_rotations_total", kind="rename")
                    if self._by_path.get(of.path) is of:  # not a new file's at the old name
                        del self._by_path[of.path]
                    of.path = path
                self._by_path[path] = of
                of.gone_since = None
                continue
            if key in self._shadows:
                continue
            if len(self._open) >= self._cfg.max_open_files:
                waiting += 1
                continue
            self._adopt(path, key, startup)
        self._waiting = waiting
        if waiting:
            self._warn("", "max_open_files", "%d matching files wait: max_open_files (%d) are open", waiting, self._cfg.max_open_files)
        self._shadows &= seen
        now = trio.current_time()
        for key, of in self._open.items():
            if key not in seen and of.gone_since is None:
                of.gone_since = now
                of.wanted = True
                if self._by_path.get(of.path) is of:
                    del self._by_path[of.path]  # a change at its old name is a new file's
                self._tel.add("tapio_tail_rotations_total", kind="rename")

    def _adopt(self, path: str, key: tuple[int, int], startup: bool) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            self._warn(path, "open", "cannot open %s: %s", path, e.strerror or e)
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != key:  # replaced between stat and open: next scan
                os.close(fd)
                return
            head = os.pread(fd, int(self._cfg.fingerprint_size), 0)
        except OSError as e:
            os.close(fd)
            self._warn(path, "open", "cannot read %s: %s", path, e.strerror or e)
            return
        if not startup and len(head) < MIN_COPY_MATCH:
            ident: _Identity | None = _Identity(uuid.uuid4().hex, head, path, 0, 0, provisional=True)
        else:
            ident = self._identify(path, head, st.st_size, startup)
        if ident is None:
            os.close(fd)
            self._shadows.add(key)
            self._tel.add("tapio_tail_rotations_total", kind="copy")
            return
        position = ident.sent
        of = _Open(path, fd, key, ident, self._splitter(position), trio.current_time(), short_size=len(head))
        self._open[key] = of
        self._by_path[path] = of
        self._log.debug("%s: tailing %s from offset %d", self._name, path, position)

    def _identify(self, path: str, head: bytes, size: int, startup: bool) -> _Identity | None:
        """The identity of a file found with these first bytes; None when it is a copy of an open file."""
        if head:
            for of in self._open.values():
                if prefix_match(of.ident.fp, head, MIN_COPY_MATCH):
                    return None
            best = None
            for ident in self._detached:
                if prefix_match(ident.fp, head) and (best is None or len(ident.fp) > len(best.fp)):
                    best = ident
            if best is not None:
                self._detached.remove(best)
                best.path = path
                if best.sent > size and not head.startswith(best.fp):
                    best.sent = best.committed = best.saved = 0
                if len(head) > len(best.fp):
                    best.fp = head
                    self._dirty.add(best)
                return best
        beginning = not startup or self._cfg.start_at == "beginning" or (self.using_fallback and not self._matching_real(path))
        offset = 0 if beginning else size
        ident = _Identity(uuid.uuid4().hex, head, path, offset, offset, saved=offset)
        if self._checkpoints is not None and head:
            self._dirty.add(ident)
        return ident

    def _matching_real(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) for p in (os.path.expanduser(q) for q in self._cfg.include))

    def _splitter(self, position: int) -> LineSplitter:
        return LineSplitter(
            position=position,
            encoding=self._cfg.encoding,
            max_size=int(self._cfg.max_line_size),
            line_start=self._line_start,
            line_end=self._line_end,
        )

    # --------------------------------------------------------------- reading

    async def _turn(self, of: _Open) -> bool:
        """Read up to `CHUNKS_PER_TURN` chunks of one file; True if it has more to read now."""
        of.wanted = False
        if of.ident.provisional and not self._firm(of):
            return False
        ident = of.ident
        if ident.failed:
            if not self._replay_ready(of, trio.current_time()):
                return False
            self._replay(of)
        for _ in range(CHUNKS_PER_TURN):
            now = trio.current_time()
            force = self._flush_due(of, now) or of.gone_since is not None and now - of.gone_since >= ROTATED_GRACE / 2
            limit = self._room(of)
            of.gated = limit == 0
            if of.gated and not force:
                return False  # `max_unsaved` ahead of the saved offset: read on once a checkpoint write saved more
            with trio.fail_after(READ_DEADLINE):
                result = await trio.to_thread.run_sync(self._read, of, force, limit, limiter=self._limiter, abandon_on_cancel=True)
            if result.reset:
                self._reset(of, result.reset)
                return True
            if result.new_fp is not None:
                ident.fp = result.new_fp
                self._dirty.add(ident)
            if result.read:
                of.last_growth = trio.current_time()
                self._tel.add("tapio_tail_bytes_read_total", result.read)
            lines = result.lines
            if result.after is not None:
                result.after()
            if lines is not None and (lines.texts or lines.end != ident.sent):
                self._account(of, lines)
                await self._hand_on(of, result.batch, lines)
            if ident.failed:
                return False
            if result.eof:
                return False
        of.wanted = True  # more to read: the next round of the follow loop reads on (not the next poll or change)
        return True

    def _firm(self, of: _Open) -> bool:
        """Identify a provisional file once it has `MIN_COPY_MATCH` bytes (or has stayed shorter, not empty, for a poll interval).

        Then it is a copy of an open file (closed, not read), a file read
        before (read on from there), or a new one. False: nothing to read yet.
        """
        try:
            size = os.fstat(of.fd).st_size
            head = os.pread(of.fd, int(self._cfg.fingerprint_size), 0) if size else b""
        except OSError as e:
            self._warn(of.path, "open", "cannot read %s: %s", of.path, e.strerror or e)
            return False
        now = trio.current_time()
        if len(head) < MIN_COPY_MATCH:
            if len(head) != of.short_size:
                of.short_size, of.last_growth = len(head), now
            if not head or now - of.last_growth < float(self._cfg.poll_interval) and of.gone_since is None:
                return False  # empty, or a copy still being filled: looked at again on its next change or poll
        del self._open[of.dev_ino]  # not a copy of itself
        ident = self._identify(of.path, head, size, startup=False)
        if ident is None:
            self._close(of)
            self._shadows.add(of.dev_ino)
            self._tel.add("tapio_tail_rotations_total", kind="copy")
            self._log.debug("%s: %s is a copy of a file tailed: not read", self._name, of.path)
            return False
        self._open[of.dev_ino] = of
        of.ident = ident
        of.splitter = self._splitter(ident.sent)
        return True

    def _room(self, of: _Open) -> int:
        """Bytes the next read may take: `READ_CHUNK`, less when it would run `max_unsaved` ahead of the saved offset (0: wait for a save)."""
        if not self._window:
            return READ_CHUNK
        ident = of.ident
        room = ident.saved + self._window - of.splitter.position
        if room > 0:
            return min(room, READ_CHUNK)
        return 0 if ident.sent > ident.saved else READ_CHUNK  # all handed on is saved: a record longer than the window is still read

    def _read(self, of: _Open, force: bool, room: int = READ_CHUNK) -> _ReadResult:
        """In the worker thread: check the file is still what was read, read the next chunk (at most ``room`` bytes), convert it."""
        out = _ReadResult()
        fd, splitter, fp = of.fd, of.splitter, of.ident.fp
        st = os.fstat(fd)
        position = splitter.position
        if st.st_size < position:
            out.reset = "truncate"
            return out
        if fp:
            now_head = os.pread(fd, len(fp), 0)
            if now_head != fp:
                out.reset = "truncate" if len(now_head) < len(fp) else "rewrite"
                return out
        limit = int(self._cfg.fingerprint_size)
        if len(fp) < limit and st.st_size > len(fp):
            head = os.pread(fd, limit, 0)
            if head.startswith(fp):
                out.new_fp = head
        want = min(room, st.st_size - position)
        data = os.pread(fd, want, position) if want > 0 else b""
        out.read = len(data)
        out.eof = position + len(data) >= st.st_size
        if data:
            lines = splitter.feed(data)
            if out.eof and force and splitter.pending:
                more = splitter.flush()
                _extend(lines, more)
        elif force and splitter.pending:
            lines = splitter.flush()
        else:
            return out
        out.lines = lines
        if lines.texts:
            out.batch, out.after = self._convert(of.path, lines, time.time_ns())
        return out

    def _account(self, of: _Open, lines: Lines) -> None:
        n = len(lines.texts)
        if n:
            self._tel.add("tapio_tail_records_total", n)
        if lines.cut:
            self._tel.bad_input("line_too_long", len(lines.cut))
            self._warn(of.path, "cut", "%s: %d lines longer than max_line_size (%d bytes) were cut (the longest by %d bytes)",
                       of.path, len(lines.cut), int(self._cfg.max_line_size), max(lines.cut.values()))
        if lines.invalid:
            self._tel.bad_input("invalid_encoding", len(lines.invalid))
            self._warn(of.path, "encoding", "%s: %d lines held bytes that are not %s (replaced by U+FFFD)",
                       of.path, len(lines.invalid), self._cfg.encoding)

    async def _hand_on(self, of: _Open, batch: Batch | None, lines: Lines) -> None:
        ident = of.ident
        sent = _Sent(lines.end)
        ident.inflight.append(sent)
        ident.sent = lines.end
        if batch is None:
            sent.handed = True
            self._settle(ident, sent, True)
            return
        batch.on_done.append(self._on_done(ident, sent))
        sent.handed = True
        try:
            await self._output.send(batch)
        except Refused:
            pass  # the pipeline reported the batch not delivered: the file is read again after a backoff
        except BaseException:
            if sent.delivered is None:
                sent.handed = False  # cut short (shutdown): it will not report; the committed offset stays before it
            raise

    def _on_done(self, ident: _Identity, sent: _Sent) -> Callable[[bool], None]:
        token = self._token

        def done(delivered: bool) -> None:
            assert token is not None
            try:
                token.run_sync_soon(self._settle, ident, sent, bool(delivered))
            except trio.RunFinishedError:
                pass  # tapio has stopped: the offset is not saved, the batch is read again next time

        return done

    def _settle(self, ident: _Identity, sent: _Sent, delivered: bool) -> None:
        """A batch reported: move the committed offset over the delivered prefix; a failure stops the file for a replay."""
        if sent.delivered is not None:
            return
        sent.delivered = delivered
        if not delivered:
            if not ident.failed:
                ident.failed = True
                ident.retry_at = trio.current_time() + ident.backoff
                self._warn(ident.path, "undelivered", "%s: a batch was not delivered; reading again from offset %d in %gs",
                           ident.path, ident.committed, ident.backoff)
                ident.backoff = min(ident.backoff * 2, BACKOFF_MAX)
            self._wake.set()
            return
        moved = False
        while ident.inflight and ident.inflight[0].delivered is True:
            ident.committed = ident.inflight.popleft().end
            moved = True
        if moved:
            if not ident.failed:
                ident.backoff = BACKOFF_INITIAL
            self._dirty.add(ident)
            self._saved.set()
        if ident.failed:
            self._wake.set()

    def _replay_ready(self, of: _Open, now: float) -> bool:
        return of.ident.settled() and now >= of.ident.retry_at

    def _replay(self, of: _Open) -> None:
        ident = of.ident
        self._tel.add("tapio_tail_replays_total")
        ident.inflight.clear()
        ident.failed = False
        ident.sent = ident.committed
        of.splitter = self._splitter(ident.committed)
        of.wanted = True

    # ------------------------------------------------------- rotation, reset

    def _reset(self, of: _Open, kind: str) -> None:
        """The file was truncated or rewritten: it starts over as a new identity; the old one moves to a copy if one exists."""
        self._tel.add("tapio_tail_rotations_total", kind=kind)
        old = of.ident
        self._log.info("%s: %s was %s (read up to offset %d): reading it from the beginning",
                       self._name, of.path, "truncated" if kind == "truncate" else "rewritten", old.sent)
        try:
            head = os.pread(of.fd, int(self._cfg.fingerprint_size), 0)
        except OSError:
            head = b""
        fresh = _Identity(uuid.uuid4().hex, head, of.path, 0, 0)
        of.ident = fresh
        of.splitter = self._splitter(0)
        of.wanted = True
        if head and self._checkpoints is not None:
            self._dirty.add(fresh)
        old.detached_at = trio.current_time()
        self._detached.append(old)
        # the copy copytruncate made holds the old content: read the rest of it from there
        for path in self._matching(self._include):
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in self._open or not stat.S_ISREG(st.st_mode):
                continue
            self._shadows.discard(key)
            self._adopt(path, key, startup=False)
            adopted = self._open.get(key)
            if adopted is not None and adopted.ident is old:
                self._log.info("%s: reading the rest of the old content of %s from %s", self._name, of.path, path)
                break

    def _close_gone(self, now: float) -> None:
        closed = False
        for of in list(self._open.values()):
            if of.gone_since is None or now - of.gone_since < ROTATED_GRACE:
                continue
            if of.ident.failed or of.gated:
                continue  # what it holds is still to be delivered: closed once it is (replay, checkpoint write)
            if of.splitter.pending:
                of.wanted = True  # one more turn flushes what it holds
                continue
            try:
                size = os.fstat(of.fd).st_size
            except OSError:
                size = of.splitter.position
            if size > of.splitter.position:
                of.wanted = True
                continue
            self._close(of)
            closed = True
            if not of.ident.provisional:
                of.ident.detached_at = now
                self._detached.append(of.ident)
            self._shadows.clear()  # copies of it are judged again at the next scan
        if closed and self._waiting:
            self._rescan = True  # a file waiting for max_open_files is opened now, not at the next poll

    def _close(self, of: _Open) -> None:
        self._open.pop(of.dev_ino, None)
        for path in [p for p, o in self._by_path.items() if o is of]:  # its name, and where it was renamed out of the globs
            del self._by_path[path]
        try:
            os.close(of.fd)
        except OSError:
            pass

    def _forget_detached(self, now: float) -> None:
        """Identities closed this run are remembered a while (a copy of them may appear), then dropped from memory."""
        keep = []
        for ident in self._detached:
            if ident.detached_at and now - ident.detached_at > RETIRED_KEEP and not ident.inflight:
                continue
            keep.append(ident)
        self._detached = keep

    # ------------------------------------------------------------ checkpoints

    async def _load_checkpoints(self) -> None:
        assert self._checkpoints is not None and self._storage is not None
        saved = await self._storage.run_sync(self._checkpoints.items)
        now = time.time()
        entries = []
        for key, raw in saved.items():
            try:
                value = json.loads(raw)
                fp = base64.b64decode(value["fp"])
                offset, seen, path = int(value["offset"]), float(value.get("seen", now)), str(value.get("path", ""))
            except (ValueError, KeyError, TypeError) as e:
                self._log.warning("%s: ignoring an unreadable saved offset %r: %s", self._name, key, e)
                self._forget.add(key)
                continue
            if now - seen > CHECKPOINT_TTL or not fp:
                self._forget.add(key)
                continue
            entries.append((seen, _Identity(key, fp, path, offset, offset, saved=offset)))
        entries.sort(key=lambda e: e[0], reverse=True)
        for _, ident in entries[MAX_CHECKPOINTS:]:
            self._forget.add(ident.key)
        self._detached = [ident for _, ident in entries[:MAX_CHECKPOINTS]]
        if self._detached:
            self._log.info("%s: %d saved offsets loaded", self._name, len(self._detached))

    async def _checkpoint_loop(self) -> None:
        while True:
            await self._saved.wait()
            self._saved = trio.Event()
            await self._save()

    async def _save(self) -> None:
        if self._checkpoints is None or not (self._dirty or self._forget):
            return
        dirty, self._dirty = self._dirty, set()
        forget, self._forget = self._forget, set()
        seen = int(time.time())
        values = {
            ident.key: json.dumps(
                {"fp": base64.b64encode(ident.fp).decode(), "offset": ident.committed, "path": ident.path, "seen": seen}
            ).encode()
            for ident in dirty
            if ident.fp
        }
        checkpoints = self._checkpoints
        offsets = [(ident, ident.committed) for ident in dirty]

        def write() -> None:
            if values:
                checkpoints.put_many(values)
            for key in forget:
                checkpoints.delete(key)

        try:
            await self._storage.run_sync(write)
        except BaseException:
            self._dirty |= dirty
            self._forget |= forget
            raise
        self._tel.add("tapio_tail_checkpoint_writes_total")
        for ident, offset in offsets:
            ident.saved = max(ident.saved, offset)
        gated = [of for of in self._open.values() if of.gated]
        for of in gated:
            of.wanted = True
        if gated:
            self._wake.set()

    async def _settled(self) -> None:
        """At shutdown: wait for the batches in flight to report."""
        while any(not ident.settled() for ident in self._identities()):
            await self._saved.wait()
            self._saved = trio.Event()

    def _identities(self) -> list[_Identity]:
        return [of.ident for of in self._open.values()] + self._detached

    # ---------------------------------------------------------------- summary

    def _describe(self, inotify: bool) -> str:
        how = "inotify" if inotify else f"polling every {float(self._cfg.poll_interval):g}s"
        files = sorted(of.path for of in self._open.values())
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        if self.using_fallback:
            return (f"no file matches {', '.join(self._cfg.include)}: reading the samples {', '.join(self._fallback)} "
                    f"({len(files)} files) and watching for the real ones ({how})")
        if files:
            return f"tailing {len(files)} files ({shown}); watching {', '.join(self._cfg.include)} ({how})"
        return f"no file matches {', '.join(self._cfg.include)} yet; watching ({how})"


def _extend(lines: Lines, more: Lines) -> None:
    base = len(lines.texts)
    lines.texts.extend(more.texts)
    lines.cut.update({base + i: n for i, n in more.cut.items()})
    lines.invalid.extend(base + i for i in more.invalid)
    lines.end = more.end
