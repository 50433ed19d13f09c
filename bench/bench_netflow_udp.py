"""UDP receive end to end: ``tapio run``'s netflow receiver vs pmacct's nfacctd, on the same paced blast, in one run.

Run: ``.venv/bin/python bench/bench_netflow_udp.py [--seconds S] [--rates R,R,...]``.

Both collectors listen on 127.0.0.1 with an 8 MiB socket receive buffer and
receive IPFIX messages of 30 flows each (softflowd's IPv4 template, sent
once per pass), paced by this process at each rate in turn (flows/s) for
``--seconds``. For each rate and collector:

- ``lost``: the datagrams the kernel dropped on the collector's socket
  (``drops`` in /proc/net/udp) plus, in flows, what the collector did not
  count (tapio: ``tapio_netflow_flows_total``; nfacctd: the packets of its
  print plugin's JSON output against the packets sent);
- ``cpu_us_per_flow``: the CPU time (user + system, from /proc, children
  included) the collector's processes used for the step, per flow sent.

Collectors:

- ``nfacctd``: pmacct 1.7.7, the core process and its print plugin
  aggregating by exporter and protocol (what tapio's traffic totals are)
  and writing them as JSON every second: the C peer;
- ``tapio_decode``: a metrics pipeline only, so the receiver decodes and
  keeps traffic totals and builds no log records (into the ``debug``
  exporter, which prints nothing here);
- ``tapio_records``: a logs pipeline, so every flow also becomes an OTLP log
  record with all built-in attributes, parsed once into a batch and handed
  to the ``debug`` exporter.

Prints one JSON line: every step, then for each collector the highest rate
it took without loss (``max_lossless_flows_per_s``) and, for tapio's two,
the CPU per flow of it and of nfacctd at the highest rate both took without
loss, with ``ratio`` = tapio's / nfacctd's (goal for ``tapio_decode``: at
most 2). CPU times have the kernel's 10 ms tick: the higher rates, with
more CPU per step, give the steadier figures.
The sender shares the machine's cores with the collectors, so the highest
rates are bounded by the machine as much as by the collector.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapio.testing.netflow import SOFTFLOWD_V4_TEMPLATE, blast  # noqa: E402
from tapio.testing.process import TapioProcess, free_port, metric_sum  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
RECORDS = 30
DATAGRAMS = 20000  # one pass of distinct datagrams; a step sends as many passes as it needs
BUFFER = 8 << 20  # bytes of socket receive buffer, both collectors
BURST = 8  # datagrams sent between two looks at the clock
SETTLE_TIMEOUT = 30.0


def packets_of(datagrams: list[bytes]) -> list[int]:
    """The packetDeltaCount total of each datagram (softflowd's template: bytes 20..24 of each record)."""
    size = sum(length for _, length in SOFTFLOWD_V4_TEMPLATE)
    out = []
    for d in datagrams:
        body = d[-RECORDS * size :]
        out.append(sum(int.from_bytes(body[i * size + 20 : i * size + 24], "big") for i in range(RECORDS)))
    return out


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system, and of reaped children) of every process in a process group."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def udp_socket(port: int) -> tuple[int, int]:
    """(bytes waiting in the receive queue, datagrams dropped) of the socket bound to 127.0.0.1:``port``."""
    suffix = f":{port:04X}"
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1].endswith(suffix):
                return int(cols[4].split(":")[1], 16), int(cols[-1])
    raise RuntimeError(f"no UDP socket on port {port}")


def send_paced(port: int, datagrams: list[bytes], rate_flows: float, seconds: float) -> int:
    """Send datagrams at ``rate_flows`` flows/s for ``seconds``, cycling through the list; returns how many were sent."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", port)
    per_second = rate_flows / RECORDS
    total = int(per_second * seconds)
    n = len(datagrams)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        for _ in range(min(BURST, total - sent)):
            s.sendto(datagrams[sent % n], target)
            sent += 1
        ahead = sent / per_second - (time.perf_counter() - start)
        if ahead > 0:
            time.sleep(ahead)
    s.close()
    return sent


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Nfacctd:
    name = "nfacctd"

    def __init__(self, workdir: Path, packets: list[int]) -> None:
        self.dir = workdir / "nfacctd"
        self.dir.mkdir()
        self.port = free_port()
        self.packets = packets
        conf = self.dir / "nfacctd.conf"
        conf.write_text(
            "daemonize: false\n"
            "nfacctd_ip: 127.0.0.1\n"
            f"nfacctd_port: {self.port}\n"
            f"nfacctd_pipe_size: {BUFFER // 2}\n"  # the kernel doubles it, as for tapio's receive_buffer_size
            "plugins: print[p]\n"
            "aggregate[p]: peer_src_ip, proto\n"  # totals by exporter and protocol, as tapio keeps them

            "print_output[p]: json\n"
            f"print_output_file[p]: {self.dir}/out-%s.json\n"
            "print_refresh_time[p]: 1\n"
        )
        self.log = open(self.dir / "log.txt", "wb")
        self.proc = subprocess.Popen([shutil.which("nfacctd") or "/usr/sbin/nfacctd", "-f", str(conf)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._bound(), "nfacctd to bind its port")

    def _bound(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"nfacctd exited with {self.proc.returncode}: {(self.dir / 'log.txt').read_text()[-800:]}")
        try:
            udp_socket(self.port)
            return True
        except RuntimeError:
            return False

    def cpu(self) -> float:
        return group_cpu(self.proc.pid)

    def begin(self) -> None:
        for f in self.dir.glob("out-*.json"):
            f.unlink()

    def _output_packets(self) -> int:
        total = 0
        for f in self.dir.glob("out-*.json"):
            for line in f.read_text().splitlines():
                try:
                    total += json.loads(line).get("packets", 0)
                except ValueError:
                    pass  # a file the plugin is still writing
        return total

    def settle(self, sent: int) -> int:
        """Waits until the output stops growing; returns the flows not accounted for."""
        want = sum(self.packets[i % len(self.packets)] for i in range(sent))
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            got = self._output_packets()
            if got >= want:
                break
            if got != last:
                last, stable_since = got, time.monotonic()
            elif time.monotonic() - stable_since > 3.0:  # three purges without news: the rest is lost
                break
            time.sleep(0.2)
        got = self._output_packets()
        # lost packets → flows, at the blast's mean packets per flow
        mean = want / (sent * RECORDS)
        return max(0, round((want - got) / mean))

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


class Tapio:
    def __init__(self, workdir: Path, name: str, signal_name: str) -> None:
        self.name = name
        self.port = free_port()
        metrics_port = free_port()
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(f"""
receivers:
  netflow:
    protocols:
      ipfix: {{endpoint: "127.0.0.1:{self.port}"}}
    receive_buffer_size: {BUFFER}
exporters:
  debug: {{sampling_initial: 0, sampling_thereafter: 0}}
service:
  pipelines:
    {signal_name}: {{receivers: [netflow], exporters: [debug]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics_port}"}}
""")
        self.tapio = TapioProcess([cfg], metrics_port=metrics_port).__enter__()
        self.tapio.wait_ready()
        self.counted = 0

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.tapio.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / CLK_TCK

    def begin(self) -> None:
        self.counted = self._flows()

    def _flows(self) -> int:
        return int(metric_sum(self.tapio.metrics(), "tapio_netflow_flows_total"))

    def settle(self, sent: int) -> int:
        want = sent * RECORDS
        wait_until(lambda: udp_socket(self.port)[0] == 0, "tapio to drain its socket")
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            got = self._flows() - self.counted
            if got >= want:
                break
            if got != last:
                last, stable_since = got, time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                break
            time.sleep(0.1)
        return max(0, want - (self._flows() - self.counted))

    def close(self) -> None:
        self.tapio.signal()
        try:
            self.tapio.wait_exit(timeout=15)
        finally:
            self.tapio.__exit__(None, None, None)


def step(collector, datagrams: list[bytes], rate: float, seconds: float) -> dict:
    collector.begin()
    _, drops0 = udp_socket(collector.port)
    cpu0 = collector.cpu()
    sent = send_paced(collector.port, datagrams, rate, seconds)
    missing = collector.settle(sent)
    cpu1 = collector.cpu()
    _, drops1 = udp_socket(collector.port)
    flows = sent * RECORDS
    kernel = (drops1 - drops0) * RECORDS
    return {
        "rate": int(rate),
        "flows": flows,
        "lost": max(missing, kernel),
        "kernel_dropped": kernel,
        "cpu_us_per_flow": round((cpu1 - cpu0) / flows * 1e6, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each step")
    ap.add_argument("--rates", default="100000,200000,400000,800000", help="flows/s of the steps, comma-separated")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    datagrams = blast(10, DATAGRAMS, records=RECORDS)
    packets = packets_of(datagrams)
    workdir = Path(tempfile.mkdtemp(prefix="nfbench"))
    out: dict = {"bench": "netflow_udp", "records_per_datagram": RECORDS, "seconds_per_step": args.seconds, "steps": {}}
    try:
        makers = [
            lambda: Nfacctd(workdir, packets),
            lambda: Tapio(workdir, "tapio_decode", "metrics"),
            lambda: Tapio(workdir, "tapio_records", "logs"),
        ]
        for make in makers:
            collector = make()
            try:
                send_paced(collector.port, datagrams[:200], 50_000, 0.12)  # the template, and warm-up
                collector.settle(int(50_000 / RECORDS * 0.12))
                out["steps"][collector.name] = [step(collector, datagrams, rate, args.seconds) for rate in rates]
            finally:
                collector.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    steps = out["steps"]
    lossless = {name: {s["rate"]: s["cpu_us_per_flow"] for s in runs if s["lost"] == 0} for name, runs in steps.items()}
    peer = lossless["nfacctd"]
    out["summary"] = {"nfacctd": {"max_lossless_flows_per_s": max(peer, default=0)}}
    for name in ("tapio_decode", "tapio_records"):
        mine = lossless[name]
        common = [r for r in mine if r in peer]
        at = max(common, default=None)  # the highest rate both took without loss
        out["summary"][name] = {
            "max_lossless_flows_per_s": max(mine, default=0),
            "compared_at_flows_per_s": at,
            "cpu_us_per_flow": mine.get(at),
            "nfacctd_cpu_us_per_flow": peer.get(at),
            "ratio": round(mine[at] / peer[at], 2) if at is not None and peer[at] else None,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
