"""One embedded SQLite file per process: checkpoints and durable queues.

Invariants:
- A write call that returns has committed, and committed means durable:
  with ``synchronous="full"`` the commit is on disk (it survives a power
  loss); with ``"normal"`` it survives the process being killed (SIGKILL,
  OOM kill) and a power loss may roll back the most recent commits. Either
  way the file is never left corrupt and a write call is all-or-nothing:
  ``put_many``, ``ack`` and ``Checkpoints.put_many`` are one transaction each.
- Commits are totally ordered and survive as a prefix: if a commit is
  durable, every commit made before it is too. So "enqueue the records,
  then checkpoint the source position" can never leave a checkpoint that
  points past records that are not in the queue.
- A queue never drops: a put that would go over the queue's bound raises
  `QueueFull` and writes nothing. Items leave a queue only through ``ack``.
- Queue item ids are unique within the file, increase in put order and are
  never reused, even after the newest items are acked (AUTOINCREMENT).
- One process holds a file at a time: `Storage.open` takes an exclusive
  ``flock`` on ``<path>.lock`` for the life of the `Storage` and raises
  `StorageLocked` if another holder exists (two agents sending the same
  queue would duplicate it).
- A queue's in-memory counts (``len``, ``size_bytes``) equal its rows: they
  are computed once when the queue is first opened and changed only under
  the storage lock, after the commit that changed the rows.

Threads and trio: every method is thread-safe (one connection, one lock;
each call is one transaction). The plain methods block for the commit's
fsync, measured at ~0.5 ms per commit with ``"full"`` and ~30 µs with
``"normal"`` on a virtual disk (real disks are slower), so trio code uses
the ``a*`` methods (``aput``, ``apeek``, ``aget`` …), which run the same
call in a worker thread, one at a time per `Storage` (a capacity limiter of
1, so a burst of calls queues in trio instead of piling up threads on the
lock). Reads (~5 µs) go through the same thread: done inline they would wait
on the lock behind a writer's fsync and stall the trio loop. The plain
methods are for startup code, other threads, and tests.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar

import trio

__all__ = [
    "Checkpoints",
    "DurableQueue",
    "QueueFull",
    "Storage",
    "StorageClosed",
    "StorageError",
    "StorageLocked",
    "Synchronous",
    "default_path",
    "default_state_dir",
]

T = TypeVar("T")

Synchronous = Literal["full", "normal"]

#: the file name under the state dir when no path is configured
DEFAULT_FILE_NAME = "tapio.db"
#: the schema this code writes; a file with a higher version was written by a newer tapio
SCHEMA_VERSION = 1
#: how long a statement waits for a lock held by another connection (only
#: `integrity_check`-style readers from outside; tapio itself uses one connection)
BUSY_TIMEOUT_SECONDS = 5.0
#: after a checkpoint the WAL file is truncated to at most this (it grows while
#: a long transaction is open and would otherwise keep its peak size)
WAL_SIZE_LIMIT = 64 << 20
#: give free pages back to the filesystem once this many are free (16 MiB at
#: 4 KiB pages): a queue that filled up during an outage should not keep the
#: file at its peak size forever, and smaller amounts are reused anyway
FREE_PAGES_BEFORE_VACUUM = 4096
#: ids per DELETE statement in `DurableQueue.ack` (well under SQLite's
#: 32766-variable limit, and keeps each statement's plan cheap)
ACK_CHUNK = 500

_SCHEMA = (
    """CREATE TABLE checkpoints (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID""",
    """CREATE TABLE queue_items (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        data BLOB NOT NULL
    )""",
    "CREATE INDEX queue_items_by_queue ON queue_items (queue, id)",
)


class StorageError(Exception):
    """The storage file cannot be opened, read or written (the message names the file)."""


class StorageLocked(StorageError):
    """Another process (or another `Storage` in this one) holds the file."""

    def __init__(self, path: Path, holder_pid: int | None) -> None:
        who = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(f"{path} is in use by {who} (lock file {_lock_path(path)})")
        self.path = path
        self.holder_pid = holder_pid


class StorageClosed(StorageError):
    """The `Storage` was closed; nothing more can be read or written through it."""


class QueueFull(StorageError):
    """A put would take a queue over its bound; nothing was written."""

    def __init__(self, queue: str, message: str) -> None:
        super().__init__(f"queue {queue!r} is full: {message}")
        self.queue = queue


def default_state_dir(env: Mapping[str, str] | None = None, *, is_root: bool | None = None) -> Path:
    """Where tapio keeps its state when the config names no path.

    ``$TAPIO_STATE_DIR`` if set and non-empty; else ``/var/lib/tapio`` when
    running as root (the DaemonSet mounts a hostPath there); else
    ``$XDG_STATE_HOME/tapio``, whose default is ``~/.local/state/tapio``.
    ``env`` and ``is_root`` default to the process's own (tests pass them).
    """
    env = os.environ if env is None else env
    if is_root is None:
        is_root = os.geteuid() == 0
    if env.get("TAPIO_STATE_DIR"):
        return Path(env["TAPIO_STATE_DIR"]).expanduser()
    if is_root:
        return Path("/var/lib/tapio")
    xdg = env.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "tapio"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "tapio"


def default_path(env: Mapping[str, str] | None = None, *, is_root: bool | None = None) -> Path:
    """``<default_state_dir()>/tapio.db``."""
    return default_state_dir(env, is_root=is_root) / DEFAULT_FILE_NAME


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _as_blob(value: object, what: str) -> bytes:
    # sqlite3 would silently store a str as TEXT (and hand it back as str)
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, got {type(value).__name__}")


@dataclass
class _QueueState:
    """The counts of one queue's rows, shared by every `DurableQueue` view of it."""

    items: int
    bytes: int


class Storage:
    """One SQLite file holding checkpoints and durable queues; one per process.

    Open with `Storage.open`; close with `close` (or use it as a context
    manager). Every method is thread-safe; trio code uses the ``a*``
    methods of `Checkpoints` and `DurableQueue`, which run in this storage's
    worker thread (see the module docstring for why).

    Errors: SQLite failures (disk full, I/O error, a file that is not a
    database) raise `StorageError` naming the file; a call after `close`
    raises `StorageClosed`.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int, synchronous: Synchronous) -> None:
        # use Storage.open
        self.path = path
        self.synchronous: Synchronous = synchronous
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._queues: dict[str, _QueueState] = {}

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, synchronous: Synchronous = "full") -> "Storage":
        """Open (creating it and its directories if missing) the storage file at ``path``.

        ``synchronous``: ``"full"`` (every commit is fsynced: survives power
        loss) or ``"normal"`` (survives a process crash; a power loss may
        roll back the last commits). The file is put in WAL mode.

        Raises `StorageLocked` if another holder has the file, `StorageError`
        if it cannot be created or is not a tapio storage file. Blocks
        (creates files, may replay the WAL): call it from a thread under trio.
        """
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        path = Path(path).expanduser()
        if str(path) in ("", ":memory:") or path.name == "":
            raise ValueError(f"storage needs a file path, got {str(path)!r}")
        path = path.absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot create the storage file {path}: {e.strerror or e}") from e
        try:
            _take_lock(path, lock_fd)
            # create it with owner-only permissions: queued records may hold anything
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            conn = _connect(path, synchronous)
        except BaseException as e:
            os.close(lock_fd)
            if isinstance(e, OSError):
                raise StorageError(f"cannot open the storage file {path}: {e.strerror or e}") from e
            raise
        return cls(path, conn, lock_fd, synchronous)

    def close(self) -> None:
        """Close the file and release the lock (idempotent).

        Waits for a call in progress to finish. SQLite folds the WAL back into
        the database file here, so this can take a moment on a big WAL.
        """
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()
            finally:
                os.close(self._lock_fd)  # releases the flock

    async def aclose(self) -> None:
        """`close` in the worker thread."""
        await self.run_sync(self.close)

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"synchronous={self.synchronous}"
        return f"<Storage {str(self.path)!r} {state}>"

    # ----------------------------------------------------------------- handles

    def checkpoints(self, namespace: str) -> "Checkpoints":
        """The checkpoints of one namespace, e.g. a component id (``journald/system``)."""
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("a checkpoint namespace must be a non-empty string")
        return Checkpoints(self, namespace)

    def queue(self, name: str, *, max_items: int | None = None, max_bytes: int | None = None) -> "DurableQueue":
        """The durable queue ``name`` (created empty on first use), with its bounds.

        ``max_items`` / ``max_bytes``: a put that would go over either raises
        `QueueFull`; None means no bound. Bounds are not stored: a queue that
        already holds more (the config was lowered) keeps its items and
        refuses puts until acks bring it under. Several handles on one name
        share the same items and counts.

        Blocks on first use of a name in this process (counts its items).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a queue name must be a non-empty string")
        for key, bound in (("max_items", max_items), ("max_bytes", max_bytes)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0):
                raise ValueError(f"{key} must be a positive int or None, got {bound!r}")
        with self._lock:
            state = self._queues.get(name)
            if state is None:
                conn = self._connection()
                try:
                    n, size = conn.execute(
                        "SELECT count(*), coalesce(sum(length(data)), 0) FROM queue_items WHERE queue = ?", (name,)
                    ).fetchone()
                except sqlite3.Error as e:
                    raise self._error(e) from e
                state = self._queues[name] = _QueueState(n, size)
        return DurableQueue(self, name, state, max_items=max_items, max_bytes=max_bytes)

    # ------------------------------------------------------------------- misc

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in this storage's worker thread (one call at a time).

        Cancellation: a call that has started runs to completion (its
        transaction is never half done); cancellation is then delivered at the
        caller's next checkpoint. So a cancelled ``aput`` may have committed.
        """
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)

    def file_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL (0 for files that are gone)."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def queued(self) -> tuple[int, int]:
        """(items, payload bytes) in all queues opened through this storage; never blocks."""
        # copying a dict's values runs no Python code, so under the GIL it cannot
        # see a half-done insert by the worker thread
        states = list(self._queues.values())
        return sum(s.items for s in states), sum(s.bytes for s in states)

    def queue_sizes(self) -> dict[str, tuple[int, int]]:
        """(items, payload bytes) of every non-empty queue in the file, by name.

        Reads the whole queue table: for startup and operators, not the hot path.
        """

        def read(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            rows = conn.execute(
                "SELECT queue, count(*), sum(length(data)) FROM queue_items GROUP BY queue ORDER BY queue"
            ).fetchall()
            return {name: (n, size) for name, n, size in rows}

        return self._read(read)

    def integrity_check(self) -> list[str]:
        """SQLite's ``PRAGMA integrity_check``: the problems found, [] when the file is sound.

        Reads the whole file: for tests and operators, not for the hot path.
        """
        with self._lock:
            try:
                rows = [r[0] for r in self._connection().execute("PRAGMA integrity_check").fetchall()]
            except sqlite3.Error as e:
                raise self._error(e) from e
        return [] if rows == ["ok"] else rows

    # --------------------------------------------------------------- internals

    def _connection(self) -> sqlite3.Connection:
        # caller holds self._lock
        if self._conn is None:
            raise StorageClosed(f"storage {self.path} is closed")
        return self._conn

    def _error(self, e: sqlite3.Error) -> StorageError:
        return StorageError(f"storage {self.path}: {e}")

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._connection()
            try:
                return fn(conn)
            except sqlite3.Error as e:
                raise self._error(e) from e

    def _write(self, fn: Callable[[sqlite3.Connection], T], after_commit: Callable[[T], None] | None = None) -> T:
        """Run ``fn`` in one write transaction; ``after_commit`` sees its result under the same lock."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    # a failed COMMIT (disk full, I/O error) may leave the transaction open
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self._error(e) from e
            if after_commit is not None:
                after_commit(result)
            return result

    def _vacuum_if_worth_it(self) -> None:
        # caller holds self._lock, outside a transaction
        conn = self._connection()
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= FREE_PAGES_BEFORE_VACUUM:
            # the pragma frees one page per step, and execute() steps a statement
            # without result columns only once; executescript() steps it to the end
            conn.executescript("PRAGMA incremental_vacuum")


def _take_lock(path: Path, lock_fd: int) -> None:
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        try:
            holder = int(os.pread(lock_fd, 32, 0).split()[0])
        except (OSError, ValueError, IndexError):
            holder = None
        raise StorageLocked(path, holder) from None
    # the holder's pid, for the message another process shows
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def _connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_SECONDS,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # guarded by Storage._lock
        )
    except sqlite3.Error as e:
        raise StorageError(f"cannot open the storage file {path}: {e}") from e
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{path} has schema version {version}, newer than this tapio understands ({SCHEMA_VERSION}): "
                "it was written by a newer tapio"
            )
        if version == 0:
            # must precede the first table; a no-op on files that have tables
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StorageError(f"{path}: the filesystem does not support SQLite's WAL mode (got journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        if version == 0:
            conn.execute("BEGIN IMMEDIATE")
            # another opener may have won the race between our read and BEGIN (not
            # possible while we hold the lock file, but cheap to be exact)
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
    except BaseException as e:
        conn.close()
        if isinstance(e, sqlite3.Error):
            raise StorageError(f"cannot open the storage file {path}: {e}") from e
        raise
    return conn


class Checkpoints:
    """Key → bytes positions of one namespace (a receiver's cursor, offsets, revision).

    Write a checkpoint only after the records before it are delivered (or
    committed to a durable queue in this same storage): then a crash replays
    from the last delivered position instead of skipping records.
    """

    def __init__(self, storage: Storage, namespace: str) -> None:
        self.storage = storage
        self.namespace = namespace

    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None."""

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM checkpoints WHERE namespace = ? AND key = ?", (self.namespace, key)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self.storage._read(read)

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any), durably when this returns."""
        self.put_many({key: value})

    def put_many(self, values: Mapping[str, bytes]) -> None:
        """Store several keys in one transaction (all or none)."""
        rows = [(self.namespace, _check_key(k), _as_blob(v, f"checkpoint {k!r}")) for k, v in values.items()]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO checkpoints (namespace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                rows,
            )

        if rows:
            self.storage._write(write)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM checkpoints WHERE namespace = ? AND key = ?", (self.namespace, key))
            return cur.rowcount > 0

        return self.storage._write(write)

    def items(self) -> dict[str, bytes]:
        """Every key of this namespace with its value, in key order."""

        def read(conn: sqlite3.Connection) -> dict[str, bytes]:
            rows = conn.execute(
                "SELECT key, value FROM checkpoints WHERE namespace = ? ORDER BY key", (self.namespace,)
            ).fetchall()
            return {k: bytes(v) for k, v in rows}

        return self.storage._read(read)

    async def aget(self, key: str) -> bytes | None:
        return await self.storage.run_sync(self.get, key)

    async def aput(self, key: str, value: bytes) -> None:
        await self.storage.run_sync(self.put, key, value)

    async def aput_many(self, values: Mapping[str, bytes]) -> None:
        await self.storage.run_sync(self.put_many, values)

    async def adelete(self, key: str) -> bool:
        return await self.storage.run_sync(self.delete, key)

    async def aitems(self) -> dict[str, bytes]:
        return await self.storage.run_sync(self.items)

    def __repr__(self) -> str:
        return f"<Checkpoints {self.namespace!r} in {str(self.storage.path)!r}>"


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a checkpoint key must be a str, got {type(key).__name__}")
    return key


class DurableQueue:
    """A FIFO of byte strings that survives restarts: put, peek, send, then ack.

    At-least-once: an item stays until acked, so a crash between sending and
    ``ack`` sends it again after restart. Several consumers can share a queue
    by peeking past what is in flight (``peek(n, after=last_id_taken)``).
    Get a handle with `Storage.queue`.
    """

    def __init__(
        self,
        storage: Storage,
        name: str,
        state: _QueueState,
        *,
        max_items: int | None,
        max_bytes: int | None,
    ) -> None:
        self.storage = storage
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._state = state

    def __len__(self) -> int:
        """Items in the queue (never blocks)."""
        return self._state.items

    @property
    def size_bytes(self) -> int:
        """Sum of the items' lengths (payload only, not SQLite's overhead; never blocks)."""
        return self._state.bytes

    def put(self, item: bytes) -> int:
        """Append ``item``; returns its id. Raises `QueueFull` (writing nothing) over a bound."""
        return self.put_many((item,))[0]

    def put_many(self, items: Iterable[bytes]) -> list[int]:
        """Append ``items`` in one transaction; returns their ids, in order.

        All or nothing: raises `QueueFull` if the items would not all fit.
        """
        blobs = [_as_blob(item, "a queue item") for item in items]
        if not blobs:
            return []
        add_bytes = sum(len(b) for b in blobs)
        state = self._state

        def write(conn: sqlite3.Connection) -> list[int]:
            # the bound check runs under the storage lock, so it sees committed counts
            if self.max_items is not None and state.items + len(blobs) > self.max_items:
                raise QueueFull(
                    self.name, f"{state.items} items + {len(blobs)} new > max_items {self.max_items}"
                )
            if self.max_bytes is not None and state.bytes + add_bytes > self.max_bytes:
                raise QueueFull(
                    self.name, f"{state.bytes} bytes + {add_bytes} new > max_bytes {self.max_bytes}"
                )
            ids = []
            for blob in blobs:
                cur = conn.execute("INSERT INTO queue_items (queue, data) VALUES (?, ?)", (self.name, blob))
                ids.append(cur.lastrowid)
            return ids

        def counted(ids: list[int]) -> None:
            state.items += len(blobs)
            state.bytes += add_bytes

        return self.storage._write(write, counted)

    def peek(self, n: int, *, after: int = 0) -> list[tuple[int, bytes]]:
        """Up to ``n`` of the oldest items with an id greater than ``after``, as (id, item), oldest first.

        Nothing is removed: ack what was delivered.
        """
        if n <= 0:
            return []

        def read(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            rows = conn.execute(
                "SELECT id, data FROM queue_items WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
                (self.name, after, n),
            ).fetchall()
            return [(i, bytes(d)) for i, d in rows]

        return self.storage._read(read)

    def ack(self, ids: Iterable[int]) -> int:
        """Remove the items with these ids (delivered) in one transaction; returns how many were removed.

        Ids that are not in this queue (acked already, or another queue's) are ignored.
        """
        unique = sorted(set(ids))
        if not unique:
            return 0
        state = self._state

        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            n = size = 0
            for start in range(0, len(unique), ACK_CHUNK):
                chunk = unique[start : start + ACK_CHUNK]
                marks = ",".join("?" * len(chunk))
                for (length,) in conn.execute(
                    f"DELETE FROM queue_items WHERE queue = ? AND id IN ({marks}) RETURNING length(data)",
                    (self.name, *chunk),
                ):
                    n += 1
                    size += length
            return n, size

        def counted(removed: tuple[int, int]) -> None:
            state.items -= removed[0]
            state.bytes -= removed[1]
            try:
                self.storage._vacuum_if_worth_it()
            except sqlite3.Error:
                pass  # giving space back is an optimization; the acks are committed

        return self.storage._write(write, counted)[0]

    async def aput(self, item: bytes) -> int:
        return await self.storage.run_sync(self.put, item)

    async def aput_many(self, items: Iterable[bytes]) -> list[int]:
        items = list(items)  # consume the iterable here, not in the worker thread
        return await self.storage.run_sync(self.put_many, items)

    async def apeek(self, n: int, *, after: int = 0) -> list[tuple[int, bytes]]:
        return await self.storage.run_sync(functools.partial(self.peek, n, after=after))

    async def aack(self, ids: Iterable[int]) -> int:
        ids = list(ids)
        return await self.storage.run_sync(self.ack, ids)

    def __repr__(self) -> str:
        return f"<DurableQueue {self.name!r} items={len(self)} bytes={self.size_bytes}>"
