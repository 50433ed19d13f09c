"""The cni-log receiver in process on real files: rotation, truncation, long lines, encodings, delivery and offsets.

Real files in a temporary directory, the real tailer (inotify, worker
threads) and a real storage file; the next stage is a recording consumer
that acknowledges as each test scripts it (an exporter's part).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Settings, StorageRef
from tapio.decode import decode_dataclass
from tapio.receivers.cni_log import factory
from tapio.storage import Storage
from tapio.telemetry import Telemetry
from tapio.testing.sink import RecordingConsumer

DATA = Path(__file__).parent / "data" / "cni"
DEADLINE = 30


def calico_line(seq: int) -> str:
    return (
        f"2024-05-14 09:12:01.{seq % 1000:03d} [INFO][{1000 + seq}] k8s.go 73: Extracted identifiers for CmdAddK8s "
        f'ContainerID="{seq:064x}" Namespace="ns" Pod="pod-{seq}" WorkloadEndpoint="node-k8s-pod--{seq}-eth0"'
    )


SEQ = re.compile(r'Pod="pod-(\d+)"')


def bodies(sink: RecordingConsumer) -> list[str]:
    return [lr.body.string_value for r in sink.requests() for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]


def records(sink: RecordingConsumer):
    return [lr for r in sink.requests() for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]


def seqs(sink: RecordingConsumer) -> list[int]:
    return [int(m.group(1)) for b in bodies(sink) if (m := SEQ.search(b))]


def attrs(record) -> dict:
    out = {}
    for kv in record.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") != "array_value" else [x.string_value for x in v.array_value.values]
    return out


class Harness:
    def __init__(self, tmp_path: Path, storage: Storage | None) -> None:
        self.tmp_path = tmp_path
        self.storage = storage
        self.telemetry = Telemetry()

    @asynccontextmanager
    async def run(self, sink, **config):
        if self.storage is not None:
            config.setdefault("storage", "storage")
        cfg = decode_dataclass(factory.config_class, config)
        settings = Settings(
            id=ComponentID("cni-log"),
            kind=Kind.RECEIVER,
            telemetry=self.telemetry.for_component("receiver", "cni-log"),
            logger=logging.getLogger("test.cni-log"),
            extensions={ComponentID("storage"): self.storage} if self.storage is not None else {},
            shutdown_grace=2.0,
        )
        receiver = factory.create(settings, cfg, Ports(output=sink))
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            yield receiver
            nursery.cancel_scope.cancel()

    def bad(self, reason: str) -> float:
        return self.telemetry.value("tapio_bad_input_total", reason=reason)

    def offsets(self) -> list[int]:
        assert self.storage is not None
        return sorted(json.loads(v)["offset"] for v in self.storage.checkpoints("receiver/cni-log").items().values())


@pytest.fixture
def storage(tmp_path):
    with Storage.open(tmp_path / "state" / "tapio.db", synchronous="normal") as s:
        yield s


def write_lines(path: Path, lines, mode="a") -> None:
    with open(path, mode) as f:
        for line in lines:
            f.write(line + "\n")


async def test_start_at_end_reads_only_new_lines_and_beginning_reads_all(tmp_path):
    log = tmp_path / "cni.log"
    write_lines(log, [calico_line(i) for i in range(5)])
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")]):
            write_lines(log, [calico_line(i) for i in range(5, 8)])
            await sink.wait_for_count(3)
    assert seqs(sink) == [5, 6, 7]
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], start_at="beginning"):
            await sink.wait_for_count(8)
    assert seqs(sink) == list(range(8))


async def test_fixture_files_become_records_with_their_attributes(tmp_path):
    for name in ("calico.log", "cilium-cni.log", "multus.log", "aws-plugin.log", "generic.log"):
        shutil.copy(DATA / name, tmp_path / name)
    total = sum(len((DATA / n).read_text().splitlines()) for n in os.listdir(DATA))
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], start_at="beginning"):
            await sink.wait_for_count(total)
    recs = records(sink)
    assert len(recs) == total
    by_body = {r.body.string_value: r for r in recs}
    add = by_body[(DATA / "aws-plugin.log").read_text().splitlines()[1]]
    a = attrs(add)
    assert a["tapio.cni.operation"] == "ADD" and a["k8s.pod.name"] == "frontend-5c7d8f9b6-abcde"
    assert a["log.file.name"] == "aws-plugin.log" and a["log.file.path"] == str(tmp_path / "aws-plugin.log")
    assert add.severity_text == "INFO" and add.time_unix_nano > 0 and add.observed_time_unix_nano > add.time_unix_nano
    assert h.bad("unparsed_line") == 3  # the three lines of generic.log no style knows
    tel = h.telemetry
    assert tel.value("tapio_cni_log_lines_total", style="calico") == 12
    assert tel.value("tapio_cni_log_lines_total", style="unparsed") == 3


def writer_thread(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def write_with_rename(log: Path, total: int, rotate_every: int, pause: float) -> None:
    f = open(log, "a")
    for i in range(total):
        if i and i % rotate_every == 0:
            f.close()
            os.rename(log, log.with_name(f"cni-{i:06d}.rotated"))  # lumberjack's way: rename, then a new file
            f = open(log, "a")
        f.write(calico_line(i) + "\n")
        f.flush()
        if i % 50 == 0:
            time.sleep(pause)
    f.close()


@pytest.mark.parametrize("rotated_matched", [False, True], ids=["rotated-not-matched", "rotated-matched"])
async def test_rotation_by_rename_while_writing_loses_and_repeats_nothing(tmp_path, rotated_matched):
    log = tmp_path / "cni.log"
    log.touch()
    include = [str(log)] + ([str(tmp_path / "cni-*.rotated")] if rotated_matched else [])
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    total = 3000
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=include, start_at="beginning"):
            t = writer_thread(write_with_rename, log, total, 700, 0.002)
            await sink.wait_for_count(total)
            await trio.to_thread.run_sync(t.join)
            await trio.sleep(0.3)  # anything more would be a duplicate
    got = seqs(sink)
    assert sorted(got) == list(range(total))
    assert len(got) == total
    assert h.telemetry.value("tapio_tail_rotations_total", kind="rename") == total // 700


async def test_a_file_created_and_renamed_away_while_a_batch_converts_is_still_read(tmp_path, monkeypatch):
    """A busy node: while the worker thread converts a batch, a new file appears at the watched name and is
    renamed out of the globs. It must have been opened (from the watch task) by then, and is read to its end."""
    from tapio.receivers.cni_log._component import CniLogReceiver

    entered, release = threading.Event(), threading.Event()
    convert = CniLogReceiver._convert

    def held_convert(self, *args):
        if not release.is_set():
            entered.set()
            release.wait(DEADLINE)
        return convert(self, *args)

    monkeypatch.setattr(CniLogReceiver, "_convert", held_convert)
    log = tmp_path / "cni.log"
    write_lines(log, [calico_line(i) for i in range(10)])
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], start_at="beginning"):
            await trio.to_thread.run_sync(entered.wait)  # the first batch is being converted, and stays so
            try:
                os.rename(log, tmp_path / "cni-1.rotated")
                write_lines(log, [calico_line(i) for i in range(10, 20)])
                while h.telemetry.value("tapio_tail_files_open") < 2:  # the new file, opened while the turn is held
                    await trio.sleep(0.01)
                os.rename(log, tmp_path / "cni-2.rotated")  # gone from the globs before it was ever read
                write_lines(log, [calico_line(i) for i in range(20, 30)])
            finally:
                release.set()
            await sink.wait_for_count(30)
            await trio.sleep(0.3)  # anything more would be a duplicate
    assert sorted(seqs(sink)) == list(range(30))


def write_with_copytruncate(log: Path, total: int, rotate_every: int, pause: float) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # what logrotate's copytruncate asks of writers
    n = 0
    for i in range(total):
        if i and i % rotate_every == 0:
            n += 1
            shutil.copyfile(log, log.with_name(f"cni.log.{n}"))
            os.truncate(log, 0)
        os.write(fd, (calico_line(i) + "\n").encode())
        if i % 50 == 0:
            time.sleep(pause)
    os.close(fd)


async def test_rotation_by_copytruncate_while_writing_loses_and_repeats_nothing(tmp_path):
    log = tmp_path / "cni.log"
    log.touch()
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    total = 3000
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "cni.log*")], start_at="beginning"):
            t = writer_thread(write_with_copytruncate, log, total, 700, 0.002)
            await sink.wait_for_count(total)
            await trio.to_thread.run_sync(t.join)
            await trio.sleep(0.3)
    got = seqs(sink)
    assert sorted(got) == list(range(total)), sorted(set(range(total)) - set(got))[:10]
    assert len(got) == total
    assert h.telemetry.value("tapio_tail_rotations_total", kind="truncate") >= 1


async def test_truncate_and_rewrite_longer_is_read_from_the_beginning(tmp_path):
    log = tmp_path / "cni.log"
    write_lines(log, [calico_line(i) for i in range(100)])
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], start_at="beginning"):
            await sink.wait_for_count(100)
            # rewritten in place, already longer than what was read when the tailer looks again
            with open(log, "r+") as f:
                f.truncate(0)
                f.write("".join(calico_line(i) + "\n" for i in range(1000, 1300)))
            await sink.wait_for_count(400)
            await trio.sleep(0.3)
    assert seqs(sink) == list(range(100)) + list(range(1000, 1300))
    rotations = h.telemetry.value("tapio_tail_rotations_total", kind="rewrite") + h.telemetry.value("tapio_tail_rotations_total", kind="truncate")
    assert rotations == 1


async def test_a_10mb_line_and_binary_garbage_are_counted_and_the_rest_is_read(tmp_path):
    log = tmp_path / "cni.log"
    garbage = bytes(range(256)) * 4 + b"\xff\xfe\xfd"
    with open(log, "wb") as f:
        f.write(calico_line(1).encode() + b"\n")
        f.write(b"x" * (10 * 1024 * 1024) + b"\n")
        f.write(garbage.replace(b"\n", b"") + b"\n")
        f.write(calico_line(2).encode() + b"\n")
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], start_at="beginning"):
            await sink.wait_for_count(4)
    recs = records(sink)
    assert len(recs) == 4
    assert seqs(sink) == [1, 2]
    long = recs[1]
    assert len(long.body.string_value) == 1024 * 1024 and attrs(long)["tapio.cni.truncated"] is True
    assert "\ufffd" in recs[2].body.string_value
    assert h.bad("line_too_long") == 1
    assert h.bad("invalid_encoding") == 1
    assert h.bad("unparsed_line") == 2


async def test_utf16_file_and_multiline_records(tmp_path):
    log = tmp_path / "win.log"
    log.write_bytes("\ufeff".encode("utf-16-le") + "".join(calico_line(i) + "\r\n" for i in range(3)).encode("utf-16-le"))
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], start_at="beginning", encoding="utf-16le"):
            await sink.wait_for_count(3)
    assert seqs(sink) == [0, 1, 2] and not bodies(sink)[0].startswith("\ufeff")

    log = tmp_path / "multi.log"
    write_lines(log, ["2024-05-14T09:30:00Z [error] first", "  continued here", "2024-05-14T09:30:01Z [verbose] second"])
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], start_at="beginning", multiline={"line_start_pattern": r"^\d{4}-"}, force_flush_period="100ms"):
            await sink.wait_for_count(2)  # the last record waits for the force flush
    assert bodies(sink) == ["2024-05-14T09:30:00Z [error] first\n  continued here", "2024-05-14T09:30:01Z [verbose] second"]


async def test_a_partial_last_line_is_sent_after_the_force_flush_period(tmp_path):
    log = tmp_path / "cni.log"
    log.write_text(calico_line(1) + "\n" + calico_line(2))
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], start_at="beginning", force_flush_period="200ms"):
            await sink.wait_for_count(1)
            first_at = trio.current_time()
            await sink.wait_for_count(2)
            assert trio.current_time() - first_at >= 0.15
    assert seqs(sink) == [1, 2]


class ScriptedAck:
    """Acknowledges each batch the receiver hands on as ``deliver()`` says at that moment (an exporter's part)."""

    def __init__(self, sink: RecordingConsumer) -> None:
        self.sink = sink
        self.delivering = False
        self.failed = 0
        #: the sequence numbers of the lines it reported delivered
        self.delivered: set[int] = set()

    async def run(self) -> None:
        i = 0
        while True:
            await self.sink.wait_for_batches(i + 1)
            batch = self.sink.batches[i]
            if self.delivering:
                self.delivered.update(int(m.group(1)) for r in batch.requests for rl in r.resource_logs for sl in rl.scope_logs
                                      for lr in sl.log_records if (m := SEQ.search(lr.body.string_value)))
            else:
                self.failed += 1
            batch.done(self.delivering)
            i += 1


async def test_offset_does_not_advance_while_delivery_fails_and_nothing_is_lost_after(tmp_path, storage):
    log = tmp_path / "cni.log"
    log.touch()
    h = Harness(tmp_path, storage)
    sink = RecordingConsumer()
    acker = ScriptedAck(sink)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(acker.run)
            async with h.run(sink, include=[str(log)], start_at="beginning"):
                write_lines(log, [calico_line(i) for i in range(200)])
                await sink.wait_until(lambda: acker.failed >= 2)  # the first read and its replay both failed
                assert await storage.run_sync(h.offsets) in ([], [0])
                assert h.telemetry.value("tapio_tail_replays_total") >= 1
                acker.delivering = True
                size = log.stat().st_size
                while await storage.run_sync(h.offsets) != [size]:
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
    got = seqs(sink)
    assert set(got) == set(range(200))  # every line, delivered after the failures


async def test_restart_resumes_after_the_last_delivered_line(tmp_path, storage):
    log = tmp_path / "cni.log"
    write_lines(log, [calico_line(i) for i in range(50)])
    h = Harness(tmp_path, storage)
    first = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(first, include=[str(log)], start_at="beginning"):
            await first.wait_for_count(50)
    assert h.offsets() == [log.stat().st_size]
    write_lines(log, [calico_line(i) for i in range(50, 80)])
    # renamed while tapio was down: the name changed, the content did not
    os.rename(log, tmp_path / "cni-old.log")
    second = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(second, include=[str(tmp_path / "*.log")], start_at="beginning"):
            await second.wait_for_count(30)
            await trio.sleep(0.3)
    assert seqs(first) == list(range(50)) and seqs(second) == list(range(50, 80))


async def test_fallback_files_are_read_when_no_file_matches(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    shutil.copy(DATA / "multus.log", samples / "multus.log")
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "real" / "*.log")], fallback_include=[str(samples / "*.log")]) as receiver:
            await sink.wait_for_count(9)
            assert "reading the samples" in receiver.running_summary
            # a real file that appears later is picked up too
            (tmp_path / "real").mkdir()
            write_lines(tmp_path / "real" / "cni.log", [calico_line(7)])
            await sink.wait_for_count(10)
    assert seqs(sink) == [7]


async def test_a_backlog_longer_than_one_turn_is_read_without_waiting_for_a_poll_or_a_change(tmp_path):
    """A file far longer than one turn's chunks (a node's existing log with start_at beginning) is read to its
    end at once: with no write, no poll (an hour away) and no partial line to flush to come, each turn with more
    to read asks for the next (they once waited for one of those: ~4 chunks a second on a busy file)."""
    from tapio.receivers._tail._tailer import CHUNKS_PER_TURN, READ_CHUNK

    log = tmp_path / "cni.log"
    line = calico_line(0)
    total = (CHUNKS_PER_TURN * READ_CHUNK * 5) // (len(line) + 1)
    write_lines(log, [calico_line(i) for i in range(total)])
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], start_at="beginning", poll_interval="1h", force_flush_period="0s"):
            await sink.wait_for_count(total)
    assert seqs(sink) == list(range(total))
