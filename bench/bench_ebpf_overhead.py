"""Benchmark of the ebpf receiver: what it costs the traced workload, and the agent itself.

Run as root: ``.venv/bin/python bench/bench_ebpf_overhead.py [--rounds N] [--ticks N]``.

The workload is a child process that runs a fixed number of ticks; each
tick opens a file 15 times, makes 20 loopback TCP connections (connect,
accept, close both ends), spawns /bin/true every other tick (exec, exit) and,
in the *service* workload, does application work (SHA-256 over a 4 KiB
buffer) in between, calibrated at start so that the workload alone produces
~10k kernel events a second on one core: a busy service, not a paced one.
The workload runs pinned to one CPU and the agent (this process) to
another, so that the agent's own CPU does not compete for the workload's
core; the workload's wall time for its fixed work is timed without and
with the receiver (all kinds on, default config), alternating in rounds so
that drift and warm-up favour neither side. The slowdown is reported per
round, as the median and spread, and pooled. Wall time on a core of its
own is the precise figure: it includes the BPF programs that run in
softirq context, and rusage's CPU time is sampled at scheduler ticks
(several percent of noise per 4 s run); the CPU slowdown is reported too.

The *syscall-bound* workload runs the same ticks with no application work
(~120k events/s, nothing but the traced calls): the worst case, whose
slowdown says little about real services but whose extra CPU per event,
``(wall_with - wall_without) / events``, is the receiver's kernel-side cost
per event; a workload's slowdown is that times its event rate. The
*filtered* run drops every event at the first in-kernel check (a comm
filter that matches nothing): the floor of tracepoint dispatch.

Per-program kernel time comes from one extra round with
``kernel.bpf_stats_enabled`` on (it adds timing to every program run, so it
is off while the slowdown is timed). The agent's CPU per event and per 10k
events/s, its RSS, and start-to-ready time (compile included) come from the
service runs. The *loss point* runs the workload paced at rising event rates
(then as fast as it goes), ~3 s each with the default config, and reports the
first rate at which the kernel dropped events for want of ring-buffer space.
Prints one JSON line.

The receiver's compiled drain path (tapio/receivers/ebpf/_hotloop.c) and its
pure-Python fallback are measured side by side: ``agent`` is the receiver as
it starts by default (compiled when built), ``agent_python`` the same service
runs with the fallback, and ``loss_point_python`` its loss point.

``--profile N`` instead runs the service workload once with cProfile on in
the agent and prints the N functions with the most own time (``--python``:
with the fallback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.receivers.ebpf import _records, _ringbuf, factory
from tapio.receivers.ebpf._config import Config, FiltersConfig
from tapio.telemetry import Telemetry

WORKLOAD = r"""
import hashlib, os, socket, sys
ticks, work, cpu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})   # its children (/bin/true) inherit it
OPENS, CONNECTS, EXEC_EVERY = 15, 20, 2   # ~100 kernel events a tick
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1024)
addr = srv.getsockname()
path = "/tmp/tapio-bench-ebpf-open"
open(path, "w").close()
block = os.urandom(4096)
for tick in range(ticks):
    for _ in range(OPENS):
        os.close(os.open(path, os.O_RDONLY))
    for _ in range(CONNECTS):
        c = socket.create_connection(addr)
        a, _ = srv.accept()
        c.close(); a.close()
    if tick % EXEC_EVERY == 0:
        pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
        os.waitpid(pid, 0)
    for _ in range(work):
        hashlib.sha256(block).digest()
"""

#: kernel events the workload causes per tick: 15 opens, 20 × (connect, accept, 2 closes), an exec and exit every other tick
EVENTS_PER_TICK = 15 + 20 * 4 + 1
#: the service workload's target rate on one core
TARGET_EVENTS_PER_S = 10_000
#: SHA-256 blocks a tick while calibrating: ~10 ms of work, well above a bare tick's ~1 ms
CALIBRATION_PROBE_BLOCKS = 4000
#: event rates tried for the ring-buffer loss point (0: as fast as the bare workload goes), each for LOSS_RUN_S
LOSS_RATES = (20_000, 40_000, 60_000, 80_000, 100_000, 0)
LOSS_RUN_S = 3.0


class CountingConsumer:
    signals = frozenset(Signal)

    def __init__(self) -> None:
        self.items = 0

    async def send(self, batch: Batch) -> None:
        self.items += batch.count

    def send_nowait(self, batch: Batch) -> None:
        self.items += batch.count


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident memory in MiB; RssAnon leaves out file-backed pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpus() -> tuple[int, int]:
    """(the agent's CPU, the workload's CPU): two different ones where there are two, else -1 (no pinning)."""
    mine = sorted(os.sched_getaffinity(0))
    return (mine[0], mine[-1]) if len(mine) >= 2 else (-1, -1)


AGENT_CPU, WORKLOAD_CPU = cpus()


async def run_workload(ticks: int, work: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one workload run, children included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    await trio.run_process([sys.executable, "-c", WORKLOAD, str(ticks), str(work), str(WORKLOAD_CPU)])
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def bpf_prog_stats() -> dict[int, tuple[str, int, int]]:
    """Tracepoint programs loaded now: id -> (name, run_time_ns, run_cnt)."""
    try:
        out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(out) if p.get("type") == "tracepoint"}


@dataclass
class Agent:
    """The receiver in this process, feeding a counting consumer; its costs summed over runs."""

    config: Config
    telemetry: Telemetry = field(default_factory=Telemetry)
    cpu_s: float = 0.0
    seconds: float = 0.0
    events: float = 0.0
    ready_s: list[float] = field(default_factory=list)
    rss_ready_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_anon_end_mb: float = 0.0
    bpf_ns: dict[str, list[int]] = field(default_factory=dict)
    #: a cProfile.Profile to enable while the workload runs (--profile)
    profiler: object = None
    #: False: the receiver runs its pure-Python drain path (the fallback when the compiled one is not built)
    compiled: bool = True

    async def run_with(self, ticks: int, work: int, *, prog_stats: bool = False) -> tuple[float, float]:
        if self.compiled:
            return await self._run_with(ticks, work, prog_stats=prog_stats)
        saved = _records.COMPILED, _ringbuf.COMPILED_READ
        _records.COMPILED, _ringbuf.COMPILED_READ = None, None  # read when the writer and the ring reader are made
        try:
            return await self._run_with(ticks, work, prog_stats=prog_stats)
        finally:
            _records.COMPILED, _ringbuf.COMPILED_READ = saved

    async def _run_with(self, ticks: int, work: int, *, prog_stats: bool) -> tuple[float, float]:
        settings = Settings(
            id=ComponentID("ebpf"),
            kind=Kind.RECEIVER,
            telemetry=self.telemetry.for_component("receiver", "ebpf"),
            logger=logging.getLogger("bench"),
        )
        receiver = factory.create(settings, self.config, Ports(output=CountingConsumer()))
        async with trio.open_nursery() as nursery:
            t0 = time.perf_counter()
            await nursery.start(receiver.run)
            self.ready_s.append(time.perf_counter() - t0)
            self.rss_ready_mb = rss_mb()
            ev0 = self.telemetry.value("tapio_ebpf_events_total")
            progs0 = bpf_prog_stats() if prog_stats else {}
            cpu0, w0 = time.process_time(), time.perf_counter()
            if self.profiler is not None:
                self.profiler.enable()
            result = await run_workload(ticks, work)
            await trio.sleep(0.2)  # the last drain
            if self.profiler is not None:
                self.profiler.disable()
            if not prog_stats:
                self.cpu_s += time.process_time() - cpu0
                self.seconds += time.perf_counter() - w0
                self.events += self.telemetry.value("tapio_ebpf_events_total") - ev0
            for pid, (name, run_ns, runs) in bpf_prog_stats().items() if prog_stats else ():
                if pid in progs0:
                    acc = self.bpf_ns.setdefault(name.removeprefix("tracepoint__"), [0, 0])
                    acc[0] += run_ns - progs0[pid][1]
                    acc[1] += runs - progs0[pid][2]
            self.rss_end_mb = rss_mb()
            self.rss_anon_end_mb = rss_mb("RssAnon")
            nursery.cancel_scope.cancel()
        return result


async def compare(agent: Agent, ticks: int, work: int, rounds: int) -> dict:
    """Alternating rounds without and with the receiver: CPU and wall slowdown."""
    off: list[tuple[float, float]] = []
    on: list[tuple[float, float]] = []
    events0 = agent.events
    for i in range(rounds):
        if i % 2 == 0:
            off.append(await run_workload(ticks, work))
            on.append(await agent.run_with(ticks, work))
        else:
            on.append(await agent.run_with(ticks, work))
            off.append(await run_workload(ticks, work))
    cpu_off, cpu_on = [c for c, _ in off], [c for c, _ in on]
    wall_off, wall_on = [w for _, w in off], [w for _, w in on]
    wall_rounds = [100 * (b - a) / a for a, b in zip(wall_off, wall_on)]
    cpu_rounds = [100 * (b - a) / a for a, b in zip(cpu_off, cpu_on)]
    events = agent.events - events0
    return {
        "events_per_s_without": round(EVENTS_PER_TICK * ticks / statistics.median(wall_off)),
        "events_seen": int(events),
        "wall_s_without": [round(x, 3) for x in wall_off],
        "wall_s_with": [round(x, 3) for x in wall_on],
        "slowdown_pct_per_round": [round(x, 2) for x in wall_rounds],
        "slowdown_pct_median": round(statistics.median(wall_rounds), 2),
        "slowdown_pct_min": round(min(wall_rounds), 2),
        "slowdown_pct_max": round(max(wall_rounds), 2),
        "slowdown_pct_pooled": round(100 * (sum(wall_on) - sum(wall_off)) / sum(wall_off), 2),
        "kernel_cost_us_per_event": round(1e6 * (sum(wall_on) - sum(wall_off)) / events, 3) if events else None,
        "cpu_s_without": [round(x, 3) for x in cpu_off],
        "cpu_s_with": [round(x, 3) for x in cpu_on],
        "cpu_slowdown_pct_median": round(statistics.median(cpu_rounds), 2),
        "cpu_slowdown_pct_pooled": round(100 * (sum(cpu_on) - sum(cpu_off)) / sum(cpu_off), 2),
    }


@dataclass(frozen=True)
class Calibration:
    """The workload's cost on its core without the receiver: a bare tick, and one SHA-256 block of application work."""

    bare_tick_s: float
    per_block_s: float

    def work_for(self, events_per_s: float) -> int | None:
        """SHA-256 blocks a tick for that event rate; None above what the bare workload makes."""
        want_tick = EVENTS_PER_TICK / events_per_s
        if want_tick < self.bare_tick_s:
            return None
        return round((want_tick - self.bare_tick_s) / self.per_block_s)

    def ticks_for(self, events_per_s: float, seconds: float) -> int:
        return max(20, round(seconds * events_per_s / EVENTS_PER_TICK))


async def calibrate(ticks: int) -> Calibration:
    """The workload's costs on its core, without the receiver.

    The probe's work is several times the bare tick, so that noise from a busy
    machine cannot make it look free (which would ask for unbounded work).
    """
    n = max(ticks // 4, 20)
    _, wall = await run_workload(n, 0)
    bare_tick = wall / n
    probe = CALIBRATION_PROBE_BLOCKS
    _, wall = await run_workload(n, probe)
    per_block = (wall / n - bare_tick) / probe
    if per_block <= 0:
        raise RuntimeError(f"calibration failed: {probe} SHA-256 blocks a tick cost nothing measurable ({wall / n * 1e3:.2f} ms a tick, bare {bare_tick * 1e3:.2f} ms)")
    return Calibration(bare_tick, per_block)


async def loss_point(cal: Calibration, *, compiled: bool = True) -> dict:
    """The lowest of LOSS_RATES at which the kernel drops events with the default config, each run for LOSS_RUN_S."""
    runs = []
    for rate in LOSS_RATES:
        work = cal.work_for(rate)
        if work is None:
            rate, work = 0, 0  # as fast as the workload goes
        agent = Agent(Config(), compiled=compiled)
        ticks = cal.ticks_for(rate or 1 / cal.bare_tick_s * EVENTS_PER_TICK, LOSS_RUN_S)
        _, wall = await agent.run_with(ticks, work)
        lost = int(agent.telemetry.value("tapio_ebpf_events_lost_total"))
        made = EVENTS_PER_TICK * ticks / wall
        runs.append({"target_events_per_s": rate or "max", "events_per_s": round(made), "lost": lost, "agent_cpu_pct": round(100 * agent.cpu_s / agent.seconds, 1)})
        if lost or not rate:
            break
    first = next((r for r in runs if r["lost"]), None)
    return {
        "runs": runs,
        "first_loss_events_per_s": first["events_per_s"] if first else None,
        "no_loss_up_to_events_per_s": max((r["events_per_s"] for r in runs if not r["lost"]), default=0),
    }


def profile_tops(stats_text: str, lines: int) -> list[str]:
    body = stats_text.splitlines()
    head = next((i for i, line in enumerate(body) if line.lstrip().startswith("ncalls")), 0)
    return [line.rstrip() for line in body[head : head + 1 + lines]]


async def profiled(cal: Calibration, ticks: int, lines: int, compiled: bool) -> dict:
    """One service run with cProfile on in the agent: the functions with the most own time."""
    import cProfile
    import io
    import pstats

    agent = Agent(Config(), compiled=compiled)
    profiler = cProfile.Profile()
    agent.profiler = profiler
    await agent.run_with(ticks, cal.work_for(TARGET_EVENTS_PER_S) or 0)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return {
        "compiled": compiled,
        "events": int(agent.events),
        "agent_cpu_us_per_event": round(1e6 * agent.cpu_s / agent.events, 2),
        "top_by_own_time": profile_tops(out.getvalue(), lines),
    }


def agent_figures(agent: Agent) -> dict:
    """The agent's own costs over its service runs."""
    eps = agent.events / agent.seconds
    return {
        "events_per_s": round(eps),
        "cpu_us_per_event": round(1e6 * agent.cpu_s / agent.events, 2),
        "cpu_pct": round(100 * agent.cpu_s / agent.seconds, 2),
        "cpu_pct_per_10k_events_s": round(100 * agent.cpu_s / agent.seconds * 10_000 / eps, 2),
        "goal_cpu_us_per_event": 4.0,
        "rss_mb_at_ready": round(agent.rss_ready_mb, 1),
        "rss_mb_after_load": round(agent.rss_end_mb, 1),
        "rss_anon_mb_after_load": round(agent.rss_anon_end_mb, 1),
        "start_to_ready_s_max": round(max(agent.ready_s), 2),
        "goal_start_to_ready_s": 5.0,
        "goal_rss_mb": 100.0,
    }


async def main(rounds: int, ticks: int, profile: int, python: bool) -> None:
    if AGENT_CPU >= 0:
        os.sched_setaffinity(0, {AGENT_CPU})
    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    cal = await calibrate(ticks)
    work = cal.work_for(TARGET_EVENTS_PER_S) or 0
    result = {"bench": "ebpf_overhead", "rounds": rounds, "ticks_per_run": ticks, "agent_cpu": AGENT_CPU, "workload_cpu": WORKLOAD_CPU, "goal_slowdown_pct": 2.0}
    result["compiled_path"] = _records.COMPILED is not None and _ringbuf.COMPILED_READ is not None
    if not result["compiled_path"]:
        result["compiled_path_missing"] = _records.COMPILED_MISSING or "the compiled ring buffer reader is not built"
    if profile:
        result["profile"] = await profiled(cal, ticks, profile, not python)
        print(json.dumps(result))
        return
    service = Agent(Config())
    result["service"] = {"sha256_4k_blocks_per_tick": work, **await compare(service, ticks, work, rounds)}
    service_python = Agent(Config(), compiled=False)
    result["service_python"] = await compare(service_python, ticks, work, rounds)
    syscall_bound = Agent(Config())
    result["syscall_bound"] = await compare(syscall_bound, ticks, 0, rounds)
    filtered = Agent(Config(filters=FiltersConfig(comms=["no-such-comm"])))
    result["syscall_bound_filtered"] = await compare(filtered, ticks, 0, rounds)
    with open(stats_path) as f:
        stats_before = f.read().strip()
    try:
        with open(stats_path, "w") as f:
            f.write("1")
        cpu, _ = await syscall_bound.run_with(ticks, 0, prog_stats=True)
    finally:
        with open(stats_path, "w") as f:
            f.write(stats_before)
    total_ns = sum(ns for ns, _ in syscall_bound.bpf_ns.values())
    result["bpf_programs"] = {
        "pct_of_syscall_bound_workload_cpu": round(100 * total_ns / 1e9 / cpu, 2),
        "ns_per_run": {name: round(ns / runs) for name, (ns, runs) in sorted(syscall_bound.bpf_ns.items()) if runs},
        "ms_total": {name: round(ns / 1e6, 1) for name, (ns, _) in sorted(syscall_bound.bpf_ns.items())},
    }
    result["agent"] = {"compiled": result["compiled_path"], **agent_figures(service)}
    result["agent_python"] = {"compiled": False, **agent_figures(service_python)}
    result["events_lost"] = sum(a.telemetry.value("tapio_ebpf_events_lost_total") for a in (service, service_python, syscall_bound))
    result["loss_point"] = await loss_point(cal)
    result["loss_point_python"] = await loss_point(cal, compiled=False)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per workload (default 6)")
    parser.add_argument("--ticks", type=int, default=400, help="workload ticks per run, ~100 events each (default 400)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="instead: one service run under cProfile, printing the N functions with the most own time")
    parser.add_argument("--python", action="store_true", help="with --profile: profile the pure-Python drain path")
    args = parser.parse_args()
    trio.run(main, args.rounds, args.ticks, args.profile, args.python)
