"""The shared file tailer (tapio.receivers._tail) through the cni-log receiver: renames it never saw, empty copies,
files that wait, and how far reading runs ahead of the saved offsets.

Real files, real inotify, real worker threads and a real storage file, as in
test_cni_log_receiver. A "busy node" (the tailer's tasks not getting to run
while a file lives and goes) is made exact by doing the file operations in
the test's own task without an await in between: the tailer runs on the same
trio loop, so it sees them only afterwards, all in one read of inotify
events, as it would if it had been starved for that long.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path

import trio

from tapio.receivers._tail import _tailer
from tapio.storage import Storage
from tapio.testing import wait
from tapio.testing.sink import RecordingConsumer

from .test_cni_log_receiver import DEADLINE, Harness, ScriptedAck, calico_line, seqs, storage, write_lines  # noqa: F401 (storage: a fixture)


def size_of(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


#: every wait of these tests has the cni-log tests' deadline
until = functools.partial(wait.until, timeout=DEADLINE, every=0.01)


async def read_everything(h: Harness, sink: RecordingConsumer, count: int, nbytes: int) -> None:
    """Wait for ``count`` records and for the tailer to have read ``nbytes`` (a file read twice reads more)."""
    await sink.wait_for_count(count)
    await until(lambda: h.telemetry.value("tapio_tail_bytes_read_total") >= nbytes, f"{nbytes} bytes read")


async def started(h: Harness, sink: RecordingConsumer, log: Path) -> None:
    """The tailer holds ``log`` open and has read its first line (so its identity is known)."""
    write_lines(log, [calico_line(0)])
    await sink.wait_for_count(1)


async def test_a_file_created_and_renamed_out_of_the_globs_before_the_tailer_ran_is_read_at_its_new_name(tmp_path):
    log = tmp_path / "cni.log"
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], poll_interval="1h"):
            await started(h, sink, log)
            # no await from here on: the tailer does not run while these files live and go
            os.rename(log, tmp_path / "cni.log.1")  # the open one
            write_lines(log, [calico_line(i) for i in range(1, 300)])  # never opened...
            os.rename(log, tmp_path / "cni.log.2")  # ...and renamed out of the globs
            write_lines(log, [calico_line(i) for i in range(300, 310)])
            await read_everything(h, sink, 310, size_of(tmp_path / "cni.log.1", tmp_path / "cni.log.2", log))
    assert sorted(seqs(sink)) == list(range(310))
    assert h.telemetry.value("tapio_tail_bytes_read_total") == size_of(tmp_path / "cni.log.1", tmp_path / "cni.log.2", log)
    assert h.telemetry.value("tapio_tail_rotations_total", kind="rename") == 2


async def test_a_never_opened_file_renamed_twice_is_followed_and_one_renamed_within_the_globs_is_read_once(tmp_path):
    log = tmp_path / "cni.log"
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], poll_interval="1h"):
            await started(h, sink, tmp_path / "first.log")
            write_lines(log, [calico_line(i) for i in range(1, 100)])
            os.rename(log, tmp_path / "cni.log.1")  # logrotate's numbering: .1 becomes .2 before the tailer looks
            os.rename(tmp_path / "cni.log.1", tmp_path / "cni.log.2")
            write_lines(log, [calico_line(i) for i in range(100, 200)])
            os.rename(log, tmp_path / "other.log")  # within the globs: the scan finds it there
            await read_everything(h, sink, 200, size_of(tmp_path / "first.log", tmp_path / "cni.log.2", tmp_path / "other.log"))
    assert sorted(seqs(sink)) == list(range(200))
    assert h.telemetry.value("tapio_tail_bytes_read_total") == size_of(tmp_path / "first.log", tmp_path / "cni.log.2", tmp_path / "other.log")


async def test_a_never_opened_file_moved_to_a_directory_not_watched_is_counted(tmp_path):
    log = tmp_path / "cni.log"
    away = tmp_path / "away"
    away.mkdir()
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], poll_interval="1h"):
            await started(h, sink, tmp_path / "first.log")
            write_lines(log, [calico_line(i) for i in range(1, 50)])
            os.rename(log, away / "cni.log")
            await until(lambda: h.telemetry.value("tapio_tail_files_missed_total", reason="moved_away") == 1, "the missed file counted")
            # the file tapio holds open may go there without being missed
            os.rename(tmp_path / "first.log", away / "first.log")
            write_lines(log, [calico_line(50)])
            await sink.wait_for_count(2)
    assert seqs(sink) == [0, 50]
    assert h.telemetry.value("tapio_tail_files_missed_total", reason="moved_away") == 1


async def test_rename_rotation_with_unread_bytes_in_the_open_file_reads_them_once(tmp_path):
    log = tmp_path / "cni.log"
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], poll_interval="1h"):
            await started(h, sink, log)
            write_lines(log, [calico_line(i) for i in range(1, 3000)])  # unread when it is renamed
            os.rename(log, tmp_path / "cni-1.rotated")
            write_lines(log, [calico_line(i) for i in range(3000, 3100)])
            await read_everything(h, sink, 3100, size_of(tmp_path / "cni-1.rotated", log))
    assert seqs(sink)[:3000] == list(range(3000)) and sorted(seqs(sink)) == list(range(3100))
    assert h.telemetry.value("tapio_tail_bytes_read_total") == size_of(tmp_path / "cni-1.rotated", log)


async def test_a_copy_found_empty_by_the_periodic_scan_and_filled_after_is_not_read_twice(tmp_path):
    """copytruncate creates the copy, then fills it: a scan between the two sees an empty file under a matching name."""
    log = tmp_path / "cni.log"
    write_lines(log, [calico_line(i) for i in range(100)])
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    copy = tmp_path / "cni.log.1"
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "cni.log*")], start_at="beginning", poll_interval="50ms"):
            await sink.wait_for_count(100)
            copy.touch()
            await until(lambda: h.telemetry.value("tapio_tail_files_open") == 2, "the empty copy opened by a scan")
            shutil.copyfile(log, copy)
            await until(lambda: h.telemetry.value("tapio_tail_rotations_total", kind="copy") >= 1, "the copy recognised")
            os.truncate(log, 0)
            write_lines(log, [calico_line(i) for i in range(100, 150)])
            await sink.wait_for_count(150)
            await until(lambda: h.telemetry.value("tapio_tail_rotations_total", kind="truncate") == 1, "the truncation seen")
    assert seqs(sink) == list(range(150))


async def test_a_tiny_new_file_is_still_read(tmp_path):
    """A new file shorter than a fingerprint's minimum is identified only once it stopped growing for a poll interval."""
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], poll_interval="100ms"):
            (tmp_path / "tiny.log").write_text("ok\n")
            await sink.wait_for_count(1)
    assert [r.body.string_value for r in (lr for req in sink.requests() for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records)] == ["ok"]


async def test_a_rotated_file_whose_batch_failed_is_kept_until_it_was_delivered(tmp_path, monkeypatch):
    """The rotated-file grace ends during the replay backoff: the file must stay open, else its lines are lost."""
    monkeypatch.setattr(_tailer, "ROTATED_GRACE", 0.2)
    log = tmp_path / "cni.log"
    log.touch()
    h = Harness(tmp_path, None)
    sink = RecordingConsumer()
    acker = ScriptedAck(sink)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(acker.run)
            async with h.run(sink, include=[str(log)], start_at="beginning", poll_interval="50ms"):
                write_lines(log, [calico_line(i) for i in range(100)])
                await until(lambda: acker.failed >= 1, "a failed delivery")
                os.rename(log, tmp_path / "cni-1.rotated")
                await until(lambda: h.telemetry.value("tapio_tail_rotations_total", kind="rename") == 1, "the rename seen")
                # the grace (0.2 s) ends during the backoff (1 s) before the replay
                acker.delivering = True
                await until(lambda: acker.delivered == set(range(100)), "every line delivered")
            n.cancel_scope.cancel()


async def test_a_file_waiting_for_max_open_files_is_opened_when_one_closes_not_at_the_next_poll(tmp_path, monkeypatch):
    monkeypatch.setattr(_tailer, "ROTATED_GRACE", 0.2)
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(tmp_path / "*.log")], start_at="beginning", poll_interval="1h", max_open_files=1):
            await started(h, sink, tmp_path / "a.log")
            write_lines(tmp_path / "b.log", [calico_line(1)])
            await until(lambda: h.telemetry.value("tapio_tail_files_waiting") == 1, "b.log waiting")
            os.rename(tmp_path / "a.log", tmp_path / "a.log.1")  # a.log is closed after the grace
            await sink.wait_for_count(2)
    assert seqs(sink) == [0, 1]


async def test_writes_to_a_rotated_file_out_of_the_globs_are_read_at_once(tmp_path, monkeypatch):
    """A writer that still holds the renamed file adds lines: they are read as they come, not at a poll or the grace's end."""
    monkeypatch.setattr(_tailer, "ROTATED_GRACE", 3600.0)
    log = tmp_path / "cni.log"
    h = Harness(tmp_path, None)
    sink = RecordingConsumer(ack=True)
    with trio.fail_after(DEADLINE):
        async with h.run(sink, include=[str(log)], poll_interval="1h"):
            with open(log, "a") as writer:
                writer.write(calico_line(0) + "\n")
                writer.flush()
                await sink.wait_for_count(1)
                os.rename(log, tmp_path / "cni.log.1")
                await until(lambda: h.telemetry.value("tapio_tail_rotations_total", kind="rename") == 1, "the rename seen")
                # a line in the new file, read once the follow loop is done with the rename (the renamed file's turn comes first)
                write_lines(log, [calico_line(1)])
                await sink.wait_for_count(2)
                writer.write(calico_line(2) + "\n")
                writer.flush()
                await sink.wait_for_count(3)
    assert seqs(sink) == [0, 1, 2]


async def test_reading_runs_at_most_max_unsaved_ahead_of_the_saved_offset(tmp_path, storage: Storage):
    """Checkpoint writes held up (the storage busy): the tailer stops reading max_unsaved past the saved offset,
    so a crash then repeats at most that much; once the writes go through it reads on to the end."""
    log = tmp_path / "cni.log"
    log.touch()
    window = 64 * 1024
    h = Harness(tmp_path, storage)
    sink = RecordingConsumer(ack=True)
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()
    busy_now = threading.Event()

    def busy() -> None:  # a long transaction of another storage user: the checkpoint writes queue behind it
        busy_now.set()
        trio.from_thread.run(release.wait, trio_token=token)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            async with h.run(sink, include=[str(log)], start_at="beginning", max_unsaved=window):
                n.start_soon(storage.run_sync, busy)
                await trio.to_thread.run_sync(busy_now.wait)
                write_lines(log, [calico_line(i) for i in range(2000)])
                await until(lambda: h.telemetry.value("tapio_tail_files_waiting_for_save") == 1, "reading waiting for a save")
                read = h.telemetry.value("tapio_tail_bytes_read_total")
                assert read <= window
                assert len(seqs(sink)) <= window // (len(calico_line(0)) + 1)
                assert await trio.to_thread.run_sync(h.offsets) == []
                release.set()
                await sink.wait_for_count(2000)
                await until(lambda: h.offsets() == [log.stat().st_size], "the end saved")
    assert seqs(sink) == list(range(2000))
