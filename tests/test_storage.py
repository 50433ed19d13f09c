"""tapio.storage and the `storage` extension: checkpoints, durable queues, crash safety."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tapio.component import ComponentID, Kind, Ports, Settings, config_problems
from tapio.extensions import storage as storage_ext
from tapio.storage import (
    FREE_PAGES_BEFORE_VACUUM,
    QueueFull,
    Storage,
    StorageClosed,
    StorageError,
    StorageLocked,
    default_path,
    default_state_dir,
)
from tapio.telemetry import Telemetry
from tapio.units import Duration

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(tmp_path: Path):
    with Storage.open(tmp_path / "tapio.db") as s:
        yield s


# --------------------------------------------------------------------- queues


def test_queue_is_fifo_and_peek_does_not_remove(db: Storage) -> None:
    q = db.queue("q")
    ids = [q.put(b"a"), *q.put_many([b"bb", b"ccc"]), q.put(b"")]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert len(q) == 4 and q.size_bytes == 6
    assert q.peek(10) == list(zip(ids, [b"a", b"bb", b"ccc", b""]))
    assert q.peek(2) == list(zip(ids[:2], [b"a", b"bb"]))
    assert q.peek(10) == q.peek(10)  # still there
    assert q.peek(2, after=ids[1]) == list(zip(ids[2:], [b"ccc", b""]))
    assert q.peek(0) == []


def test_ack_removes_only_the_given_items_of_this_queue(db: Storage) -> None:
    q, other = db.queue("q"), db.queue("other")
    ids = q.put_many([b"1", b"22", b"333", b"4444"])
    other_id = other.put(b"x")
    assert q.ack([ids[1], ids[3], other_id, 10**9]) == 2
    assert q.peek(10) == [(ids[0], b"1"), (ids[2], b"333")]
    assert (len(q), q.size_bytes) == (2, 4)
    assert other.peek(10) == [(other_id, b"x")], "acking another queue's id must not remove it"
    assert q.ack([ids[1]]) == 0, "a second ack of the same id is a no-op"
    assert q.ack([]) == 0
    assert q.ack(ids) == 2 and len(q) == 0 and q.size_bytes == 0


def test_ack_of_many_ids_spans_statements(db: Storage) -> None:
    q = db.queue("q")
    ids = q.put_many([b"x"] * 1234)
    assert q.ack(ids[::2]) == 617
    assert [i for i, _ in q.peek(2000)] == ids[1::2]


def test_queue_full_by_items_writes_nothing(db: Storage) -> None:
    q = db.queue("q", max_items=3)
    q.put_many([b"a", b"b"])
    with pytest.raises(QueueFull, match=r"queue 'q' is full: 2 items \+ 2 new > max_items 3"):
        q.put_many([b"c", b"d"])
    assert [d for _, d in q.peek(10)] == [b"a", b"b"], "a refused put_many must write none of its items"
    q.put(b"c")
    with pytest.raises(QueueFull):
        q.put(b"d")
    q.ack([q.peek(1)[0][0]])
    q.put(b"d")
    assert [d for _, d in q.peek(10)] == [b"b", b"c", b"d"]


def test_queue_full_by_bytes(db: Storage) -> None:
    q = db.queue("q", max_bytes=10)
    q.put(b"x" * 6)
    with pytest.raises(QueueFull, match="6 bytes \\+ 5 new > max_bytes 10"):
        q.put(b"y" * 5)
    q.put(b"y" * 4)
    assert q.size_bytes == 10
    with pytest.raises(QueueFull):
        q.put(b"z")
    with pytest.raises(QueueFull):
        db.queue("big", max_bytes=10).put(b"z" * 11)


def test_lowered_bound_keeps_items_and_refuses_puts(db: Storage) -> None:
    db.queue("q").put_many([b"a", b"b", b"c"])
    q = db.queue("q", max_items=2)
    assert len(q) == 3
    with pytest.raises(QueueFull):
        q.put(b"d")
    q.ack([i for i, _ in q.peek(2)])
    q.put(b"d")
    assert [d for _, d in q.peek(10)] == [b"c", b"d"]


def test_handles_on_one_queue_share_items_and_counts(db: Storage) -> None:
    a, b = db.queue("q"), db.queue("q", max_items=2)
    a.put(b"1")
    b.put(b"2")
    assert len(a) == len(b) == 2
    with pytest.raises(QueueFull):
        b.put(b"3")
    a.put(b"3")  # unbounded handle
    assert b.size_bytes == 3


def test_ids_are_never_reused(tmp_path: Path) -> None:
    with Storage.open(tmp_path / "t.db") as s:
        q = s.queue("q")
        first = q.put_many([b"a", b"b"])
        q.ack(first)
        second = q.put(b"c")
        assert second > max(first)
        q.ack([second])
    with Storage.open(tmp_path / "t.db") as s:
        assert s.queue("other").put(b"d") > second


def test_bad_arguments(db: Storage) -> None:
    q = db.queue("q")
    with pytest.raises(TypeError):
        q.put("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        q.put_many([b"ok", None])  # type: ignore[list-item]
    assert len(q) == 0
    assert q.put(bytearray(b"ba")) and q.put(memoryview(b"mv"))
    assert [d for _, d in q.peek(5)] == [b"ba", b"mv"]
    for bound in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            db.queue("q", max_items=bound)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            db.queue("q", max_bytes=bound)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        db.queue("")
    with pytest.raises(ValueError):
        db.checkpoints("")
    with pytest.raises(TypeError):
        db.checkpoints("ns").put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Storage.open(":memory:")
    with pytest.raises(ValueError):
        Storage.open(db.path.with_name("x.db"), synchronous="off")  # type: ignore[arg-type]


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_round_trip(db: Storage) -> None:
    cp, other = db.checkpoints("journald"), db.checkpoints("filelog")
    assert cp.get("cursor") is None
    cp.put("cursor", b"s=abc;i=1")
    cp.put("cursor", b"s=abc;i=2")
    other.put("cursor", b"elsewhere")
    cp.put_many({"b": b"\x00\xff", "a": b""})
    assert cp.get("cursor") == b"s=abc;i=2"
    assert cp.items() == {"a": b"", "b": b"\x00\xff", "cursor": b"s=abc;i=2"}
    assert list(cp.items()) == ["a", "b", "cursor"]
    assert other.items() == {"cursor": b"elsewhere"}
    assert cp.delete("a") is True and cp.delete("a") is False
    assert cp.get("a") is None and other.get("cursor") == b"elsewhere"


def test_everything_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "tapio.db"
    with Storage.open(path) as s:
        q = s.queue("otlp/tempo")
        ids = q.put_many([b"one", b"two", b"three"])
        q.ack(ids[:1])
        s.checkpoints("etcd-watch").put("revision", b"42")
    with Storage.open(path, synchronous="normal") as s:
        q = s.queue("otlp/tempo")
        assert (len(q), q.size_bytes) == (2, 8)
        assert q.peek(5) == [(ids[1], b"two"), (ids[2], b"three")]
        assert s.checkpoints("etcd-watch").get("revision") == b"42"
        assert s.queue_sizes() == {"otlp/tempo": (2, 8)}
        assert s.integrity_check() == []


def test_files_are_private_to_the_owner(tmp_path: Path) -> None:
    with Storage.open(tmp_path / "tapio.db") as s:
        s.queue("q").put(b"secret")
        for p in (s.path, s.path.with_name("tapio.db.lock"), s.path.with_name("tapio.db-wal")):
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


# ----------------------------------------------------------- ownership/errors


def test_second_open_is_refused_until_close(tmp_path: Path) -> None:
    path = tmp_path / "tapio.db"
    first = Storage.open(path)
    with pytest.raises(StorageLocked) as info:
        Storage.open(path)
    assert info.value.holder_pid == os.getpid()
    assert str(path) in str(info.value)
    first.close()
    first.close()  # idempotent
    with Storage.open(path):
        pass


def test_calls_after_close_raise(tmp_path: Path) -> None:
    s = Storage.open(tmp_path / "tapio.db")
    q, cp = s.queue("q"), s.checkpoints("ns")
    s.close()
    assert s.closed
    for call in (lambda: q.put(b"x"), lambda: q.peek(1), lambda: q.ack([1]), lambda: cp.get("k"), lambda: s.queue("r")):
        with pytest.raises(StorageClosed):
            call()


def test_not_a_database_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "tapio.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match=re.escape(str(path))):
        Storage.open(path)
    with Storage.open(tmp_path / "ok.db"):  # the failed open released its lock file
        pass
    with pytest.raises(StorageError):  # and this one's too
        Storage.open(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tapio.db"
    Storage.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="newer tapio"):
        Storage.open(path)


def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create"):
        Storage.open(blocker / "sub" / "tapio.db")


def test_acked_space_is_given_back(tmp_path: Path) -> None:
    path = tmp_path / "tapio.db"
    item = random.Random(1).randbytes(64 << 10)
    with Storage.open(path, synchronous="normal") as s:
        q = s.queue("q")
        q.put_many([item] * ((FREE_PAGES_BEFORE_VACUUM * 4096 * 3 // 2) // len(item)))
        q.put(b"keep")
        peak = s.file_bytes()
        q.ack([i for i, d in q.peek(10**6) if d != b"keep"])
    assert path.stat().st_size < peak / 4
    with Storage.open(path) as s:
        assert [d for _, d in s.queue("q").peek(5)] == [b"keep"]
        assert s.integrity_check() == []


# ------------------------------------------------------------------- trio use


async def test_async_calls_run_off_the_trio_thread(db: Storage) -> None:
    assert await db.run_sync(threading.get_ident) != threading.get_ident()
    q, cp = db.queue("q"), db.checkpoints("ns")
    ids = await q.aput_many(iter([b"a", b"b"]))
    assert await q.aput(b"c") > ids[-1]
    assert await q.apeek(2, after=ids[0]) == [(ids[1], b"b"), (ids[1] + 1, b"c")]
    assert await q.aack(iter(ids)) == 2
    await cp.aput("k", b"v")
    await cp.aput_many({"j": b"w"})
    assert await cp.aget("k") == b"v"
    assert await cp.aitems() == {"j": b"w", "k": b"v"}
    assert await cp.adelete("k") is True


async def test_two_producers_and_a_consumer_share_a_queue(db: Storage) -> None:
    q = db.queue("q", max_items=50)
    per_producer = 300
    received: list[bytes] = []
    notify_send, notify_recv = trio.open_memory_channel[None](0)

    async def produce(tag: bytes, send: trio.MemorySendChannel[None]) -> None:
        async with send:
            cp = db.checkpoints(tag.decode())
            i = 0
            while i < per_producer:
                chunk = [tag + b"%d" % n for n in range(i, min(i + 7, per_producer))]
                try:
                    await q.aput_many(chunk)
                except QueueFull:
                    await trio.testing.wait_all_tasks_blocked()  # let the consumer drain
                    continue
                i += len(chunk)
                await cp.aput("pos", b"%d" % i)
                await send.send(None)

    async def consume() -> None:
        last = 0
        async with notify_recv:
            async for _ in notify_recv:
                while items := await q.apeek(5, after=last):
                    received.extend(d for _, d in items)
                    last = items[-1][0]
                    await q.aack(i for i, _ in items)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            async with notify_send:
                nursery.start_soon(produce, b"a", notify_send.clone())
                nursery.start_soon(produce, b"b", notify_send.clone())

    for tag in (b"a", b"b"):
        mine = [d for d in received if d.startswith(tag)]
        assert mine == [tag + b"%d" % n for n in range(per_producer)], "each producer's items arrive once, in order"
        assert db.checkpoints(tag.decode()).get("pos") == b"%d" % per_producer
    assert len(received) == 2 * per_producer
    assert (len(q), q.size_bytes) == (0, 0)
    assert q.peek(1) == []


# ---------------------------------------------------------- model-based fuzz


class QueueMachine(RuleBasedStateMachine):
    """A durable queue behaves like a list with bounds, across reopens."""

    @initialize(max_items=st.none() | st.integers(1, 12), max_bytes=st.none() | st.integers(1, 200))
    def open(self, max_items: int | None, max_bytes: int | None) -> None:
        self.dir = tempfile.mkdtemp(prefix="tapio-storage-")
        self.path = Path(self.dir) / "tapio.db"
        self.bounds = {"max_items": max_items, "max_bytes": max_bytes}
        self.storage = Storage.open(self.path, synchronous="normal")
        self.q = self.storage.queue("q", **self.bounds)
        self.model: list[tuple[int, bytes]] = []
        self.checkpoints: dict[str, bytes] = {}

    def teardown(self) -> None:
        if hasattr(self, "storage"):
            self.storage.close()
            shutil.rmtree(self.dir)

    def fits(self, items: list[bytes]) -> bool:
        n, size = len(self.model) + len(items), sum(len(d) for _, d in self.model) + sum(map(len, items))
        mi, mb = self.bounds["max_items"], self.bounds["max_bytes"]
        return (mi is None or n <= mi) and (mb is None or size <= mb)

    @rule(items=st.lists(st.binary(max_size=40), max_size=5))
    def put_many(self, items: list[bytes]) -> None:
        if self.fits(items):
            ids = self.q.put_many(items)
            assert len(ids) == len(items)
            if self.model and ids:
                assert ids[0] > self.model[-1][0]
            self.model.extend(zip(ids, items))
        else:
            with pytest.raises(QueueFull):
                self.q.put_many(items)

    @rule(n=st.integers(0, 15), skip=st.integers(0, 5))
    def peek(self, n: int, skip: int) -> None:
        after = self.model[skip - 1][0] if 0 < skip <= len(self.model) else 0
        want = [(i, d) for i, d in self.model if i > after][:n]
        assert self.q.peek(n, after=after) == want

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        known = [i for i, _ in self.model]
        chosen = data.draw(st.lists(st.sampled_from(known), max_size=6)) if known else []
        strangers = data.draw(st.lists(st.integers(-3, 10**6).filter(lambda i: i not in known), max_size=2))
        assert self.q.ack(chosen + strangers) == len(set(chosen))
        self.model = [(i, d) for i, d in self.model if i not in chosen]

    @rule(key=st.sampled_from(["a", "b", "ü"]), value=st.binary(max_size=30))
    def checkpoint(self, key: str, value: bytes) -> None:
        self.storage.checkpoints("ns").put(key, value)
        self.checkpoints[key] = value

    @precondition(lambda self: hasattr(self, "storage"))
    @rule()
    def reopen(self) -> None:
        self.storage.close()
        self.storage = Storage.open(self.path, synchronous="normal")
        self.q = self.storage.queue("q", **self.bounds)

    @invariant()
    def counts_match(self) -> None:
        if hasattr(self, "q"):
            assert len(self.q) == len(self.model)
            assert self.q.size_bytes == sum(len(d) for _, d in self.model)
            assert self.storage.checkpoints("ns").items() == dict(sorted(self.checkpoints.items()))


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------- crash safety

# Writes queue items and checkpoints as fast as it can, printing each commit
# after it returned; "acking"/"cp?" lines announce a write before it is made,
# so the parent knows which writes may or may not have landed when it kills us.
CRASH_CHILD = r"""
import hashlib, random, sys
from tapio.storage import Storage

path, sync, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
s = Storage.open(path, synchronous=sync)
q, cp = s.queue("crash"), s.checkpoints("crash")
out = sys.stdout
h = lambda b: hashlib.sha256(b).hexdigest()
print("ready", flush=True)
while True:
    r = rng.random()
    if r < 0.6:
        items = [rng.randbytes(rng.choice((0, 10, 1000, 9000))) for _ in range(rng.randint(1, 20))]
        ids = q.put_many(items)
        out.write("".join(f"put {i} {h(d)}\n" for i, d in zip(ids, items)))
    elif r < 0.8:
        key, value = f"k{rng.randint(0, 4)}", rng.randbytes(rng.choice((1, 100, 20000)))
        print("cp?", key, h(value))
        out.flush()
        cp.put(key, value)
        print("cp", key, h(value))
    else:
        ids = [i for i, _ in q.peek(rng.randint(1, 10))]
        print("acking", *ids)
        out.flush()
        q.ack(ids)
        print("acked", *ids)
    out.flush()
"""


class CrashModel:
    """What the parent knows is committed, from the child's output."""

    def __init__(self) -> None:
        self.items: dict[int, str] = {}  # id -> sha256 that must be there
        self.maybe_acked: set[int] = set()
        self.gone: set[int] = set()
        self.checkpoints: dict[str, str] = {}  # key -> hash of the last confirmed value
        self.pending: dict[str, str] = {}  # key -> hash of a value announced but not confirmed

    def feed(self, line: str) -> None:
        word, *args = line.split()
        if word == "put":
            self.items[int(args[0])] = args[1]
        elif word == "acking":
            self.maybe_acked.update(map(int, args))
        elif word == "acked":
            for i in map(int, args):
                self.maybe_acked.discard(i)
                self.items.pop(i, None)
                self.gone.add(i)
        elif word == "cp?":
            self.pending[args[0]] = args[1]
        elif word == "cp":
            self.pending.pop(args[0], None)
            self.checkpoints[args[0]] = args[1]

    def check_and_settle(self, path: Path) -> None:
        """Check the reopened file against what was printed; then adopt what it holds."""
        h = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
        with Storage.open(path) as s:
            assert s.integrity_check() == []
            stored = dict(s.queue("crash").peek(10**9))
            assert len(s.queue("crash")) == len(stored)
            for i, sha in self.items.items():
                if i in self.maybe_acked and i not in stored:
                    continue
                assert i in stored, f"item {i} was reported committed but is missing"
                assert h(stored[i]) == sha, f"item {i} was damaged"
            assert not self.gone & stored.keys(), "acked items came back"
            printed_max = max(self.items, default=0)
            for i in stored.keys() - self.items.keys():
                # only the last put_many can have committed without being printed
                assert i > printed_max, f"item {i} is in the queue but was never put"
            cps = {k: h(v) for k, v in s.checkpoints("crash").items().items()}
            for key in self.checkpoints.keys() | self.pending.keys():
                allowed = {self.checkpoints.get(key), self.pending.get(key)} - {None}
                if key not in self.checkpoints:
                    allowed.add(None)  # the only write of it may not have landed
                assert cps.get(key) in allowed, f"checkpoint {key} lost its last committed value"
            assert cps.keys() <= self.checkpoints.keys() | self.pending.keys()
        self.items = {i: h(d) for i, d in stored.items()}
        self.maybe_acked.clear()
        self.checkpoints, self.pending = cps, {}


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_sigkill_never_loses_a_commit_nor_corrupts(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "tapio.db"
    rng = random.Random(f"crash-{synchronous}")
    model = CrashModel()
    for round_ in range(6):
        kill_after = rng.randint(1, 2500)  # lines of output, then SIGKILL wherever the child is
        stderr_path = tmp_path / f"stderr{round_}"
        with stderr_path.open("wb") as stderr:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", CRASH_CHILD, str(path), synchronous, str(rng.randrange(2**32))],
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO,
            )
        assert proc.stdout is not None
        try:
            with trio.fail_after(30):
                buf, lines, killed = b"", 0, False
                # read on after the kill: what the child printed before dying is
                # still in the pipe, and each line speaks of a write it began or
                # finished; the pipe ends (EOF) when the child is gone
                while chunk := await proc.stdout.receive_some():
                    buf += chunk
                    *complete, buf = buf.split(b"\n")
                    for line in complete:
                        if line != b"ready":
                            model.feed(line.decode())
                        lines += 1
                    if lines > kill_after and not killed:
                        proc.kill()
                        killed = True
                # an unfinished last line (the kill cut a write short) is ignored
                assert killed, f"the child exited early:\n{stderr_path.read_text()}"
                assert await proc.wait() == -signal.SIGKILL
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            await proc.stdout.aclose()
        model.check_and_settle(path)
    assert model.items, "the children should have left items behind"


# ------------------------------------------------------------ state directory


def test_default_state_dir() -> None:
    assert default_state_dir({"TAPIO_STATE_DIR": "/srv/t"}, is_root=True) == Path("/srv/t")
    assert default_state_dir({"TAPIO_STATE_DIR": "/srv/t"}, is_root=False) == Path("/srv/t")
    assert default_state_dir({"TAPIO_STATE_DIR": ""}, is_root=True) == Path("/var/lib/tapio")
    assert default_state_dir({"HOME": "/home/u"}, is_root=False) == Path("/home/u/.local/state/tapio")
    assert default_state_dir({"HOME": "/home/u", "XDG_STATE_HOME": "/x"}, is_root=False) == Path("/x/tapio")
    assert default_state_dir({"HOME": "/home/u", "XDG_STATE_HOME": "rel"}, is_root=False) == Path(
        "/home/u/.local/state/tapio"
    )
    assert default_path({"TAPIO_STATE_DIR": "/srv/t"}) == Path("/srv/t/tapio.db")


# ------------------------------------------------------------------ extension


def _settings(telemetry: Telemetry | None = None) -> Settings:
    telemetry = telemetry or Telemetry()
    return Settings(
        id=ComponentID("storage"),
        kind=Kind.EXTENSION,
        telemetry=telemetry.for_component("extension", "storage"),
        logger=logging.getLogger("tapio.extension.storage"),
    )


def _config(**kw: object) -> storage_ext.StorageConfig:
    return storage_ext.StorageConfig(**kw)  # type: ignore[arg-type]


def test_extension_factory_and_config() -> None:
    f = storage_ext.factory
    assert (f.type, f.kind, f.signals) == ("storage", Kind.EXTENSION, frozenset())
    assert config_problems(f.config_class()) == []
    problems = config_problems(_config(path="/var/lib/tapio/", synchronous="off", lock_timeout=Duration(-1.0)))
    assert [p.split(":")[0] for p in problems] == ["path", "synchronous", "lock_timeout"]
    assert config_problems(_config(path=":memory:"))[0].startswith("path:")
    assert config_problems(_config(path=" x.db"))[0].startswith("path:")
    assert _config(path="/a/b.db").resolved_path() == Path("/a/b.db")
    assert _config().resolved_path() == default_path()
    assert "/a/b.db" in f.summary(_config(path="/a/b.db"))  # type: ignore[misc]


def test_extension_doc_lists_exactly_the_config_keys() -> None:
    page = (REPO / "docs" / "components" / "storage.md").read_text()
    config_section = page.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\|\s*`([^`]+)`\s*\|", config_section, re.MULTILINE)
    fields = [f.name for f in dataclasses.fields(storage_ext.StorageConfig)]
    assert documented == fields
    for name in ("tapio_storage_file_bytes", "tapio_storage_queued_items", "tapio_storage_queued_bytes"):
        assert name in page


async def test_extension_hands_an_open_storage_and_closes_it_on_cancel(tmp_path: Path) -> None:
    telemetry = Telemetry()
    ext = storage_ext.factory.create(_settings(telemetry), _config(path=str(tmp_path / "s" / "t.db")), Ports())
    async with trio.open_nursery() as nursery:
        storage = await nursery.start(ext.run)
        assert isinstance(storage, Storage) and not storage.closed
        q = storage.queue("otlp")
        await q.aput_many([b"12345", b"678"])
        assert telemetry.value("tapio_storage_queued_items", extension="storage") == 2
        assert telemetry.value("tapio_storage_queued_bytes") == 8
        assert telemetry.value("tapio_storage_file_bytes") > 0
        nursery.cancel_scope.cancel()
    assert storage.closed
    with Storage.open(tmp_path / "s" / "t.db") as again:  # lock released
        assert len(again.queue("otlp")) == 2


async def test_extension_waits_for_the_previous_holder(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    holder = Storage.open(path)
    ext = storage_ext.factory.create(_settings(), _config(path=str(path), lock_timeout=Duration(60.0)), Ports())
    got: list[Storage] = []
    started = trio.Event()

    async def start(nursery: trio.Nursery) -> None:
        got.append(await nursery.start(ext.run))
        started.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start, nursery)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert not got, "must not start while another holds the file"
            holder.close()
            await started.wait()  # the extension retries every LOCK_RETRY_INTERVAL
            assert not got[0].closed
            nursery.cancel_scope.cancel()
    assert got[0].closed


async def test_extension_fails_naming_the_holder(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "t.db"
    with Storage.open(path):
        ext = storage_ext.factory.create(_settings(), _config(path=str(path), lock_timeout=Duration(2.0)), Ports())
        with pytest.raises(StorageLocked, match=f"process {os.getpid()}"):
            await ext.run()


async def test_extension_cancelled_before_started_exits_cleanly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "t.db"
    with Storage.open(path):
        ext = storage_ext.factory.create(_settings(), _config(path=str(path), lock_timeout=Duration(60.0)), Ports())
        with trio.move_on_after(0.3) as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(ext.run)
        assert scope.cancelled_caught
