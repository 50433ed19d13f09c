"""The two ways of reading the journal behind one async interface the receiver drives.

Both: ``open(position, nursery)`` → `Opened`; ``next(limit)`` → a
`ReadResult` of at least one entry read (waiting for new ones without
polling); ``seek(position)``; ``aclose()``.

- `LibrarySource`: libsystemd on the `_worker` thread; waits for the
  journal's inotify fd with `trio.lowlevel.wait_readable`, bounded by the
  timeout libsystemd asks for (none on local filesystems).
- `_journalctl.JournalctlSource`: a ``journalctl -o json --follow`` process.

Cancelling ``next`` is safe: entries it had read but not returned are read
again after the next ``seek``, which the receiver does before reading on.
"""

from __future__ import annotations

import shutil

import trio

from ._config import Config
from ._journal import LibraryJournal, Opened, Position, ReadResult, load_library
from ._journalctl import JournalctlSource
from ._mapping import EntryMapper
from ._worker import Worker


class ReaderUnavailable(Exception):
    """Neither systemd-python nor journalctl can be used on this host (the message says how to get one)."""


class LibrarySource:
    def __init__(self, config: Config, mapper: EntryMapper, worker: Worker, library, *, call_timeout: float) -> None:
        self._journal = LibraryJournal(config, mapper, library)
        self._worker = worker
        self._timeout = call_timeout
        self._fd = -1
        self._wait_ms = -1

    async def open(self, position: Position, nursery: trio.Nursery) -> Opened:
        opened = await self._worker.call(self._journal.open, position, timeout=self._timeout)
        self._fd, self._wait_ms = opened.fd, opened.wait_ms
        return opened

    async def seek(self, position: Position) -> None:
        await self._worker.call(self._journal.seek, position, timeout=self._timeout)

    async def next(self, limit: int) -> ReadResult:
        while True:
            result = await self._worker.call(self._journal.read, limit, timeout=self._timeout)
            if result.entries or result.cursor or result.error or result.bad:
                return result
            with trio.move_on_after(result_wait(self._wait_ms)):
                await trio.lowlevel.wait_readable(self._fd)

    async def aclose(self) -> None:
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)
        with trio.CancelScope(shield=True):
            await self._worker.call(self._journal.close, timeout=self._timeout)


def result_wait(timeout_ms: int) -> float:
    """libsystemd's wait hint (ms, -1: none) as a trio timeout."""
    return float("inf") if timeout_ms < 0 else timeout_ms / 1000


def make_source(config: Config, mapper: EntryMapper, worker: Worker, *, call_timeout: float) -> LibrarySource | JournalctlSource:
    """The reader ``config.reader`` asks for; raises `ReaderUnavailable` when it cannot be had."""
    library = load_library() if config.reader in ("auto", "library") else None
    if library is not None:
        return LibrarySource(config, mapper, worker, library, call_timeout=call_timeout)
    if config.reader == "library":
        raise ReaderUnavailable(
            "reader: library needs systemd-python (pip install systemd-python; it builds against libsystemd-dev and pkg-config)"
        )
    if shutil.which("journalctl") is None:
        raise ReaderUnavailable(
            "no way to read the journal: systemd-python is not installed and journalctl is not on PATH "
            "(install systemd-python, or the systemd package for journalctl)"
        )
    return JournalctlSource(config, mapper, worker, call_timeout=call_timeout)
