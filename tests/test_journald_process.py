"""journald in a real ``tapio run``: SIGKILL mid-stream then restart, and an exporter that cannot deliver.

Everything is real: the tapio process, a journald namespace instance a
writer thread sends entries to, the storage file, the file exporter's
output, and for the failing exporter the otlphttp exporter against the
reference OTLP backend (tapio.testing.otlpsink) answering 503 until it is
told to accept.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from tapio import otlpjson
from tapio.pdata import Signal
from tapio.testing.journald import Journald
from tapio.testing.otlpsink import OK, Reply, open_otlp_sink
from tapio.testing.process import PacedWriter, TapioProcess, free_port, metric_sum, sigkill_mid_stream_then_restart

from .test_journald_receiver import _require

BATCH_MAX = 200


@pytest.fixture
def journal():
    _require()
    with Journald() as j:
        yield j


def config(tmp_path: Path, journal: Journald, metrics: int, exporter: str, exporter_name: str) -> Path:
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  journald:
    namespace: {journal.name}
    matches: [{{TEST: proc}}]
    start_at: beginning
    storage: storage
    retry_on_failure: {{initial_interval: 100ms, max_interval: 200ms, max_elapsed_time: 0s}}
processors:
  batch: {{send_batch_size: {BATCH_MAX}, send_batch_max_size: {BATCH_MAX}, timeout: 50ms}}
exporters:
{exporter}
extensions:
  storage: {{path: "{tmp_path}/state/tapio.db", synchronous: normal}}
service:
  extensions: [storage]
  pipelines:
    logs: {{receivers: [journald], processors: [batch], exporters: [{exporter_name}]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    return cfg


def seq_of(record) -> int | None:
    for kv in record.attributes:
        if kv.key == "journald.SEQ":
            return int(kv.value.string_value)
    return None


def output_seqs(path: Path) -> list[int]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line.endswith(b"}"):
            continue  # a line tapio is still writing
        request = otlpjson.decode(Signal.LOGS, line)
        out += [s for rl in request.resource_logs for sl in rl.scope_logs for lr in sl.log_records if (s := seq_of(lr)) is not None]
    return out


def saved_cursor(db: Path) -> str | None:
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT value FROM checkpoints WHERE namespace = 'receiver/journald'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return bytes(row[0]).decode() if row else None


def writer(journal: Journald, total: int, per_second: int) -> PacedWriter:
    """Sends numbered kubelet-like entries to the journal at a steady pace."""
    return PacedWriter(lambda i: journal.send(f"kubelet line {i}", TEST="proc", SEQ=i, SYSLOG_IDENTIFIER="kubelet"), total, per_second)


def test_sigkill_mid_stream_then_restart_loses_no_entry(tmp_path, journal):
    out = tmp_path / "out.jsonl"
    metrics = free_port()
    cfg = config(tmp_path, journal, metrics, f'  file: {{path: "{out}", flush_interval: 0}}', "file")
    total = 8000
    w = writer(journal, total, 4000)
    seen = sigkill_mid_stream_then_restart([cfg], metrics, w, lambda: output_seqs(out), kill_after=2000)
    got = seen.got
    assert metric_sum(seen.metrics, "tapio_journald_entries_read_total") >= len(got) - len(seen.before)
    assert sorted(set(got)) == list(range(total))
    duplicates = len(got) - total
    assert 0 <= duplicates <= 2 * BATCH_MAX, f"{duplicates} entries exported twice"


async def test_a_failing_exporter_holds_the_cursor_and_recovery_delivers_everything(tmp_path, journal):
    db = tmp_path / "state" / "tapio.db"
    metrics = free_port()
    for i in range(300):
        journal.send(f"kubelet line {i}", TEST="proc", SEQ=i)
    journal.sync()
    async with open_otlp_sink(grpc_server=False) as sink:
        sink.default = Reply(http_status=503, message="backend down")
        exporter = (
            f'  otlphttp: {{endpoint: "{sink.http_url()}", retry_on_failure: '
            "{initial_interval: 100ms, max_interval: 200ms, max_elapsed_time: 500ms}}"
        )
        cfg = config(tmp_path, journal, metrics, exporter, "otlphttp")
        with TapioProcess([cfg], metrics_port=metrics) as t:
            async def wait(predicate, timeout: float, what: str) -> None:
                with trio.fail_after(timeout):
                    while not predicate():
                        assert t.proc.poll() is None, f"tapio exited while waiting for {what}:\n{t.stderr}"
                        await trio.sleep(0.05)

            await wait(lambda: len(sink.attempts) >= 1, 30, "a first export attempt")
            await wait(lambda: metric_sum(t.metrics(), "tapio_journald_rereads_total") >= 2, 30, "entries read again")
            assert saved_cursor(db) is None  # start_at beginning: nothing delivered, nothing saved
            assert sink.items() == 0
            sink.default = OK
            await wait(lambda: saved_cursor(db) is not None, 30, "the cursor to be saved")
            await wait(lambda: {seq_of(lr) for r in sink.requests() for rl in r.resource_logs for sl in rl.scope_logs
                                for lr in sl.log_records} >= set(range(300)), 30, "every entry delivered")
            assert metric_sum(t.metrics(), "tapio_journald_entries_dropped_total") == 0
    last = journal.journalctl("-n", "1", "-o", "export", "TEST=proc")
    cursor = next(line.split("=", 1)[1] for line in last.splitlines() if line.startswith("__CURSOR="))
    assert saved_cursor(db) == cursor
