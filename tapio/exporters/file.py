"""The ``file`` exporter: every batch appended to a local file, as OTLP/JSON lines or length-prefixed protobuf.

Invariants:
- The file only ever holds whole records: one record per batch, either an
  OTLP/JSON export request and a newline (``format: json``), or a 4-byte
  big-endian length and the serialized export request (``format: proto``, as
  the OpenTelemetry Collector's fileexporter). With ``compression: gzip``
  each record is its own gzip member, so the file is a valid multi-member
  gzip stream at every record boundary. A write that fails is cut back off
  the file (best effort), so a later record never follows a partial one;
  a JSON line left unfinished by a killed process is ended at open.
- A batch is counted ``exporter_sent`` and finished as delivered
  (``Batch.done(True)``) when its record has been handed to the operating
  system; ``exporter_send_failed`` and ``done(False)`` when that write
  failed. A record waiting in the write buffer is neither, yet. Every batch
  taken from the input ends one way or the other, also on shutdown.
- All file I/O (and the encoding) runs in one worker thread at a time,
  serialized by a `trio.Lock`; the trio thread only waits for it.

Rotation follows the Collector (lumberjack): when the next write would take
the file past ``rotation.max_megabytes``, it is renamed to
``<name>-<UTC timestamp>.<ext>`` (``tapio-2026-11-23T19-20-00.000.json``)
and a new file is started; then backups beyond ``max_backups`` or older than
``max_days`` are deleted.
"""

from __future__ import annotations

import datetime
import errno as errno_mod
import gzip
import os
import re
import time
from dataclasses import dataclass
from typing import Literal

import trio

from tapio import otlpjson
from tapio.component import Factory, Kind, Ports, Settings, setting
from tapio.pdata import Batch, Signal
from tapio.units import Duration

#: records are gathered up to this many bytes before one write to the OS (bigger records are written at once)
WRITE_BUFFER_BYTES = 64 * 1024
#: gzip level per record: zlib's default, ~3x faster than level 9 on OTLP/JSON for a few percent of size
GZIP_LEVEL = 6
#: lumberjack's backup timestamp format (Go layout 2006-01-02T15-04-05.000)
_BACKUP_TIME = "%Y-%m-%dT%H-%M-%S"
_MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RotationConfig:
    max_megabytes: int = setting(100, doc="Rotate the file when the next write would make it larger than this many MiB (on disk, after compression). 0 turns rotation off.")
    max_days: int = setting(0, doc="Delete backups whose timestamp is older than this many days. 0 keeps them whatever their age.")
    max_backups: int = setting(100, doc="Keep at most this many backups, deleting the oldest. 0 keeps all of them.")
    localtime: bool = setting(False, doc="Write backup timestamps in local time instead of UTC.")


@dataclass(frozen=True, kw_only=True)
class FileConfig:
    path: str = setting("", doc="The file to append to; its directory is created if missing. Required.")
    format: Literal["json", "proto"] = setting("json", doc="`json`: one OTLP/JSON export request per line. `proto`: each export request as a 4-byte big-endian length then its protobuf bytes.")
    compression: Literal["", "gzip"] = setting("", doc="`gzip` compresses each record as its own gzip member (the file stays readable with zcat). Empty: no compression.")
    rotation: RotationConfig = setting(default_factory=RotationConfig, doc="When to start a new file and how many old ones to keep.")
    flush_interval: Duration = setting(Duration(1.0), doc="Buffered records are written to the file at least this often (and always on shutdown). 0 writes every batch at once.")

    def validate(self) -> list[str]:
        problems = []
        if not self.path:
            problems.append("path: required: the file to write, e.g. /var/lib/tapio/traces.jsonl")
        elif "\x00" in self.path:
            problems.append("path: must not contain a NUL character")
        elif self.path.endswith(os.sep) or os.path.isdir(self.path):
            problems.append(f"path: {self.path!r} is a directory; name a file in it")
        else:
            problems += [f"path: {p}" for p in _path_problems(self.path)]
        if self.format not in ("json", "proto"):
            problems.append(f"format: must be json or proto, got {self.format!r}")
        if self.compression not in ("", "gzip"):
            problems.append(f"compression: must be empty or gzip, got {self.compression!r}")
        for key in ("max_megabytes", "max_days", "max_backups"):
            if getattr(self.rotation, key) < 0:
                problems.append(f"rotation.{key}: must be 0 or more, got {getattr(self.rotation, key)}")
        return problems


def _path_problems(path: str) -> list[str]:
    """Why ``path`` could not be opened for appending, as far as can be told without creating anything.

    The file, if it exists, must be writable; otherwise the nearest existing
    ancestor of its directory must be a writable directory (``open`` creates
    the rest). Checked with `os.access`, so root passes permission bits but
    not a read-only file system.
    """
    absolute = os.path.abspath(path)
    if os.path.exists(absolute):
        return [] if os.access(absolute, os.W_OK) else [f"{path!r} exists and is not writable by this user"]
    directory = os.path.dirname(absolute)
    ancestor = directory
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor):
        return [f"cannot create the directory {directory!r}: {ancestor!r} is not a directory"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        if ancestor == directory:
            return [f"cannot create the file in {directory!r}: the directory is not writable by this user"]
        return [f"cannot create the directory {directory!r}: {ancestor!r} is not writable by this user"]
    return []


def _last_byte(fd: int, size: int) -> bytes | None:
    try:
        return os.pread(fd, 1, size - 1)
    except OSError:  # opened write-only
        return None


class _Writer:
    """The file and its rotation; called only from the worker thread, one call at a time."""

    def __init__(self, config: FileConfig) -> None:
        self.path = os.path.abspath(config.path)
        self.config = config
        self.max_bytes = config.rotation.max_megabytes * _MIB
        self.fd = -1
        self.size = 0  # bytes in the file we know were written whole
        self.pending = bytearray()
        self.pending_batches: list[Batch] = []  # the batches whose records are in `pending`
        directory, filename = os.path.split(self.path)
        self.directory = directory
        self.stem, self.ext = os.path.splitext(filename)
        self._backup_re = re.compile(re.escape(self.stem) + r"-(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})" + re.escape(self.ext) + "$")

    # -- lifecycle

    def open(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"file exporter cannot create the directory {self.directory!r}: {e.strerror}") from None
        try:
            try:  # read access for the check of the last byte below
                self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except PermissionError:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OSError(e.errno, f"file exporter cannot open {self.path!r} for writing: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        if self.config.format == "json" and self.config.compression != "gzip" and self.size and _last_byte(self.fd, self.size) != b"\n":
            # a process killed mid-write left half a record: end its line so the next record starts on its own
            os.write(self.fd, b"\n")
            self.size += 1
        self.remove_old_backups()

    def close(self) -> list[Batch]:
        """Write what is buffered, fsync, close; returns the batches written by this last write."""
        if self.fd < 0:
            return []
        written: list[Batch] = []
        try:
            written = self.flush()
            os.fsync(self.fd)
        except OSError as e:
            e.written = [*getattr(e, "written", []), *written]  # type: ignore[attr-defined]
            raise
        finally:
            os.close(self.fd)
            self.fd = -1
        return written

    # -- writing

    def add(self, batch: Batch) -> list[Batch]:
        """Encode and buffer one batch; returns the batches whose records this call wrote to the OS."""
        if self.config.format == "json":
            # from the bytes: most batches still hold them, and reading them beats reading parsed messages
            record = otlpjson.encode_serialized(batch.signal.request_class, batch.to_bytes()) + b"\n"
        else:
            body = batch.to_bytes()
            record = len(body).to_bytes(4, "big") + body
        if self.config.compression == "gzip":
            record = gzip.compress(record, compresslevel=GZIP_LEVEL, mtime=0)
        written: list[Batch] = []
        try:
            if self.fd < 0:  # a failed rotation or reopen: try again
                self.open()
            if self.max_bytes and self.size + len(self.pending) + len(record) > self.max_bytes and self.size + len(self.pending) > 0:
                written += self.flush()
                self.rotate()
        except OSError as e:
            e.lost = [*getattr(e, "lost", []), batch]  # type: ignore[attr-defined]
            e.written = written  # type: ignore[attr-defined]
            raise
        self.pending += record
        self.pending_batches.append(batch)
        if len(self.pending) >= WRITE_BUFFER_BYTES or self.config.flush_interval == 0:
            try:
                written += self.flush()
            except OSError as e:
                e.written = written  # type: ignore[attr-defined]
                raise
        return written

    def flush(self) -> list[Batch]:
        """Write the buffered records; returns their batches. On OSError the buffered records are dropped
        (the exception carries their batches as ``.lost``) and the file is cut back to its last whole record."""
        if not self.pending:
            return []
        data, batches = memoryview(self.pending), self.pending_batches
        self.pending, self.pending_batches = bytearray(), []
        try:
            if self.fd < 0:
                self.open()
            done = 0
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except OSError as e:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            e.lost = batches  # type: ignore[attr-defined]
            raise
        finally:
            data.release()
        self.size += done
        return batches

    # -- rotation

    def rotate(self) -> None:
        """Rename the file to a timestamped backup and start a new one (on failure: keep appending to the old one)."""
        try:
            os.fsync(self.fd)
            now = time.time()
            while True:
                backup = self.backup_path(now)
                if not os.path.exists(backup):
                    break
                now += 0.001  # two rotations in one millisecond: the next free name
            os.rename(self.path, backup)
        finally:
            os.close(self.fd)
            self.fd = -1
            self.open()

    def backup_path(self, when: float) -> str:
        moment = datetime.datetime.fromtimestamp(when, None if self.config.rotation.localtime else datetime.timezone.utc)
        stamp = moment.strftime(_BACKUP_TIME) + f".{moment.microsecond // 1000:03d}"
        return os.path.join(self.directory, f"{self.stem}-{stamp}{self.ext}")

    def backups(self) -> list[tuple[datetime.datetime, str]]:
        """Backups of this file, newest first."""
        found = []
        for name in os.listdir(self.directory):
            m = self._backup_re.match(name)
            if m is None:
                continue
            try:
                when = datetime.datetime.strptime(m.group(1), _BACKUP_TIME + ".%f")
            except ValueError:
                continue
            if not self.config.rotation.localtime:
                when = when.replace(tzinfo=datetime.timezone.utc)
            found.append((when, os.path.join(self.directory, name)))
        found.sort(reverse=True)
        return found

    def remove_old_backups(self) -> None:
        rotation = self.config.rotation
        if not rotation.max_backups and not rotation.max_days:
            return
        backups = self.backups()
        doomed = []
        if rotation.max_backups:
            doomed += backups[rotation.max_backups :]
            backups = backups[: rotation.max_backups]
        if rotation.max_days:
            now = datetime.datetime.now(datetime.timezone.utc if not rotation.localtime else None)
            cutoff = now - datetime.timedelta(days=rotation.max_days)
            doomed += [b for b in backups if b[0] < cutoff]
        for _, path in doomed:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


class FileExporter:
    def __init__(self, settings: Settings, config: FileConfig, ports: Ports) -> None:
        self.settings = settings
        self.config = config
        self.input = ports.input
        self.writer = _Writer(config)
        self._lock = trio.Lock()
        self._errors_seen: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self.writer.open)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                if self.config.flush_interval > 0:
                    nursery.start_soon(self._flush_periodically)
                async for batch in self.input:
                    # shielded: a batch taken from the input is always buffered (or counted as failed),
                    # never lost to a cancellation arriving while the periodic flush holds the lock
                    with trio.CancelScope(shield=True):
                        await self._in_thread(self.writer.add, batch)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.settings.shutdown_grace):
                await self._in_thread(self.writer.close)

    async def _flush_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.flush_interval)
            if self.writer.pending:
                await self._in_thread(self.writer.flush)

    async def _in_thread(self, fn, *args) -> None:
        """Run one writer call in the worker thread; count and finish the batches it wrote or lost."""
        telemetry = self.settings.telemetry
        async with self._lock:
            try:
                written = await trio.to_thread.run_sync(fn, *args)
                lost: list[Batch] = []
            except OSError as e:
                written, lost = getattr(e, "written", []), getattr(e, "lost", [])
                self._log_failure(e)
        for batch in written:
            telemetry.signal_add("exporter_sent", batch.signal, batch.count)
            batch.done(True)
        for batch in lost:
            telemetry.signal_add("exporter_send_failed", batch.signal, batch.count)
            batch.done(False)

    def _log_failure(self, error: OSError) -> None:
        kind = errno_mod.errorcode.get(error.errno or 0, type(error).__name__)
        if kind not in self._errors_seen:
            self._errors_seen.add(kind)
            self.settings.logger.error(
                "writing %s failed (%s: %s); records are dropped and counted while this lasts, logged once per error kind",
                self.writer.path,
                kind,
                error.strerror or error,
            )


def _create(settings: Settings, config: FileConfig, ports: Ports) -> FileExporter:
    return FileExporter(settings, config, ports)


def _summary(config: FileConfig) -> str:
    extra = f", {config.compression}" if config.compression else ""
    return f"{config.path} ({config.format}{extra})"


factory = Factory(
    type="file",
    kind=Kind.EXPORTER,
    config_class=FileConfig,
    signals=frozenset(Signal),
    create=_create,
    description="Appends every batch to a local file as OTLP/JSON lines or length-prefixed protobuf, with size-based rotation.",
    summary=_summary,
)
