"""The journald receiver in process against a real journald, and a real systemd manager for unit state.

Real peers (tapio.testing.journald): a journald namespace instance the
tests write to with the native protocol, and a ``systemd --user`` manager
logging to it, whose transient units (systemd-run) fail, restart and give
up, so the unit messages come from systemd itself. The receiver reads the
instance's files through libsystemd (Debian's systemd-python). The next
stage is a recording consumer that acknowledges as each test scripts it
(an exporter's part); the cursor lives in a real storage file.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.decode import ConfigError, decode_dataclass
from tapio.receivers.journald import factory
from tapio.receivers.journald._component import CURSOR_KEY
from tapio.storage import Storage
from tapio.telemetry import Telemetry
from tapio.testing import prereq
from tapio.testing.journald import JOURNALD, SYSTEMD, Journald, UserManager, native_datagram
from tapio.testing.sink import RecordingConsumer

DEADLINE = 30


def _require() -> None:
    if os.geteuid() != 0:
        prereq.missing("root", "journald namespace instances and the systemd manager need root")
    if not Path(JOURNALD).exists() or not Path(SYSTEMD).exists():
        prereq.missing("systemd (systemd-journald, systemd)", "run scripts/setup.sh (apt package systemd)")
    try:
        from systemd import _reader  # noqa: F401
    except ImportError:
        prereq.missing("systemd-python", "run scripts/setup.sh (apt package python3-systemd, linked into .venv)")
    prereq.command("journalctl", "run scripts/setup.sh (apt package systemd)")


@pytest.fixture
def journal():
    _require()
    with Journald() as j:
        yield j


@pytest.fixture(scope="module")
def manager_journal():
    """One journald with one systemd user manager for the unit-state tests of this module."""
    _require()
    prereq.command("systemd-run", "run scripts/setup.sh (apt package systemd)")
    prereq.command("unshare", "apt package util-linux")
    with Journald() as j, UserManager(j) as m:
        yield j, m


@pytest.fixture
def storage(tmp_path):
    with Storage.open(tmp_path / "state" / "tapio.db", synchronous="normal") as s:
        yield s


def records(sink: RecordingConsumer):
    return [lr for r in sink.requests() for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(record) -> dict:
    return {kv.key: value(kv.value) for kv in record.attributes}


def seqs(sink: RecordingConsumer, test: str) -> list[int]:
    return [int(a["journald.SEQ"]) for r in records(sink) if (a := attrs(r)).get("journald.TEST") == test]


class Harness:
    def __init__(self, journal: Journald, storage: Storage | None = None) -> None:
        self.journal = journal
        self.storage = storage
        self.telemetry = Telemetry()
        self.receiver = None

    @asynccontextmanager
    async def run(self, sink, **config):
        config.setdefault("namespace", self.journal.name)
        if self.storage is not None:
            config.setdefault("storage", "storage")
        cfg = decode_dataclass(factory.config_class, config)
        assert cfg.validate() == []
        settings = Settings(
            id=ComponentID("journald"),
            kind=Kind.RECEIVER,
            telemetry=self.telemetry.for_component("receiver", "journald"),
            logger=logging.getLogger("test.journald"),
            extensions={ComponentID("storage"): self.storage} if self.storage is not None else {},
            shutdown_grace=2.0,
        )
        self.receiver = factory.create(settings, cfg, Ports(output=sink))
        async with trio.open_nursery() as nursery:
            await nursery.start(self.receiver.run)
            yield self.receiver
            nursery.cancel_scope.cancel()

    def saved_cursor(self) -> str | None:
        assert self.storage is not None
        raw = self.storage.checkpoints("receiver/journald").get(CURSOR_KEY)
        return raw.decode() if raw else None

    def metric(self, name: str, **labels: str) -> float:
        return self.telemetry.value(name, **labels)


def write(journal: Journald, test: str, seqs, **fields) -> None:
    for i in seqs:
        journal.send(f"entry {i}", TEST=test, SEQ=i, **fields)


# -- mapping and filters


async def test_an_entry_maps_to_body_severity_time_and_attributes(journal):
    sink = RecordingConsumer(ack=True)
    h = Harness(journal)
    async with h.run(sink):
        journal.send(
            "I1204 kubelet.go:2345] Node became not ready",
            PRIORITY="3",
            SYSLOG_IDENTIFIER="kubelet",
            TEST="map",
            CODE_LINE="2345",
            BLOB=b"\x00\xff\x01binary",
            MULTI="a\nb",
            CONTAINER_NAME="etcd",
        )
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: any(attrs(r).get("journald.TEST") == "map" for r in records(sink)))
    (rec,) = [r for r in records(sink) if attrs(r).get("journald.TEST") == "map"]
    a = attrs(rec)
    assert rec.body.string_value == "I1204 kubelet.go:2345] Node became not ready"
    assert (rec.severity_number, rec.severity_text) == (17, "err")
    assert rec.time_unix_nano > 0 and rec.observed_time_unix_nano >= rec.time_unix_nano - 5_000_000_000
    assert a["journald.SYSLOG_IDENTIFIER"] == "kubelet"
    assert a["process.pid"] == os.getpid()
    assert a["process.command"]  # _COMM, added by journald
    assert a["host.name"] == os.uname().nodename
    assert a["host.id"] == Path("/etc/machine-id").read_text().strip()
    assert len(a["journald._BOOT_ID"]) == 32
    assert a["code.line.number"] == 2345
    assert a["container.name"] == "etcd"
    assert a["journald.BLOB"] == b"\x00\xff\x01binary"  # binary kept as bytes
    assert a["journald.MULTI"] == "a\nb"
    assert "journald.PRIORITY" not in a and "journald.MESSAGE" not in a
    assert not rec.event_name


async def test_a_binary_message_and_a_repeated_field_are_kept(journal):
    sink = RecordingConsumer(ack=True)
    h = Harness(journal)
    async with h.run(sink, priority="debug"):  # debug: entries with any PRIORITY, or none
        journal.send_raw(native_datagram({"MESSAGE": b"\xff\xfeab", "TEST": "bin", "TAG": "one"}) + b"TAG=two\nPRIORITY=9\n")
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: any(attrs(r).get("journald.TEST") == "bin" for r in records(sink)))
    (rec,) = [r for r in records(sink) if attrs(r).get("journald.TEST") == "bin"]
    a = attrs(rec)
    assert rec.body.bytes_value == b"\xff\xfeab"
    assert sorted(a["journald.TAG"]) == ["one", "two"]
    assert rec.severity_number == 0 and a["journald.PRIORITY"] == "9"  # not a syslog priority: kept as it was


async def test_priority_identifiers_matches_and_grep_filter(journal):
    journal.send("kubelet err", PRIORITY="3", SYSLOG_IDENTIFIER="kubelet", TEST="f", SEQ=1, ZONE="a")
    journal.send("kubelet debug", PRIORITY="7", SYSLOG_IDENTIFIER="kubelet", TEST="f", SEQ=2, ZONE="a")
    journal.send("containerd warning", PRIORITY="4", SYSLOG_IDENTIFIER="containerd", TEST="f", SEQ=3, ZONE="b")
    journal.send("other notice PLEG", PRIORITY="5", SYSLOG_IDENTIFIER="other", TEST="f", SEQ=4, ZONE="a")
    journal.send("last", PRIORITY="2", SYSLOG_IDENTIFIER="last", TEST="f", SEQ=5, ZONE="c")
    journal.sync()

    async def read_until(expected: list[int], **config) -> list[int]:
        # Every entry was written before the receiver starts, and one read takes all the
        # matching entries it finds (up to max_batch_size): the first batch holds them all.
        sink = RecordingConsumer(ack=True)
        async with Harness(journal).run(sink, start_at="beginning", **config):
            with trio.fail_after(DEADLINE):
                await sink.wait_for_batches(1)
        assert len(sink.batches) == 1
        return seqs(sink, "f")

    assert await read_until([1, 3, 4, 5]) == [1, 3, 4, 5]  # default priority info drops debug
    assert await read_until([1, 3, 5], priority="warning") == [1, 3, 5]
    assert await read_until([1, 2, 3, 4, 5], priority="debug") == [1, 2, 3, 4, 5]
    assert await read_until([3, 4], priority="notice..warning") == [3, 4]
    assert await read_until([1, 2], priority="debug", identifiers=["kubelet"]) == [1, 2]
    assert await read_until([1, 4], matches=[{"ZONE": "a"}]) == [1, 4]
    assert await read_until([3, 5], matches=[{"ZONE": "b"}, {"ZONE": "c", "SYSLOG_IDENTIFIER": "last"}]) == [3, 5]
    assert await read_until([4], grep="pleg") == [4]  # lower case: case-insensitive, as journalctl's
    assert await read_until([1, 3], grep="^(kubelet|containerd)") == [1, 3]


async def wait_metric(h: Harness, name: str, at_least: float) -> None:
    while h.metric(name) < at_least:
        await trio.sleep(0.01)


async def test_start_at_end_reads_only_new_entries_and_beginning_reads_all(journal):
    write(journal, "start", range(5))
    journal.sync()
    sink = RecordingConsumer(ack=True)
    async with Harness(journal).run(sink):
        write(journal, "start", range(5, 8))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "start")) >= 3)
    assert seqs(sink, "start") == [5, 6, 7]
    sink = RecordingConsumer(ack=True)
    async with Harness(journal).run(sink, start_at="beginning"):
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "start")) >= 8)
    assert seqs(sink, "start") == list(range(8))


# -- following: no polling, rotation, vacuuming


async def test_follows_new_entries_across_rotation_and_vacuuming(journal):
    sink = RecordingConsumer(ack=True)
    h = Harness(journal)
    async with h.run(sink, max_batch_size=50):
        total = 0
        for round_ in range(4):
            write(journal, "rot", range(total, total + 300))
            total += 300
            with trio.fail_after(DEADLINE):
                await sink.wait_until(lambda: len(seqs(sink, "rot")) >= total)
            await trio.to_thread.run_sync(journal.rotate)
            if round_ >= 1:
                await trio.to_thread.run_sync(journal.vacuum, 1)
        write(journal, "rot", range(total, total + 100))
        total += 100
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "rot")) >= total)
    assert seqs(sink, "rot") == list(range(total))
    assert len(journal.files()) <= 2  # vacuuming really removed the archived files the receiver had open


async def test_a_saved_cursor_whose_entries_were_vacuumed_resumes_at_the_oldest_entry_left(journal, storage, caplog):
    h = Harness(journal, storage)
    sink = RecordingConsumer(ack=True)
    async with h.run(sink, start_at="beginning"):
        write(journal, "vac", range(10))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "vac")) >= 10)
    # while tapio is down: more entries, then rotation and vacuuming remove the file holding the cursor and 10-19
    write(journal, "vac", range(10, 20))
    journal.sync()
    journal.rotate()
    write(journal, "vac", range(20, 30))
    journal.sync()
    journal.vacuum(1)
    assert journal.count("TEST=vac") == 10
    sink = RecordingConsumer(ack=True)
    with caplog.at_level(logging.WARNING, logger="test.journald"):
        async with h.run(sink, start_at="beginning"):
            with trio.fail_after(DEADLINE):
                await sink.wait_until(lambda: len(seqs(sink, "vac")) >= 10)
    assert seqs(sink, "vac") == list(range(20, 30))
    assert "no longer holds the entry of the saved cursor" in caplog.text


# -- the cursor: saved only after delivery


async def test_the_cursor_is_saved_only_after_the_batch_is_delivered(journal, storage):
    h = Harness(journal, storage)
    write(journal, "before", range(1))
    journal.sync()
    sink = RecordingConsumer()  # the test reports delivery
    async with h.run(sink, start_at="end") as receiver:
        start = h.saved_cursor()
        assert start is not None  # start_at end remembers where the end was
        write(journal, "ack", range(20))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "ack")) >= 20)
            await trio.sleep(0.2)  # a save would be quick; give a wrong one the chance to happen
        assert h.saved_cursor() == start
        assert receiver.window.pending == len(sink.batches)
        for batch in sink.batches:
            batch.done(True)
        with trio.fail_after(DEADLINE):
            while h.saved_cursor() == start:
                await trio.sleep(0.01)
        assert receiver.window.pending == 0
    journal.sync()
    last = journal.journalctl("-n", "1", "-o", "export", "TEST=ack")
    cursor = next(line.split("=", 1)[1] for line in last.splitlines() if line.startswith("__CURSOR="))
    assert h.saved_cursor() == cursor


async def test_failing_delivery_holds_the_cursor_and_rereads_until_delivered(journal, storage):
    h = Harness(journal, storage)
    sink = RecordingConsumer()
    config = dict(start_at="end", retry_on_failure={"initial_interval": "50ms", "max_interval": "100ms", "max_elapsed_time": "0s"})
    async with h.run(sink, **config):
        start = h.saved_cursor()
        write(journal, "fail", range(30))
        for attempt in range(3):
            with trio.fail_after(DEADLINE):
                await sink.wait_until(lambda: len(seqs(sink, "fail")) >= 30)
            assert seqs(sink, "fail") == list(range(30))
            batches = list(sink.batches)
            sink.clear()
            for batch in batches:
                batch.done(False)  # the exporter gave up on them
            assert h.saved_cursor() == start
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "fail")) >= 30)
        assert seqs(sink, "fail") == list(range(30))  # after three failures, read again, in order, complete
        for batch in sink.batches:
            batch.done(True)
        with trio.fail_after(DEADLINE):
            while h.saved_cursor() == start:
                await trio.sleep(0.01)
    assert h.metric("tapio_journald_rereads_total") >= 3
    assert h.metric("tapio_journald_entries_dropped_total") == 0


async def test_retries_off_skips_undelivered_entries_counting_them(journal, storage):
    h = Harness(journal, storage)
    sink = RecordingConsumer()
    async with h.run(sink, start_at="end", retry_on_failure={"enabled": False}):
        write(journal, "drop", range(10))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "drop")) >= 10)
        for batch in sink.batches:
            batch.done(False)
        with trio.fail_after(DEADLINE):
            await wait_metric(h, "tapio_journald_entries_dropped_total", 10)
        write(journal, "drop", range(10, 12))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "drop")) >= 12)
    assert seqs(sink, "drop") == list(range(12))  # nothing read twice


async def test_restart_resumes_after_the_saved_cursor(journal, storage):
    h = Harness(journal, storage)
    sink = RecordingConsumer(ack=True)
    async with h.run(sink, start_at="beginning"):
        write(journal, "resume", range(50))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "resume")) >= 50)
    write(journal, "resume", range(50, 80))  # written while tapio is down
    sink = RecordingConsumer(ack=True)
    async with h.run(sink, start_at="beginning"):  # start_at no longer applies: the cursor does
        write(journal, "resume", range(80, 100))
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "resume")) >= 50)
    assert seqs(sink, "resume") == list(range(50, 100))


async def test_a_cursor_left_unfiltered_still_resumes_after_it_with_filters(journal, storage):
    # The saved cursor's entry does not pass the new filter: reading goes on after it, not from the start.
    h = Harness(journal, storage)
    sink = RecordingConsumer(ack=True)
    async with h.run(sink, start_at="beginning"):
        write(journal, "cf", range(5), KIND="x")
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "cf")) >= 5)
    write(journal, "cf", range(5, 10), KIND="y")
    write(journal, "cf", range(10, 12), KIND="x")
    sink = RecordingConsumer(ack=True)
    async with h.run(sink, matches=[{"KIND": "x"}]):
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: len(seqs(sink, "cf")) >= 2)
    assert seqs(sink, "cf") == [10, 11]


# -- systemd unit state, from a real systemd manager


def unit_events(sink: RecordingConsumer, unit: str) -> list[tuple[str, dict]]:
    return [(r.event_name, attrs(r)) for r in records(sink) if r.event_name and attrs(r).get("systemd.unit.name") == unit]


async def test_a_failing_service_gives_unit_events_from_systemd(manager_journal):
    journal, manager = manager_journal
    unit = "kubelet-test1.service"
    sink = RecordingConsumer(ack=True)
    h = Harness(journal)
    async with h.run(sink, units=[unit], unit_state={"units": [unit]}):
        manager.run(
            unit, "sh", "-c", "echo starting up; exit 3",
            properties={"Restart": "on-failure", "RestartSec": "100ms", "StartLimitBurst": "3", "StartLimitIntervalSec": "60s"},
        )
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: any(e == "systemd.unit.start_failed" for e, _ in unit_events(sink, unit)))
    events = unit_events(sink, unit)
    names = [e for e, _ in events]
    assert names.count("systemd.unit.started") == 3
    failed = [a for e, a in events if e == "systemd.unit.failed"]
    assert len(failed) >= 3
    assert all(a["systemd.unit.state"] == "failed" and a["systemd.unit.result"] == "exit-code" for a in failed)
    exited = [a for e, a in events if e == "systemd.unit.process_exited"]
    assert len(exited) == 3
    assert all(a["systemd.unit.exit.code"] == "exited" and a["systemd.unit.exit.status"] == 3 and a["process.exit.code"] == 3 for a in exited)
    restarts = [a["systemd.unit.restart.count"] for e, a in events if e == "systemd.unit.restart_scheduled"]
    assert restarts == [1, 2, 3]
    (gave_up,) = [a for e, a in events if e == "systemd.unit.start_failed"]
    assert gave_up["systemd.unit.state"] == "failed" and gave_up["systemd.unit.result"] == "failed"
    assert all(a["systemd.unit.manager"] == "user" for _, a in events)
    # the writer of systemd's messages is the manager, kept apart from the unit they are about
    assert all(a.get("journald._SYSTEMD_UNIT", "init.scope") == "init.scope" for _, a in events)
    assert h.metric("tapio_journald_unit_events_total", event="failed") == len(failed)


async def test_a_signal_kill_and_a_clean_exit(manager_journal):
    journal, manager = manager_journal
    killed, clean = "containerd-test2.service", "crio-test2.service"
    sink = RecordingConsumer(ack=True)
    # debug: a user manager logs "Deactivated successfully" at debug level (PID 1 at info)
    async with Harness(journal).run(sink, priority="debug", units=[killed, clean], unit_state={"units": [killed, clean]}):
        manager.run(killed, "sh", "-c", "kill -KILL $$$$")  # systemd turns $$ into $
        manager.run(clean, "true")
        with trio.fail_after(DEADLINE):
            await sink.wait_until(
                lambda: any(e == "systemd.unit.failed" for e, _ in unit_events(sink, killed))
                and any(e == "systemd.unit.succeeded" for e, _ in unit_events(sink, clean))
            )
    (exited,) = [a for e, a in unit_events(sink, killed) if e == "systemd.unit.process_exited"]
    assert exited["systemd.unit.exit.code"] == "killed" and exited["systemd.unit.exit.signal"] == "SIGKILL"
    assert "process.exit.code" not in exited
    (failed,) = [a for e, a in unit_events(sink, killed) if e == "systemd.unit.failed"]
    assert failed["systemd.unit.result"] == "signal"
    (exited,) = [a for e, a in unit_events(sink, clean) if e == "systemd.unit.process_exited"]
    assert exited["systemd.unit.exit.code"] == "exited" and exited["process.exit.code"] == 0
    (ok,) = [a for e, a in unit_events(sink, clean) if e == "systemd.unit.succeeded"]
    assert ok["systemd.unit.state"] == "inactive" and ok["systemd.unit.result"] == "success"


async def test_unit_state_is_limited_to_its_units_others_stay_plain_records(manager_journal):
    journal, manager = manager_journal
    watched, other = "kubelet-test3.service", "other-test3.service"
    sink = RecordingConsumer(ack=True)
    async with Harness(journal).run(sink, units=[watched, other], unit_state={"units": [watched]}):
        manager.run(other, "false")
        manager.run(watched, "false")
        with trio.fail_after(DEADLINE):
            await sink.wait_until(lambda: any(e == "systemd.unit.failed" for e, _ in unit_events(sink, watched)))
            await sink.wait_until(lambda: any("other-test3.service: Failed" in r.body.string_value for r in records(sink)))
    about_other = [r for r in records(sink) if r.body.string_value.startswith("other-test3.service")]
    assert about_other and not any(r.event_name for r in about_other)
    assert all("systemd.unit.event" not in attrs(r) and attrs(r)["journald.USER_UNIT"] == other for r in about_other)


def test_the_default_unit_state_units_are_the_kubernetes_node_services():
    cfg = factory.config_class()
    assert cfg.unit_state.units == ["kubelet.service", "containerd.service", "crio.service", "docker.service"]
    assert cfg.validate() == []


def test_validate_reports_every_problem():
    with pytest.raises(ConfigError) as caught:
        decode_dataclass(
            factory.config_class,
            {
                "directory": "relative", "namespace": "x", "priority": "loud", "units": ["a*"], "matches": [{"lower": "x"}, {}],
                "grep": "(", "max_batch_size": 0, "unit_state": {"units": [""]},
            },
        )
    problems = str(caught.value).splitlines()
    for key in ("namespace:", "directory:", "priority:", "units[0]:", "matches[0].lower:", "matches[1]:", "grep:",
                "max_batch_size:", "unit_state.units[0]:"):
        assert any(p.startswith(key) for p in problems), (key, problems)


def test_the_library_is_debians_systemd_python_linked_into_the_venv():
    _require()
    from systemd import _reader

    assert Path(_reader.__file__).resolve().is_relative_to("/usr/lib/python3/dist-packages/systemd")
    assert shutil.which("journalctl")
