"""The file exporter, run under trio against real files: formats, gzip, rotation, flushing, failures, config."""

from __future__ import annotations

import gzip
import logging
import os
import re

import pytest
import trio
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tapio import otlpjson
from tapio.component import ComponentID, Kind, Ports, Settings, config_problems
from tapio.exporters.file import FileConfig, RotationConfig, factory
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing import prereq
from tapio.units import Duration


def logs_request(n: int, tag: str = "") -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(
        resource_logs=[
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"string_value": "tapio-test"}}]},
                "scope_logs": [
                    {
                        "log_records": [
                            {
                                "time_unix_nano": 1_700_000_000_000_000_000 + i,
                                "severity_number": 9,
                                "body": {"string_value": f"record {tag}{i}"},
                                "trace_id": bytes([i % 256]) * 16,
                                "attributes": [{"key": "i", "value": {"int_value": i}}],
                            }
                            for i in range(n)
                        ]
                    }
                ],
            }
        ]
    )


def traces_request(n: int) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(
        resource_spans=[
            {
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": b"\x01" * 16,
                                "span_id": bytes([i + 1]) * 8,
                                "name": f"span {i}",
                                "kind": 2,
                                "events": [{"name": "e", "time_unix_nano": 5}],
                                "status": {"code": 1},
                            }
                            for i in range(n)
                        ]
                    }
                ]
            }
        ]
    )


def metrics_request(n: int) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest(
        resource_metrics=[
            {
                "scope_metrics": [
                    {
                        "metrics": [
                            {"name": "g", "gauge": {"data_points": [{"as_double": float(i)} for i in range(n)]}},
                            {
                                "name": "h",
                                "histogram": {"data_points": [{"count": 2, "bucket_counts": [1, 1], "explicit_bounds": [1.0]}]},
                            },
                        ]
                    }
                ]
            }
        ]
    )


def all_signal_batches() -> list[Batch]:
    return [
        Batch.of(Signal.LOGS, logs_request(3)),
        Batch.of(Signal.TRACES, traces_request(2)),
        Batch.of(Signal.METRICS, metrics_request(4)),
        Batch.of(Signal.LOGS, logs_request(1, "a"), logs_request(2, "b")),  # two requests: one record
    ]


def make_settings(telemetry: Telemetry) -> Settings:
    return Settings(
        id=ComponentID("file"),
        kind=Kind.EXPORTER,
        telemetry=telemetry.for_component("exporter", "file"),
        logger=logging.getLogger("tapio.test.file"),
        shutdown_grace=5.0,
    )


async def run_exporter(config: FileConfig, batches: list[Batch], telemetry: Telemetry | None = None) -> Telemetry:
    """Start the exporter, send the batches, close its input and wait for it to finish."""
    telemetry = telemetry or Telemetry()
    send, receive = trio.open_memory_channel[Batch](4)
    exporter = factory.create(make_settings(telemetry), config, Ports(input=receive))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            async with send:
                for batch in batches:
                    await send.send(batch)
    return telemetry


def sent(telemetry: Telemetry, signal: Signal, what: str = "sent") -> float:
    return telemetry.value(f"tapio_exporter_{what}_{signal.item_name}_total", exporter="file")


def read_proto_records(data: bytes) -> list[bytes]:
    records, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        records.append(data[pos + 4 : pos + 4 + size])
        assert len(records[-1]) == size, "truncated record"
        pos += 4 + size
    return records


async def test_json_lines_decode_to_the_requests_sent(tmp_path):
    path = tmp_path / "sub" / "dir" / "out.jsonl"  # missing directories are created
    batches = all_signal_batches()
    done = []
    for b in batches:
        b.on_done.append(done.append)
    telemetry = await run_exporter(FileConfig(path=str(path)), batches)

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(batches) + 1
    for line, batch in zip(lines, batches):
        assert otlpjson.decode(batch.signal, line) == batch.merged()
    assert done == [True] * len(batches)  # every batch told its sources it was delivered
    assert sent(telemetry, Signal.LOGS) == 6
    assert sent(telemetry, Signal.TRACES) == 2
    assert sent(telemetry, Signal.METRICS) == 5
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


async def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"resourceLogs":[]}\n')
    await run_exporter(FileConfig(path=str(path)), [Batch.of(Signal.LOGS, logs_request(2))])
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"resourceLogs":[]}'
    assert otlpjson.decode(Signal.LOGS, lines[1]) == logs_request(2)


async def test_proto_records_are_length_prefixed(tmp_path):
    path = tmp_path / "out.binpb"
    batches = all_signal_batches()
    telemetry = await run_exporter(FileConfig(path=str(path), format="proto"), batches)
    records = read_proto_records(path.read_bytes())
    assert len(records) == len(batches)
    for record, batch in zip(records, batches):
        assert batch.signal.request_class.FromString(record) == batch.merged()
    assert sent(telemetry, Signal.LOGS) == 6


@pytest.mark.parametrize("fmt", ["json", "proto"])
async def test_gzip_members_per_record(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}.gz"
    batches = all_signal_batches()
    await run_exporter(FileConfig(path=str(path), format=fmt, compression="gzip", flush_interval=Duration(0)), batches)
    data = gzip.decompress(path.read_bytes())  # a multi-member gzip file reads as one stream
    records = data.split(b"\n")[:-1] if fmt == "json" else read_proto_records(data)
    assert len(records) == len(batches)
    for record, batch in zip(records, batches):
        decoded = otlpjson.decode(batch.signal, record) if fmt == "json" else batch.signal.request_class.FromString(record)
        assert decoded == batch.merged()


async def test_rotation_by_size_keeps_every_record(tmp_path):
    path = tmp_path / "logs.json"
    # ~40 KiB per batch, 1 MiB per file: about 60 batches make 2-3 files
    batches = [Batch.of(Signal.LOGS, logs_request(250, f"{k}-")) for k in range(60)]
    record_size = len(otlpjson.encode(batches[0].requests[0])) + 1
    config = FileConfig(path=str(path), rotation=RotationConfig(max_megabytes=1, max_backups=0))
    telemetry = await run_exporter(config, batches)

    backups = sorted(p.name for p in tmp_path.iterdir() if p.name != "logs.json")
    assert len(backups) >= 2
    for name in backups:
        assert re.fullmatch(r"logs-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3}\.json", name), name
        assert os.path.getsize(tmp_path / name) <= 1024 * 1024
        assert os.path.getsize(tmp_path / name) > 1024 * 1024 - 2 * record_size
    lines = []
    for name in [*backups, "logs.json"]:  # backups sort oldest first by their timestamps
        lines += (tmp_path / name).read_bytes().splitlines()
    assert [otlpjson.decode(Signal.LOGS, line) for line in lines] == [b.requests[0] for b in batches]
    assert sent(telemetry, Signal.LOGS) == 60 * 250


async def test_rotation_removes_backups_beyond_max_backups(tmp_path):
    path = tmp_path / "logs.json"
    (tmp_path / "logs-2001-01-01T00-00-00.000.json").write_bytes(b"old\n")  # an older backup from a previous run
    (tmp_path / "unrelated-2001-01-01T00-00-00.000.json").write_bytes(b"keep\n")
    batches = [Batch.of(Signal.LOGS, logs_request(250, f"{k}-")) for k in range(80)]
    await run_exporter(FileConfig(path=str(path), rotation=RotationConfig(max_megabytes=1, max_backups=1)), batches)
    names = sorted(p.name for p in tmp_path.iterdir())
    backups = [n for n in names if n.startswith("logs-")]
    assert len(backups) == 1 and backups[0] != "logs-2001-01-01T00-00-00.000.json"
    assert "unrelated-2001-01-01T00-00-00.000.json" in names


async def test_rotation_removes_backups_older_than_max_days(tmp_path):
    path = tmp_path / "logs.json"
    (tmp_path / "logs-2001-01-01T00-00-00.000.json").write_bytes(b"old\n")
    recent = tmp_path / "logs-2999-01-01T00-00-00.000.json"
    recent.write_bytes(b"new\n")
    await run_exporter(FileConfig(path=str(path), rotation=RotationConfig(max_days=7, max_backups=0)), [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs-2999-01-01T00-00-00.000.json", "logs.json"]


async def test_flushes_at_the_interval_while_running(tmp_path):
    path = tmp_path / "out.jsonl"
    telemetry = Telemetry()
    send, receive = trio.open_memory_channel[Batch](4)
    exporter = factory.create(make_settings(telemetry), FileConfig(path=str(path), flush_interval=Duration(0.05)), Ports(input=receive))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            await send.send(Batch.of(Signal.LOGS, logs_request(2)))
            while sent(telemetry, Signal.LOGS) < 2:  # written by the periodic flush, input still open
                await trio.sleep(0.01)
            assert otlpjson.decode(Signal.LOGS, path.read_bytes().rstrip(b"\n")) == logs_request(2)
            await send.aclose()


async def test_buffered_records_are_written_on_shutdown(tmp_path):
    path = tmp_path / "out.jsonl"
    telemetry = Telemetry()
    send, receive = trio.open_memory_channel[Batch](4)
    exporter = factory.create(make_settings(telemetry), FileConfig(path=str(path), flush_interval=Duration(3600)), Ports(input=receive))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            await send.send(Batch.of(Signal.LOGS, logs_request(2)))
            while not exporter.writer.pending:  # the batch reached the write buffer
                await trio.sleep(0.01)
            assert path.read_bytes() == b"" and sent(telemetry, Signal.LOGS) == 0
            nursery.cancel_scope.cancel()  # shutdown by cancellation, input never closed
    assert otlpjson.decode(Signal.LOGS, path.read_bytes().rstrip(b"\n")) == logs_request(2)
    assert sent(telemetry, Signal.LOGS) == 2


async def test_write_errors_are_counted_logged_once_and_survived(caplog):
    if not os.path.exists("/dev/full"):
        prereq.missing("/dev/full (it simulates a full disk)", "run the tests where /dev is the usual devtmpfs, e.g. not in a minimal chroot")
    batches = all_signal_batches()
    done = []
    for b in batches:
        b.on_done.append(done.append)
    with caplog.at_level(logging.ERROR, logger="tapio.test.file"):
        telemetry = await run_exporter(
            FileConfig(path="/dev/full", flush_interval=Duration(0), rotation=RotationConfig(max_megabytes=0)), batches
        )
    assert sent(telemetry, Signal.LOGS, "send_failed") == 6
    assert sent(telemetry, Signal.TRACES, "send_failed") == 2
    assert sent(telemetry, Signal.METRICS, "send_failed") == 5
    assert sent(telemetry, Signal.LOGS) == 0
    assert done == [False] * len(batches)
    enospc = [r for r in caplog.records if "ENOSPC" in r.getMessage()]
    assert len(enospc) == 1


async def test_start_fails_clearly_when_the_file_cannot_be_opened(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    send, receive = trio.open_memory_channel[Batch](1)
    exporter = factory.create(make_settings(Telemetry()), FileConfig(path=str(blocker / "out.json")), Ports(input=receive))
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match=r"file exporter cannot create the directory .*a-file'")):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
    (tmp_path / "a-dir").mkdir()  # cannot be opened for writing, even by root
    exporter = factory.create(make_settings(Telemetry()), FileConfig(path=str(tmp_path / "a-dir")), Ports(input=receive))
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match=r"file exporter cannot open .*a-dir' for writing: Is a directory")):
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)


async def test_cancelled_before_started_exits_cleanly(tmp_path):
    send, receive = trio.open_memory_channel[Batch](1)
    exporter = factory.create(make_settings(Telemetry()), FileConfig(path=str(tmp_path / "x.json")), Ports(input=receive))
    with trio.CancelScope() as scope:
        scope.cancel()
        await exporter.run()
    assert scope.cancelled_caught


def test_config_validation(tmp_path):
    assert config_problems(FileConfig()) == ["path: required: the file to write, e.g. /var/lib/tapio/traces.jsonl"]
    assert config_problems(FileConfig(path=str(tmp_path / "ok.json"))) == []
    problems = config_problems(
        FileConfig(
            path=str(tmp_path),
            format="xml",  # type: ignore[arg-type]
            compression="zstd",  # type: ignore[arg-type]
            rotation=RotationConfig(max_megabytes=-1, max_days=-2, max_backups=-3),
        )
    )
    assert problems == [
        f"path: {str(tmp_path)!r} is a directory; name a file in it",
        "format: must be json or proto, got 'xml'",
        "compression: must be empty or gzip, got 'zstd'",
        "rotation.max_megabytes: must be 0 or more, got -1",
        "rotation.max_days: must be 0 or more, got -2",
        "rotation.max_backups: must be 0 or more, got -3",
    ]


def test_validation_checks_the_path_can_be_opened_without_creating_anything(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    deep = tmp_path / "new" / "sub" / "out.json"
    assert config_problems(FileConfig(path=str(deep))) == []  # missing directories are created at start...
    assert not (tmp_path / "new").exists()  # ...not by validation
    assert config_problems(FileConfig(path=str(blocker))) == []  # an existing writable file is appended to
    assert config_problems(FileConfig(path=str(blocker / "sub" / "out.json"))) == [
        f"path: cannot create the directory {str(blocker / 'sub')!r}: {str(blocker)!r} is not a directory"
    ]


def _problems_as_unprivileged_user(config: FileConfig) -> list[str]:
    """``config_problems(config)`` as an ordinary user sees it (as root, permission bits never deny)."""
    if os.geteuid() != 0:
        return config_problems(config)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops root, validates and reports through the pipe
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, "\n".join(config_problems(config)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out.splitlines()


def test_validation_reports_a_directory_that_is_not_writable():
    import tempfile

    locked = tempfile.mkdtemp(prefix="tapio-locked-")  # in /tmp, which everybody may search
    try:
        existing = os.path.join(locked, "existing.json")
        with open(existing, "w"):
            pass
        os.chmod(existing, 0o444)
        os.chmod(locked, 0o555)
        assert _problems_as_unprivileged_user(FileConfig(path=os.path.join(locked, "out.json"))) == [
            f"path: cannot create the file in {locked!r}: the directory is not writable by this user"
        ]
        assert _problems_as_unprivileged_user(FileConfig(path=os.path.join(locked, "sub", "out.json"))) == [
            f"path: cannot create the directory {os.path.join(locked, 'sub')!r}: {locked!r} is not writable by this user"
        ]
        assert _problems_as_unprivileged_user(FileConfig(path=existing)) == [f"path: {existing!r} exists and is not writable by this user"]
    finally:
        os.chmod(locked, 0o755)
        for name in os.listdir(locked):
            os.remove(os.path.join(locked, name))
        os.rmdir(locked)


def test_factory():
    assert factory.type == "file" and factory.kind is Kind.EXPORTER
    assert factory.signals == frozenset(Signal)
    assert factory.summary(FileConfig(path="/tmp/x.json.gz", compression="gzip")) == "/tmp/x.json.gz (json, gzip)"


async def test_records_written_at_shutdown_are_finished_even_when_fsync_fails():
    # fsync of /dev/null fails (EINVAL) after the buffered records were written to it
    if not os.path.exists("/dev/null"):
        prereq.missing("/dev/null (a file whose fsync fails)", "run the tests where /dev is the usual devtmpfs, e.g. not in a minimal chroot")
    batches = all_signal_batches()
    done = []
    for b in batches:
        b.on_done.append(done.append)
    telemetry = await run_exporter(FileConfig(path="/dev/null", flush_interval=Duration(3600)), batches)
    assert done == [True] * len(batches)
    assert sent(telemetry, Signal.LOGS) == 6
    assert sent(telemetry, Signal.TRACES) == 2
    assert sent(telemetry, Signal.METRICS) == 5


async def test_a_record_cut_off_by_a_killed_process_does_not_swallow_the_next(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"resourceLogs":[]}\n{"resourceLogs":[{"reso')  # SIGKILL in the middle of a write
    await run_exporter(FileConfig(path=str(path)), [Batch.of(Signal.LOGS, logs_request(2))])
    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == [b'{"resourceLogs":[]}', b'{"resourceLogs":[{"reso']
    assert otlpjson.decode(Signal.LOGS, lines[2]) == logs_request(2)
    assert lines[3:] == [b""]
