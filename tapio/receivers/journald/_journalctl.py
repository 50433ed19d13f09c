"""The fallback reader: ``journalctl -o json --follow`` as a subprocess, and its output parsed. The parsing is sans-IO.

journalctl's JSON (one object per line): values are strings; a value that
is not valid UTF-8 (or holds control characters) is an array of byte
values; a field that repeats is an array of such values; ``--all`` keeps
fields over 4096 bytes (without it they are null).

Invariants:
- `JsonLines` never holds more than ``max_line`` bytes of an unfinished
  line: a longer line is skipped to its end and counted.
- `entry_from_json` gives the same fields (name → bytes, or list of bytes)
  libsystemd gives, so both readers map entries through one `EntryMapper`.
- Positions as in `_journal`: after a cursor (journalctl's ``--cursor`` is
  inclusive, so the entry at the cursor is dropped when it comes first).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

import trio

from tapio import otlpwire as enc
from tapio.pdata import Batch, Signal

from . import _filters
from ._config import Config
from ._journal import RESOURCE, SCOPE, Opened, Position, ReadResult
from ._mapping import EntryMapper, Value
from ._worker import Worker

#: the largest line (entry) accepted from journalctl
MAX_LINE = 64 << 20
#: bytes asked of the pipe at once
CHUNK = 1 << 20
#: stderr kept for the error message when journalctl exits
STDERR_TAIL = 4096


class BadEntry(ValueError):
    """A line that is not a journal entry in journalctl's JSON form."""


class JsonLines:
    """Splits a byte stream into lines; sans-IO. ``skipped`` counts lines over ``max_line`` bytes."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line
        self._buf = bytearray()
        self._discarding = False
        self.skipped = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The lines completed by ``data`` (without their newline; empty lines left out)."""
        out: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                self._buf += data[start:nl]
                if len(self._buf) > self._max:
                    self.skipped += 1
                elif self._buf:
                    out.append(bytes(self._buf))
            self._buf.clear()
            start = nl + 1
        if not self._discarding:
            self._buf += data[start:]
            if len(self._buf) > self._max:
                self.skipped += 1
                self._buf.clear()
                self._discarding = True
        return out


def _bytes(value: Any) -> Value:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        if all(isinstance(b, int) and 0 <= b < 256 for b in value):
            return bytes(value)
        return [_bytes(v) for v in value]
    raise BadEntry(f"unexpected JSON value {type(value).__name__}")


def entry_from_json(line: bytes) -> tuple[dict[str, Value], int, str]:
    """One line of ``journalctl -o json`` → (fields, realtime µs, cursor). Raises `BadEntry`."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise BadEntry(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadEntry("not a JSON object")
    try:
        realtime = int(obj["__REALTIME_TIMESTAMP"])
        cursor = obj["__CURSOR"]
    except (KeyError, ValueError, TypeError):
        raise BadEntry("no __REALTIME_TIMESTAMP or __CURSOR") from None
    if not isinstance(cursor, str):
        raise BadEntry("__CURSOR is not a string")
    fields = {k: _bytes(v) for k, v in obj.items() if not k.startswith("__") and v is not None}
    return fields, realtime, cursor


def selection_args(config: Config) -> list[str]:
    """The journal journalctl should read, as arguments."""
    if config.directory:
        return [f"--directory={config.directory}"]
    if config.files:
        return [f"--file={f}" for f in config.files]
    if config.namespace:
        return [f"--namespace={config.namespace}"]
    return []


class JournalctlSource:
    """Follows the journal with a journalctl process; parses and maps its output on the worker thread."""

    def __init__(self, config: Config, mapper: EntryMapper, worker: Worker, *, call_timeout: float, executable: str = "journalctl") -> None:
        self._config = config
        self._mapper = mapper
        self._worker = worker
        self._timeout = call_timeout
        self._exe = shutil.which(executable) or executable
        self._base = [self._exe, "--output=json", "--all", "--no-pager", *selection_args(config), *_filters.journalctl_args(config)]
        self._proc: trio.Process | None = None
        self._lines: list[bytes] = []
        self._splitter = JsonLines()
        self._skip_cursor: str | None = None
        self._stderr = bytearray()
        self._nursery: trio.Nursery | None = None

    async def open(self, position: Position, nursery: trio.Nursery) -> Opened:
        """Start following from ``position`` (the tail: after the newest entry now)."""
        self._nursery = nursery
        start = position.cursor
        if start is None and position.at == "tail":
            start = await self._newest_cursor()
            if start is not None:
                position = Position(start)
        await self._spawn(position)
        return Opened(fd=-1, has_files=True, usage_bytes=0, start=start, cursor_found=True)

    async def _newest_cursor(self) -> str | None:
        done = await trio.run_process([*self._base, "--lines=1"], capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            raise OSError(f"{self._exe} failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()[-STDERR_TAIL:]}")
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if not lines:
            return None
        return entry_from_json(lines[-1])[2]

    async def _spawn(self, position: Position) -> None:
        await self._stop()
        args = [*self._base, "--follow"]
        self._skip_cursor = None
        if position.cursor is not None:
            args.append(f"--cursor={position.cursor}")
            self._skip_cursor = position.cursor
        elif position.at == "head":
            args.append("--no-tail")
        else:
            args.append("--lines=0")
        self._lines.clear()
        self._splitter = JsonLines()
        self._stderr.clear()
        self._proc = await trio.lowlevel.open_process(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._nursery is not None
        self._nursery.start_soon(self._drain_stderr, self._proc)

    async def _drain_stderr(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        try:
            while chunk := await proc.stderr.receive_some(STDERR_TAIL):
                if proc is self._proc:
                    self._stderr += chunk
                    del self._stderr[:-STDERR_TAIL]
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def seek(self, position: Position) -> None:
        await self._spawn(position if position.cursor is not None else Position(None, "head"))

    async def next(self, limit: int) -> ReadResult:
        """The next entries (at least one, at most ``limit``), waiting for them."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        while not self._lines:
            chunk = await proc.stdout.receive_some(CHUNK)
            if not chunk:
                code = await proc.wait()
                raise OSError(f"{self._exe} exited with status {code}: {self._stderr.decode(errors='replace').strip() or 'no message'}")
            self._lines = self._splitter.feed(chunk)
        lines, self._lines = self._lines[:limit], self._lines[limit:]
        skip, self._skip_cursor = self._skip_cursor, None
        result = await self._worker.call(self._map, lines, skip, timeout=self._timeout)
        result.more = bool(self._lines)
        if self._splitter.skipped:
            result.bad["line_too_long"] = self._splitter.skipped
            self._splitter.skipped = 0
        return result

    def _map(self, lines: list[bytes], skip_cursor: str | None) -> ReadResult:
        # on the worker thread: the mapper is used by one thread only
        observed = time.time_ns()
        result = ReadResult(None)
        records = []
        for i, line in enumerate(lines):
            try:
                fields, realtime, cursor = entry_from_json(line)
            except BadEntry:
                result.bad["bad_json"] = result.bad.get("bad_json", 0) + 1
                continue
            result.cursor = cursor
            if i == 0 and cursor == skip_cursor:
                continue
            result.entries += 1
            record = self._mapper.record(fields, realtime, observed)
            if record is not None:
                records.append(record)
        result.records = len(records)
        result.unit_events = self._mapper.take_unit_events()
        if records:
            result.batch = Batch.from_bytes(Signal.LOGS, enc.request(RESOURCE, SCOPE, records))
        return result

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()

    async def aclose(self) -> None:
        await self._stop()
