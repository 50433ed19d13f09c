"""Change notification for tailed files: inotify on their directories, its fd waited on under trio.

Invariants:
- Nothing here busy-polls: `Watcher.wait` sleeps in
  `trio.lowlevel.wait_readable` on the inotify fd and reads its events
  without blocking. Where inotify cannot be had (another OS, no watches
  left, a file system without it) `available` is False and the tailer
  relies on its slow poll alone.
- Events name paths, in the order the kernel reported them; a queue
  overflow (events lost) is reported as `OVERFLOW`, after which the caller
  rescans everything.
- A rename is one `Change` at the old name whose ``moved_to`` is the new
  name (inotify's IN_MOVED_FROM and IN_MOVED_TO of one cookie), or None when
  the file went to a directory not watched (no IN_MOVED_TO came). The new
  name gets no `Change` of its own.
- The inotify fd is closed by `close` (idempotent); watches on directories
  that went away are dropped as the kernel reports them (IN_IGNORED).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import NamedTuple

import trio

try:  # Linux only; elsewhere the tailer polls
    from inotify_simple import INotify
    from inotify_simple import flags as _flags
except (ImportError, OSError):  # pragma: no cover - not Linux
    INotify = None  # type: ignore[assignment,misc]
    _flags = None

#: a path reported when the kernel dropped events: rescan everything
OVERFLOW = ""

if _flags is not None:
    DIR_MASK = (
        _flags.MODIFY | _flags.CREATE | _flags.MOVED_TO | _flags.MOVED_FROM | _flags.DELETE
        | _flags.CLOSE_WRITE | _flags.ATTRIB | _flags.DELETE_SELF | _flags.MOVE_SELF
    )
    #: events that change which files exist (the others only change contents)
    STRUCTURE = _flags.CREATE | _flags.MOVED_TO | _flags.MOVED_FROM | _flags.DELETE | _flags.DELETE_SELF | _flags.MOVE_SELF
else:  # pragma: no cover
    DIR_MASK = STRUCTURE = 0


class Change(NamedTuple):
    """One event: something happened at ``path``."""

    path: str
    #: it changes which files exist (created, deleted, renamed), not only a file's content
    structural: bool
    #: "create", "delete", "move" (renamed away from ``path``) or "change"
    kind: str = "change"
    #: for a "move": the new name, or None when it left the watched directories
    moved_to: str | None = None


class Watcher:
    """inotify watches on a set of directories; see the module docstring."""

    def __init__(self, logger: logging.Logger, name: str) -> None:
        self._log = logger
        self._name = name
        self._wds: dict[int, str] = {}
        self._dirs: dict[str, int] = {}
        self._inotify = None
        self._warned = False
        if INotify is not None:
            try:
                self._inotify = INotify(nonblocking=True)
            except OSError as e:
                logger.warning("%s: inotify unavailable (%s): changes are seen by polling only", name, e.strerror or e)

    @property
    def available(self) -> bool:
        return self._inotify is not None

    def watch(self, dirs: set[str]) -> None:
        """Watch exactly ``dirs`` (existing directories), adding and removing watches as needed."""
        if self._inotify is None:
            return
        for d in list(self._dirs):
            if d not in dirs:
                wd = self._dirs.pop(d)
                self._wds.pop(wd, None)
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass  # already gone with its directory
        for d in dirs:
            if d in self._dirs:
                continue
            try:
                wd = self._inotify.add_watch(d, DIR_MASK)
            except OSError as e:
                if e.errno == errno.ENOSPC and not self._warned:
                    self._warned = True
                    self._log.warning(
                        "%s: no inotify watches left (fs.inotify.max_user_watches): %s is polled every poll_interval", self._name, d
                    )
                continue
            self._dirs[d] = wd
            self._wds[wd] = d

    async def wait(self) -> list[Change]:
        """Wait for events; return them in order, or [Change(OVERFLOW, True)] when events were lost.

        Without inotify this sleeps forever (cancel it).
        """
        if self._inotify is None:
            await trio.sleep_forever()
        fd = self._inotify.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                events = list(self._inotify.read(timeout=0))
            except BlockingIOError:
                continue
            if events and events[-1].mask & _flags.MOVED_FROM:
                # the kernel queues a rename's two halves one after the other: a read can fall between them
                try:
                    events += self._inotify.read(timeout=0)
                except BlockingIOError:
                    pass
            out = self._changes(events)
            if out:
                return out

    def _changes(self, events: list) -> list[Change]:
        out: list[Change] = []
        moves: dict[int, int] = {}  # cookie → index in out of its "move"
        for ev in events:
            if ev.mask & _flags.Q_OVERFLOW:
                return [Change(OVERFLOW, True)]
            if ev.mask & _flags.IGNORED:
                d = self._wds.pop(ev.wd, None)
                if d is not None:
                    self._dirs.pop(d, None)
                    out.append(Change(d, True, "delete"))
                continue
            d = self._wds.get(ev.wd)
            if d is None:
                continue
            path = os.path.join(d, ev.name) if ev.name else d
            if ev.mask & _flags.MOVED_FROM and ev.name:
                moves[ev.cookie] = len(out)
                out.append(Change(path, True, "move", None))
            elif ev.mask & _flags.MOVED_TO and ev.cookie in moves:
                i = moves.pop(ev.cookie)
                out[i] = out[i]._replace(moved_to=path)
            elif ev.mask & (_flags.CREATE | _flags.MOVED_TO):
                out.append(Change(path, True, "create"))  # a file moved in from outside is new here
            elif ev.mask & _flags.DELETE:
                out.append(Change(path, True, "delete"))
            else:
                out.append(Change(path, bool(ev.mask & STRUCTURE)))
        return out

    def close(self) -> None:
        if self._inotify is not None:
            inotify, self._inotify = self._inotify, None
            inotify.close()
