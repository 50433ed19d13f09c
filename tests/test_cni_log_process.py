"""cni-log in a real ``tapio run``: SIGKILL mid-tail then restart, a failing exporter, the start banner.

Everything is real: the tapio process, the files a writer thread appends to,
the storage file, the file exporter's output, and for the failing exporter
the otlphttp exporter against the reference OTLP backend (tapio.testing.otlpsink)
answering 503 until it is told to accept.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from pathlib import Path

import trio

from tapio import otlpjson
from tapio.pdata import Signal
from tapio.receivers.cni_log import _records
from tapio.testing import prereq
from tapio.testing.otlpsink import OK, Reply, open_otlp_sink
from tapio.testing.process import PacedWriter, TapioProcess, free_port, metric_sum, sigkill_mid_stream_then_restart

SEQ = re.compile(r'Pod="pod-(\d+)"')
BATCH_MAX = 200


def calico_line(seq: int) -> str:
    return (
        f"2024-05-14 09:12:01.{seq % 1000:03d} [INFO][{1000 + seq}] k8s.go 73: Extracted identifiers for CmdAddK8s "
        f'ContainerID="{seq:064x}" Namespace="ns" Pod="pod-{seq}" WorkloadEndpoint="node-k8s-pod--{seq}-eth0"'
    )


#: the receiver reads at most this far past its saved offset, and no BATCH_MAX + 1 lines fit in it (the first is the
#: shortest): so a crash repeats at most one batch, however slow the checkpoint writes are (a starved node)
MAX_UNSAVED = BATCH_MAX * (len(calico_line(0)) + 1)


def config(tmp_path: Path, metrics: int, exporter: str, exporter_name: str) -> Path:
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  cni-log:
    include: ["{tmp_path}/logs/*.log"]
    start_at: beginning
    storage: storage
    max_unsaved: {MAX_UNSAVED}
processors:
  batch: {{send_batch_size: {BATCH_MAX}, send_batch_max_size: {BATCH_MAX}, timeout: 10ms}}
exporters:
{exporter}
extensions:
  storage: {{path: "{tmp_path}/state/tapio.db", synchronous: normal}}
service:
  extensions: [storage]
  pipelines:
    logs: {{receivers: [cni-log], processors: [batch], exporters: [{exporter_name}]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    return cfg


def output_seqs(path: Path) -> list[int]:
    if not path.exists():
        return []
    out = []
    # read beside the writing tapio: a last line without its newline is still being written
    lines = path.read_text().split("\n")[:-1]
    broken = 0
    for line in lines:
        try:
            request = otlpjson.decode(Signal.LOGS, line.encode())
        except otlpjson.OtlpJsonError:
            # the line the SIGKILL cut short (the restarted exporter ends it): its records were not reported delivered
            broken += 1
            assert broken == 1, "more than one broken line in the output"
            continue
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    m = SEQ.search(lr.body.string_value)
                    if m:
                        out.append(int(m.group(1)))
    return out


def saved_offsets(db: Path) -> list[int]:
    """The offsets tapio saved, read beside the running tapio (SQLite's WAL lets a reader in)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT value FROM checkpoints WHERE namespace = 'receiver/cni-log'").fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        conn.close()
    return sorted(json.loads(v)["offset"] for (v,) in rows)


def writer(path: Path, total: int, per_second: int) -> PacedWriter:
    """Appends numbered Calico lines to a log at a steady pace, as a CNI plugin would."""
    f = open(path, "a")

    def write(i: int) -> None:
        f.write(calico_line(i) + "\n")
        f.flush()
        if i == total - 1:
            f.close()

    return PacedWriter(write, total, per_second)


def test_sigkill_while_tailing_then_restart_loses_no_line_and_repeats_at_most_one_batch(tmp_path):
    (tmp_path / "logs").mkdir()
    out = tmp_path / "out.jsonl"
    metrics = free_port()
    cfg = config(tmp_path, metrics, f'  file: {{path: "{out}", flush_interval: 0}}', "file")
    total = 12000
    # 6 s of writing, the kill after a sixth: a starved tapio (load 15 on 2 cores) still kills mid-stream
    w = writer(tmp_path / "logs" / "cni.log", total, 2000)
    seen = sigkill_mid_stream_then_restart([cfg], metrics, w, lambda: output_seqs(out), kill_after=2000, settle=0.5)
    got = seen.got
    assert metric_sum(seen.metrics, "tapio_tail_records_total") == len(got) - len(seen.before)
    assert sorted(set(got)) == list(range(total))
    duplicates = len(got) - total
    assert 0 <= duplicates <= BATCH_MAX, f"{duplicates} lines exported twice"
    # each run exported in order; the restart repeated only lines just before the kill
    repeated = sorted(s for s in set(got) if got.count(s) > 1)
    assert not repeated or repeated[-1] - repeated[0] < BATCH_MAX


async def test_a_failing_exporter_holds_the_offset_and_recovery_delivers_everything(tmp_path):
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "cni.log"
    db = tmp_path / "state" / "tapio.db"
    metrics = free_port()
    async with open_otlp_sink(grpc_server=False) as sink:
        sink.default = Reply(http_status=503, message="backend down")
        exporter = (
            f'  otlphttp: {{endpoint: "{sink.http_url()}", retry_on_failure: '
            "{initial_interval: 100ms, max_interval: 200ms, max_elapsed_time: 500ms}}"
        )
        cfg = config(tmp_path, metrics, exporter, "otlphttp")
        log.write_text("".join(calico_line(i) + "\n" for i in range(500)))
        with TapioProcess([cfg], metrics_port=metrics) as t:
            async def wait(predicate, timeout: float, what: str) -> None:
                with trio.fail_after(timeout):
                    while not predicate():
                        assert t.proc.poll() is None, f"tapio exited while waiting for {what}:\n{t.stderr}"
                        await trio.sleep(0.05)

            await wait(lambda: len(sink.attempts) >= 1, 30, "a first export attempt")
            # the exporter gives up on batches and the receiver reads them again: the offset stays put
            await wait(lambda: "reading again from offset 0" in t.stderr, 30, "a replay")
            await trio.sleep(1.0)
            assert saved_offsets(db) in ([], [0])
            assert sink.items() == 0
            sink.default = OK
            await wait(lambda: saved_offsets(db) == [log.stat().st_size], 30, "the offset to reach the end")
            got = [int(SEQ.search(lr.body.string_value).group(1))
                   for r in sink.requests() for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]
            assert set(got) == set(range(500))


def test_start_banner_says_what_it_watches(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "cni.log").write_text(calico_line(1) + "\n")
    metrics = free_port()
    cfg = config(tmp_path, metrics, f'  file: {{path: "{tmp_path}/out.jsonl"}}', "file")
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        t.wait_for(lambda: "receiver  cni-log" in t.stderr, 10, "the start banner")
        line = next(l for l in t.stderr.splitlines() if "receiver  cni-log" in l)
        assert f"tailing 1 files ({tmp_path}/logs/cni.log)" in line and "inotify" in line
        if _records.COMPILED is None:
            prereq.missing("the cni-log receiver's compiled line parser", _records.COMPILED_HOW)
        assert "lines parsed and written by the compiled helper" in line, line
        t.signal(signal.SIGTERM)
        assert t.wait_exit(20) == 0


def test_start_banner_says_when_lines_are_parsed_in_python(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "cni.log").write_text(calico_line(1) + "\n")
    metrics = free_port()
    cfg = config(tmp_path, metrics, f'  file: {{path: "{tmp_path}/out.jsonl"}}', "file")
    with TapioProcess([cfg], metrics_port=metrics, env={_records.PYTHON_ONLY_ENV: "1"}) as t:
        t.wait_ready()
        t.wait_for(lambda: "receiver  cni-log" in t.stderr, 10, "the start banner")
        line = next(l for l in t.stderr.splitlines() if "receiver  cni-log" in l)
        assert f"lines parsed in Python: {_records.PYTHON_ONLY_ENV} is set" in line, line
        t.signal(signal.SIGTERM)
        assert t.wait_exit(20) == 0
