"""Benchmark of the dns-xdp receiver: the query rates it keeps up with, and its user-space CPU against a user-space peer.

Run as root: ``.venv/bin/python bench/bench_dns_xdp.py [--seconds N] [--rates 5000,20000,0]``.

The network is `tapio.testing.dnsnet`'s: a client namespace, a node that
routes, a server namespace running dnsmasq (answering ``*.example.test``
itself, no cache, ~90k queries/s here). dnsperf in the client namespace
offers each rate for ``--seconds`` (0: as fast as dnsmasq answers, 200
queries outstanding) over 1000 distinct names.

At each rate, two runs of the same traffic one after the other:

- *tapio*: the dns-xdp receiver, default config, XDP on the node's two
  interfaces (``v*``: queries enter one, responses the other), in this
  process, handing its batches to a consumer that counts them, wired for
  logs and metrics (``--spans``: traces too, a span per answered query). Its
  user-space CPU is this process's rusage over the run (dnsperf is a child
  and not counted; a full garbage collection just before the run, so that
  it pays only for its own); the kernel side (the XDP program, in softirq)
  is read from ``kernel.bpf_stats_enabled``, switched on for the tapio runs only.
- *peer*: what a user-space-only agent does: an AF_PACKET socket in the
  node's namespace (outgoing copies dropped by a classic BPF filter, so it
  reads each packet once, as XDP does), Ethernet/IP/UDP headers unpacked
  with struct, the DNS message decoded with dnspython, queries matched with
  responses in a dict. Its CPU is its own process's rusage.

"Kept up" is what each reported of the queries dnsperf completed; "lost"
is what the kernel could not hand over (tapio: ring buffer full; peer: the
socket's drop count); the counting consumer never refuses a batch.

CPU is given in ms per 1000 queries each side handled (``handled``: tapio
the events its user space read and turned into records, one per query;
the peer the frames it read and decoded, two per query), so that the two
compare like with like when one of them cannot keep up: a peer that drops
half the packets spends nothing on them, so dividing its CPU by every
completed query would halve its cost per query, and dividing by the pairs
it reported would overstate it (a pair needs both its frames kept). Per
1000 completed queries is given too (``cpu_ms_per_1k_completed``), and
``both_kept_up`` marks the rates where both reported at least 99% of them,
where the three measures agree. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.receivers.dns_xdp import factory
from tapio.receivers.dns_xdp._config import Config
from tapio.telemetry import Telemetry
from tapio.testing.dnsnet import SERVER4, DnsNet

NAMES = 1000
OUTSTANDING = 200
#: after dnsperf stops: time for the last responses to reach each side
SETTLE_SECONDS = 0.5

PEER = r"""
import ctypes, json, resource, socket, struct, sys, time
import dns.message
seconds = float(sys.argv[1])
ETH_P_ALL, SOL_SOCKET, SO_ATTACH_FILTER, SOL_PACKET, PACKET_STATISTICS = 3, 1, 26, 263, 6
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
# classic BPF: drop the copies of outgoing packets (skb->pkt_type == PACKET_OUTGOING), keep the rest whole
prog = struct.pack("HBBI" * 4, 0x30, 0, 0, 0xFFFFF004, 0x15, 0, 1, 4, 0x06, 0, 0, 0, 0x06, 0, 0, 0xFFFF)
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(buf))
s.setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, fprog)
s.settimeout(0.2)
print("ready", flush=True)
pending, pairs, bad, frames = {}, 0, 0, 0
latency_sum = 0
start = resource.getrusage(resource.RUSAGE_SELF)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    now = time.monotonic_ns()
    frames += 1
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        continue
    ihl = (frame[14] & 15) * 4
    u = 14 + ihl
    sport, dport = struct.unpack_from("!HH", frame, u)
    src, dst = frame[26:30], frame[30:34]
    try:
        m = dns.message.from_wire(frame[u + 8:])
    except Exception:
        bad += 1
        continue
    if m.flags & 0x8000:
        q = pending.pop((dst, dport, src, m.id), None)
        if q is not None:
            pairs += 1
            latency_sum += now - q[0]
    elif dport == 53:
        pending[(src, sport, dst, m.id)] = (now, m.question[0].name.to_text() if m.question else "")
end = resource.getrusage(resource.RUSAGE_SELF)
packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
print(json.dumps({"cpu_s": end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime, "pairs": pairs, "frames": frames, "drops": drops, "bad": bad}), flush=True)
"""


class CountingConsumer:
    def __init__(self, signals: frozenset[Signal]) -> None:
        self.signals = signals
        self.items = {s: 0 for s in Signal}

    async def send(self, batch: Batch) -> None:
        self.items[batch.signal] += batch.count

    def send_nowait(self, batch: Batch) -> None:
        self.items[batch.signal] += batch.count


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_dnsperf(out: str) -> dict:
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    return {
        "sent": int(num(r"Queries sent:\s+(\d+)")),
        "completed": int(num(r"Queries completed:\s+(\d+)")),
        "qps": round(num(r"Queries per second:\s+([\d.]+)")),
        "dnsperf_latency_ms": round(num(r"Average Latency \(s\):\s+([\d.]+)") * 1000, 3),
    }


async def dnsperf(net: DnsNet, names: Path, rate: int, seconds: float) -> dict:
    cmd = ["ip", "netns", "exec", net.client, "dnsperf", "-s", SERVER4, "-d", str(names), "-l", str(seconds), "-q", str(OUTSTANDING), "-t", "2"]
    if rate:
        cmd += ["-Q", str(rate)]
    res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True)
    return parse_dnsperf(res.stdout.decode())


def bpf_stats(on: bool) -> str:
    old = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1" if on else "0")
    return old


def prog_run_ns(prog_id: int) -> tuple[int, int]:
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "-j"], capture_output=True, text=True)
    info = json.loads(out.stdout or "{}")
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


async def tapio_run(net: DnsNet, names: Path, rate: int, seconds: float, signals: frozenset[Signal]) -> dict:
    from tapio.receivers.dns_xdp._bpfsys import prog_info
    from tapio.receivers.dns_xdp._loader import XDP_PROG

    telemetry = Telemetry()
    settings = Settings(id=ComponentID("dns-xdp"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "dns-xdp"), logger=logging.getLogger("bench"))
    sink = CountingConsumer(signals)
    receiver = factory.create(settings, Config(network_namespace=net.node_ns, interfaces=["v*"]), Ports(output=sink))
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        prog_id = prog_info(receiver.program.prog_fds[XDP_PROG])[0]
        old = bpf_stats(True)
        try:
            run0, cnt0 = prog_run_ns(prog_id)
            # a full collection now, so that the run does not pay for what ran before it in this
            # process (the warm-up, earlier rates, the receiver's start): the peer starts fresh too
            gc.collect()
            cpu0 = cpu_seconds()
            perf = await dnsperf(net, names, rate, seconds)
            await trio.sleep(SETTLE_SECONDS)
            receiver.drain()
            cpu = cpu_seconds() - cpu0
            run1, cnt1 = prog_run_ns(prog_id)
        finally:
            bpf_stats(old == "1")
        receiver._poll_counters()
        kernel = receiver.kernel_counters()
        nursery.cancel_scope.cancel()
    return {
        **perf,
        "reported": kernel["matched"],
        "handled": sink.items[Signal.LOGS],
        "logs": sink.items[Signal.LOGS],
        "lost": kernel["lost"],
        "cpu_s": round(cpu, 3),
        "kernel_ns_per_packet": round((run1 - run0) / max(1, cnt1 - cnt0)),
        "kernel_packets": cnt1 - cnt0,
    }


async def peer_run(net: DnsNet, names: Path, rate: int, seconds: float) -> dict:
    cmd = ["ip", "netns", "exec", net.node, sys.executable, "-c", PEER, str(seconds + 2 + SETTLE_SECONDS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert (await trio.to_thread.run_sync(proc.stdout.readline)).strip() == "ready"
        perf = await dnsperf(net, names, rate, seconds)
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        peer = json.loads(line)
    finally:
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
    return {**perf, "reported": peer["pairs"], "handled": peer["frames"] // 2, "lost": peer["drops"], "cpu_s": round(peer["cpu_s"], 3), "frames": peer["frames"]}


#: the share of completed queries a side must report to count as keeping up
KEPT_UP = 0.99


def per_1k_ms(run: dict, of: str = "handled") -> float:
    """CPU ms per 1000 queries (``of``: handled by that side, or completed by dnsperf)."""
    return round(run["cpu_s"] * 1000 / max(1, run[of] / 1000), 3)


def side(run: dict) -> dict:
    return {
        **run,
        "kept_up": round(run["reported"] / max(1, run["completed"]), 4),
        "cpu_ms_per_1k": per_1k_ms(run),
        "cpu_ms_per_1k_completed": per_1k_ms(run, "completed"),
    }


async def main(seconds: float, rates: list[int], with_spans: bool) -> None:
    signals = frozenset({Signal.LOGS, Signal.METRICS} | ({Signal.TRACES} if with_spans else set()))
    results = []
    with DnsNet() as net, tempfile.TemporaryDirectory() as tmp:
        names = Path(tmp) / "queries.txt"
        names.write_text("".join(f"q{i}.example.test A\n" for i in range(NAMES)))
        await tapio_run(net, names, 1000, 1, signals)  # warm up: compile caches, dnsmasq, ARP and neighbour entries
        for rate in rates:
            ours = await tapio_run(net, names, rate, seconds, signals)
            peer = await peer_run(net, names, rate, seconds)
            row = {"offered_qps": rate or "max", "tapio": side(ours), "peer": side(peer)}
            t, p = row["tapio"], row["peer"]
            row["peer_cpu_over_tapio"] = round(p["cpu_ms_per_1k"] / max(1e-9, t["cpu_ms_per_1k"]), 1)
            row["peer_cpu_over_tapio_per_completed"] = round(p["cpu_ms_per_1k_completed"] / max(1e-9, t["cpu_ms_per_1k_completed"]), 1)
            row["both_kept_up"] = t["kept_up"] >= KEPT_UP and p["kept_up"] >= KEPT_UP
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    print(json.dumps({
        "bench": "dns_xdp",
        "seconds_per_rate": seconds,
        "tapio_signals": sorted(s.value for s in signals),
        "rates": results,
        "peer_cpu_over_tapio_min": min(r["peer_cpu_over_tapio"] for r in results),
        "peer_cpu_over_tapio_min_where_both_kept_up": min((r["peer_cpu_over_tapio"] for r in results if r["both_kept_up"]), default=None),
        "goal": "peer CPU per 1k queries handled >= 10x tapio's",
    }))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--spans", action="store_true", help="wire a traces pipeline too: a span per answered query besides its log record")
    ap.add_argument("--rates", default="2000,5000,10000,20000,40000,0", help="queries per second offered, comma-separated (0: as fast as the server answers)")
    args = ap.parse_args()
    trio.run(main, args.seconds, [int(r) for r in args.rates.split(",")], args.spans)
