"""cni-log: CNI log lines tailed, parsed and exported to a file, against a bare Python loop over the same file, in one run.

Writes a log of N lines in the styles of tests/data/cni/ (Calico, Cilium,
Multus, AWS VPC CNI, Azure, key=value; every cycle of the templates gets
new container ids, pods and times), then:

- the bare loop: this process reads the file in 1 MiB chunks, splits it into
  lines, decodes them and splits each with one regex (``re.split(r"\\s+")``);
- tapio: ``tapio run`` as a subprocess with the cni-log receiver, the batch
  processor and the file exporter. Once tapio is ready (its startup CPU is
  subtracted) the log is renamed into the watched directory; the run ends
  when the exporter counted every line.

Both figures are lines per CPU second (user + system; for tapio, its
process's from /proc, so the worker threads count). The goal is a ratio
of at least 0.4.

Also, in this process over the same corpus: µs of CPU per line of the
receiver's `RecordWriter.write` (parse and encode) with its compiled helper
and with Python alone, overall and by style (batches of 1000 lines).
``--python`` runs tapio with the Python path forced (TAPIO_CNI_LOG_PYTHON);
``tapio_path`` in the output says which path tapio ran.

With ``--storage`` the receiver saves its offsets in a storage extension
(what a node agent that resumes after a restart does), so the checkpoint
writes and the reading that waits for them (``max_unsaved``) are in the
figure. Prints one JSON line.

Usage: bench_cni_log.py [--lines N] [--format json|proto] [--storage] [--python]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapio.receivers.cni_log import _records  # noqa: E402
from tapio.receivers.cni_log._parser import LineParser  # noqa: E402
from tapio.testing.process import free_port, metric_sum, parse_metrics, tapio_command  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
FIXTURES = ROOT / "tests" / "data" / "cni"
HEX_ID = re.compile(r"\b[0-9a-f]{64}\b")
POD = re.compile(r"\b(checkout|ledger|upf|frontend|api)-([0-9a-z]+)")


def make_log(path: Path, lines: int) -> int:
    templates = [line for f in sorted(FIXTURES.glob("*.log")) for line in f.read_text().splitlines()]
    with open(path, "w") as out:
        n = cycle = 0
        while n < lines:
            cid = f"{cycle * 7919:064x}"
            for t in templates:
                if n >= lines:
                    break
                line = HEX_ID.sub(cid, t)
                line = POD.sub(lambda m: f"{m.group(1)}-{cycle % 5000}", line)
                out.write(line + "\n")
                n += 1
            cycle += 1
    return path.stat().st_size


def bare_loop(path: Path) -> tuple[int, float]:
    """Lines split per CPU second by the plainest loop: read, split lines, decode, regex-split."""
    split = re.compile(r"\s+").split
    start = time.process_time()
    n = 0
    with open(path, "rb") as f:
        held = b""
        while chunk := f.read(1 << 20):
            parts = (held + chunk).split(b"\n")
            held = parts.pop()
            for raw in parts:
                split(raw.decode("utf-8", "replace"))
                n += 1
    return n, time.process_time() - start


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def in_process(path: Path) -> dict:
    """µs of CPU per line of RecordWriter.write over the corpus, compiled helper vs Python, overall and by style.

    Each batch of 1000 lines is decoded just before it is written, as the tailer hands lines over
    (lines all decoded up front and spread over 60 MB make each write ~40% slower from cache misses
    alone); only the writes are timed.
    """
    raw = path.read_bytes().split(b"\n")[:-1]
    parser = LineParser()
    by_style: dict[str, list[bytes]] = {}
    for line in raw:
        by_style.setdefault(parser.parse(line.decode()).style, []).append(line)

    def per_line(writer: _records.RecordWriter, subject: list[bytes]) -> float:
        blocks = [b"\n".join(subject[i : i + 1000]) for i in range(0, len(subject), 1000)]
        spent = 0.0
        for block in blocks:
            lines = block.decode().split("\n")
            start = time.process_time()
            writer.write("/var/log/cni.log", lines, 1_700_000_000_000_000_000)
            spent += time.process_time() - start
        return spent / len(subject) * 1e6

    result: dict = {}
    for name, compiled in (("compiled", True), ("python", False)):
        writer = _records.RecordWriter(parser, [("host.name", "bench")], compiled=compiled)
        if compiled and not writer.compiled:
            result[name] = None
            continue
        result[name] = round(per_line(writer, raw), 3)
        result[f"{name}_by_style"] = {style: round(per_line(writer, group), 3) for style, group in sorted(by_style.items())}
    result["style_share"] = {style: round(len(group) / len(raw), 3) for style, group in sorted(by_style.items())}
    if result["compiled"] is None:
        result["compiled_missing"] = _records.COMPILED_MISSING
    return result


def run_tapio(log: Path, lines: int, fmt: str, work: Path, storage: bool = False, python_only: bool = False) -> tuple[float, float, str]:
    watched = work / "logs"
    watched.mkdir()
    metrics = free_port()
    cfg = work / "pipelines.yaml"
    extensions = f"""
extensions:
  storage: {{path: "{work}/state/tapio.db"}}""" if storage else ""
    cfg.write_text(f"""
receivers:
  cni-log: {{include: ["{watched}/*.log"]{", storage: storage" if storage else ""}}}{extensions}
processors:
  batch: {{send_batch_size: 8192, timeout: 200ms}}
exporters:
  file: {{path: "{work}/out.{fmt}", format: {fmt}, rotation: {{max_megabytes: 0}}}}
service:
  extensions: [{"storage" if storage else ""}]
  pipelines:
    logs: {{receivers: [cni-log], processors: [batch], exporters: [file]}}
  telemetry:
    logs: {{level: warn}}
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    env = {**os.environ, _records.PYTHON_ONLY_ENV: "1" if python_only else "0"}
    proc = subprocess.Popen([*tapio_command(), "run", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{metrics}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tapio did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        time.sleep(0.5)
        # which path tapio runs, from its start banner (the summary of the cni-log receiver's line)
        os.set_blocking(proc.stderr.fileno(), False)
        try:
            banner = proc.stderr.read() or b""
        except BlockingIOError:
            banner = b""
        os.set_blocking(proc.stderr.fileno(), True)
        line = next((l for l in banner.decode(errors="replace").splitlines() if "receiver  cni-log" in l), "")
        path = "compiled" if "compiled helper" in line else "python" if "parsed in Python" in line else f"unknown ({line!r})"
        cpu0 = cpu_seconds(proc.pid)
        wall0 = time.monotonic()
        os.rename(log, watched / "cni.log")  # a new file: read from its beginning
        while True:
            m = parse_metrics(httpx.get(url + "/metrics", timeout=5).text)
            if metric_sum(m, "tapio_exporter_sent_log_records_total") >= lines:
                break
            if time.monotonic() - wall0 > 600:
                raise SystemExit(f"tapio exported {metric_sum(m, 'tapio_exporter_sent_log_records_total')} of {lines} lines")
            time.sleep(0.25)
        # a scrape costs tapio ~1 ms of CPU: polled every 0.25 s, the bench's own polling stays out of the figure
        return cpu_seconds(proc.pid) - cpu0, time.monotonic() - wall0, path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--format", choices=("json", "proto"), default="json")
    parser.add_argument("--storage", action="store_true", help="save the receiver's offsets in a storage extension")
    parser.add_argument("--python", action="store_true", help="run tapio with the cni-log compiled helper turned off")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cni-log-") as tmp:
        work = Path(tmp)
        log = work / "cni.log"
        size = make_log(log, args.lines)
        bare_lines, bare_cpu = bare_loop(log)
        assert bare_lines == args.lines
        writer = in_process(log)
        tapio_cpu, tapio_wall, tapio_path = run_tapio(log, args.lines, args.format, work, args.storage, args.python)
    bare_rate = bare_lines / bare_cpu
    tapio_rate = args.lines / tapio_cpu
    print(json.dumps({
        "bench": "cni_log",
        "lines": args.lines,
        "bytes": size,
        "export_format": args.format,
        "storage": args.storage,
        "tapio_path": tapio_path,
        "tapio_lines_per_cpu_second": round(tapio_rate),
        "tapio_cpu_seconds": round(tapio_cpu, 3),
        "tapio_wall_seconds": round(tapio_wall, 3),
        "bare_loop_lines_per_cpu_second": round(bare_rate),
        "ratio_vs_bare_loop": round(tapio_rate / bare_rate, 3),
        "goal_ratio": 0.4,
        "write_us_per_line": writer,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
