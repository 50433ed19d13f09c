"""Benchmark of the ebpf receiver: workload slowdown, agent CPU and memory, start-up time.

Run as root: ``.venv/bin/python bench/bench_ebpf_overhead.py [seconds per run] [rounds]``.

A child process paces a mix of file opens, loopback TCP connect/accept/close
and fork+exec of /bin/true at about 10k kernel events a second. It runs
alternately without and with the receiver (all kinds on, default config),
in the same run; the workload's own CPU time (user+sys, from rusage) is
compared, since a paced workload's wall time hides the cost. Each round
is one run without and one with (the order alternating between rounds, so
drift and warm-up do not favour one side); the slowdown is reported per
round, as the median and the spread (min, max) over rounds, and pooled.
On 2 cores shared by workload and agent the rounds scatter by a few
percent: read the median and the spread together. Prints one JSON line
for the overhead and one for the agent (CPU per 10k events/s, RSS,
start-to-ready time with the compile), and, with ``bpf_stats``, the time
the kernel spent in each BPF program per run (kernel.bpf_stats_enabled is
switched on for the runs with the receiver and restored after).
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import subprocess
import sys
import time

import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.receivers.ebpf import factory
from tapio.receivers.ebpf._config import Config
from tapio.telemetry import Telemetry

WORKLOAD = r"""
import os, socket, sys, time
seconds = float(sys.argv[1])
TICK = 0.01
OPENS, CONNECTS, EXEC_EVERY = 15, 20, 2   # per tick: ~15 + 80 + ~5 events -> ~10k/s
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1024)
addr = srv.getsockname()
path = "/tmp/tapio-bench-ebpf-open"
open(path, "w").close()
end = time.monotonic() + seconds
next_tick = time.monotonic()
tick = 0
while next_tick < end:
    for _ in range(OPENS):
        os.close(os.open(path, os.O_RDONLY))
    for _ in range(CONNECTS):
        c = socket.create_connection(addr)
        a, _ = srv.accept()
        c.close(); a.close()
    if tick % EXEC_EVERY == 0:
        pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
        os.waitpid(pid, 0)
    tick += 1
    next_tick += TICK
    delay = next_tick - time.monotonic()
    if delay > 0:
        time.sleep(delay)
"""


#: the receiver's config: the default, or with ``--filtered`` a comm filter that
#: matches no task, so every event is dropped in the kernel at its first check
#: (the floor: tracepoint dispatch plus the filter, no maps, no ring buffer)
CONFIG = Config()


class CountingConsumer:
    signals = frozenset(Signal)

    def __init__(self) -> None:
        self.items = 0

    async def send(self, batch: Batch) -> None:
        self.items += batch.count

    def send_nowait(self, batch: Batch) -> None:
        self.items += batch.count


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MiB; RssAnon leaves out file-backed pages (libbcc/LLVM's code, shared and reclaimable)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run_workload(seconds: float) -> float:
    """Workload CPU seconds (user + sys, the child and its /bin/true children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    await trio.run_process([sys.executable, "-c", WORKLOAD, str(seconds)])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bpf_prog_stats() -> dict[int, tuple[str, int, int]]:
    """Tracepoint programs loaded now: id -> (name, run_time_ns, run_cnt)."""
    try:
        out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(out) if p.get("type") == "tracepoint"}


async def main(seconds: float, rounds: int) -> None:
    telemetry = Telemetry()
    settings = Settings(
        id=ComponentID("ebpf"),
        kind=Kind.RECEIVER,
        telemetry=telemetry.for_component("receiver", "ebpf"),
        logger=logging.getLogger("bench"),
    )
    off: list[float] = []
    on: list[float] = []
    agent_cpu = 0.0
    events = 0.0
    on_seconds = 0.0
    ready: list[float] = []
    rss_ready = rss_end = anon_end = 0.0
    bpf_ns: dict[str, list[int]] = {}
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(stats_path) as f:
        stats_before = f.read().strip()

    async def with_receiver() -> None:
        nonlocal agent_cpu, events, on_seconds, rss_ready, rss_end, anon_end
        sink = CountingConsumer()
        receiver = factory.create(settings, CONFIG, Ports(output=sink))
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await nursery.start(receiver.run)
            ready.append(time.perf_counter() - t0)
            rss_ready = rss_mb()
            ev0 = telemetry.value("tapio_ebpf_events_total")
            progs0 = bpf_prog_stats()
            cpu0 = time.process_time()
            w0 = time.perf_counter()
            on.append(await run_workload(seconds))
            await trio.sleep(0.2)  # let the last drain happen
            agent_cpu += time.process_time() - cpu0
            on_seconds += time.perf_counter() - w0
            events += telemetry.value("tapio_ebpf_events_total") - ev0
            for pid, (name, run_ns, runs) in bpf_prog_stats().items():
                if pid in progs0:
                    bpf_ns.setdefault(name, [0, 0])
                    bpf_ns[name][0] += run_ns - progs0[pid][1]
                    bpf_ns[name][1] += runs - progs0[pid][2]
            rss_end = rss_mb()
            anon_end = rss_mb("RssAnon")
            nursery.cancel_scope.cancel()

    try:
        with open(stats_path, "w") as f:
            f.write("1")
        for i in range(rounds):
            if i % 2 == 0:
                off.append(await run_workload(seconds))
                await with_receiver()
            else:
                await with_receiver()
                off.append(await run_workload(seconds))
    finally:
        with open(stats_path, "w") as f:
            f.write(stats_before)
    eps = events / on_seconds or 1e-9  # filtered: no events
    lost = telemetry.value("tapio_ebpf_events_lost_total")
    per_round = [100 * (b - a) / a for a, b in zip(off, on)]
    print(
        json.dumps(
            {
                "bench": "ebpf_overhead",
                "seconds_per_run": seconds,
                "rounds": rounds,
                "events_per_s": round(eps),
                "workload_cpu_s_without": [round(x, 3) for x in off],
                "workload_cpu_s_with": [round(x, 3) for x in on],
                "slowdown_pct_per_round": [round(x, 2) for x in per_round],
                "slowdown_pct_median": round(statistics.median(per_round), 2),
                "slowdown_pct_min": round(min(per_round), 2),
                "slowdown_pct_max": round(max(per_round), 2),
                "slowdown_pct_pooled": round(100 * (sum(on) - sum(off)) / sum(off), 2),
                "bpf_cpu_pct_of_workload": round(100 * sum(ns for ns, _ in bpf_ns.values()) / 1e9 / sum(on), 2),
                "events_lost": lost,
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "ebpf_agent",
                "agent_cpu_pct": round(100 * agent_cpu / on_seconds, 2),
                "agent_cpu_pct_per_10k_events_s": round(100 * agent_cpu / on_seconds * 10000 / eps, 2),
                "rss_mb_at_ready": round(rss_ready, 1),
                "rss_mb_after_load": round(rss_end, 1),
                "rss_anon_mb_after_load": round(anon_end, 1),
                "start_to_ready_s": round(max(ready), 2),
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "ebpf_bpf_programs",
                "ns_per_run": {name.removeprefix("tracepoint__"): round(ns / runs) for name, (ns, runs) in sorted(bpf_ns.items()) if runs},
                "ms_per_round": {name.removeprefix("tracepoint__"): round(ns / 1e6 / rounds, 1) for name, (ns, runs) in sorted(bpf_ns.items()) if runs},
            }
        )
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--filtered" in sys.argv:
        from tapio.receivers.ebpf._config import FiltersConfig

        CONFIG = Config(filters=FiltersConfig(comms=["no-such-comm"]))
    trio.run(main, float(args[0]) if args else 5.0, int(args[1]) if len(args) > 1 else 5)
