"""The ebpf receiver's configuration.

Invariants:
- Every default works on a fresh node as root: all event kinds on, no
  filters but the agent's own events, a 4 MiB ring buffer (about 0.4 s of a 10k events/s load).
- `validate` reports every problem, each prefixed with its dotted key; what
  it accepts compiles (sizes, prefix lengths and list lengths are capped to
  what the BPF program is built for).
"""

from __future__ import annotations

from dataclasses import dataclass

from tapio.component import setting
from tapio.units import ByteSize, Duration

PAGE_SIZE = 4096
#: the kernel needs a power-of-two number of pages for a ring buffer
MAX_RING_BUFFER = ByteSize(256 * 1024 * 1024)
#: path prefixes are compiled into the program as straight-line compares
MAX_PATH_PREFIXES = 16
MAX_PATH_PREFIX_LEN = 128
#: a comm is at most 15 characters (TASK_COMM_LEN - 1)
MAX_COMM_LEN = 15
MAX_COMMS = 256
MAX_CGROUPS = 4096


@dataclass(frozen=True, kw_only=True)
class EventsConfig:
    process: bool = setting(True, doc="Process exec (pid, ppid, uid, executable path, argv) and exit (exit code or signal, lifetime) events.")
    file: bool = setting(True, doc="File opens (openat and open): path, flags, resulting fd or errno.")
    network: bool = setting(True, doc="TCP connect, accept and close over IPv4 and IPv6: addresses, ports, states, duration.")
    oom: bool = setting(True, doc="OOM kills, reported for the victim (its pid, comm, cgroup and memory figures).")
    signal: bool = setting(True, doc="Signals sent: sender, target pid and comm, signal number, result.")


@dataclass(frozen=True, kw_only=True)
class FiltersConfig:
    exclude_self: bool = setting(True, doc="Drop events of the agent's own process in the kernel (its reads of /proc would otherwise report themselves).")
    container_only: bool = setting(
        False,
        doc="Keep only events of tasks outside the host's PID namespace (containers), checked in the kernel. false keeps every task.",
    )
    cgroups: list[str] = setting(
        default_factory=list,
        doc="Keep only events of tasks in these cgroup2 cgroups: directories (e.g. /sys/fs/cgroup/kubepods.slice) or numeric cgroup ids. Not recursive. Empty keeps every cgroup.",
    )
    comms: list[str] = setting(default_factory=list, doc="Keep only events of tasks with one of these comms (15 characters at most). Empty keeps every comm.")
    path_prefixes: list[str] = setting(
        default_factory=list,
        doc="File events: keep only opens whose path (as passed to open) starts with one of these. Empty keeps every path.",
    )
    exclude_path_prefixes: list[str] = setting(
        default_factory=list,
        doc="File events: drop opens whose path starts with one of these (checked after path_prefixes). Empty drops none.",
    )

    def validate(self, prefix: str = "filters") -> list[str]:
        problems = []
        for i, c in enumerate(self.cgroups):
            if not (c.isdigit() or c.startswith("/")):
                problems.append(f"{prefix}.cgroups[{i}]: must be an absolute cgroup2 directory or a numeric cgroup id, got {c!r}")
        if len(self.cgroups) > MAX_CGROUPS:
            problems.append(f"{prefix}.cgroups: at most {MAX_CGROUPS} entries, got {len(self.cgroups)}")
        for i, c in enumerate(self.comms):
            if not c or len(c.encode()) > MAX_COMM_LEN:
                problems.append(f"{prefix}.comms[{i}]: must be 1 to {MAX_COMM_LEN} bytes (the kernel truncates comms), got {c!r}")
        if len(self.comms) > MAX_COMMS:
            problems.append(f"{prefix}.comms: at most {MAX_COMMS} entries, got {len(self.comms)}")
        for key in ("path_prefixes", "exclude_path_prefixes"):
            values = getattr(self, key)
            if len(values) > MAX_PATH_PREFIXES:
                problems.append(f"{prefix}.{key}: at most {MAX_PATH_PREFIXES} entries, got {len(values)}")
            for i, p in enumerate(values):
                if not p or len(p.encode()) > MAX_PATH_PREFIX_LEN:
                    problems.append(f"{prefix}.{key}[{i}]: must be 1 to {MAX_PATH_PREFIX_LEN} bytes, got {p!r}")
        return problems


@dataclass(frozen=True, kw_only=True)
class TracesConfig:
    max_pending: int = setting(
        16384,
        doc="Processes remembered between exec and exit to name their spans; the oldest is forgotten beyond this (counted). 0 remembers none (spans then lack the executable path).",
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    events: EventsConfig = setting(default_factory=EventsConfig, doc="Which event kinds to trace.")
    filters: FiltersConfig = setting(default_factory=FiltersConfig, doc="In-kernel filters.")
    ring_buffer_size: ByteSize = setting(
        ByteSize(4 * 1024 * 1024),
        doc="Size of the one ring buffer between kernel and agent: a power of two, at least 4KiB. Events that do not fit are lost and counted.",
    )
    rate_limit_per_cgroup: int = setting(
        0,
        doc="Most events a second one cgroup may emit (all kinds together, OOM kills exempt); the rest are dropped in the kernel and counted. 0 means no limit.",
    )
    max_tracked: int = setting(
        16384,
        doc="Entries in each kernel table of pending state (open calls, sockets, processes); least recently used entries are evicted.",
    )
    flush_interval: Duration = setting(
        Duration(0.05),
        doc="Longest time events wait in the ring buffer before being drained into one batch; larger saves CPU, needs a larger ring buffer. 0 drains on every wakeup.",
    )
    metrics_interval: Duration = setting(
        Duration(10.0),
        doc="How often cumulative counters are emitted on the metrics signal. 0 emits none (the kernel's loss counters are still read every second for tapio's own metrics).",
    )
    traces: TracesConfig = setting(default_factory=TracesConfig, doc="Spans for process exec→exit and TCP connect/accept→close.")
    container_cache_size: int = setting(
        16384,
        doc="Processes and cgroups whose container id is remembered (past their exit, so exit and OOM events resolve).",
    )

    def validate(self) -> list[str]:
        problems = self.filters.validate()
        size = int(self.ring_buffer_size)
        if size < PAGE_SIZE or size % PAGE_SIZE or (size // PAGE_SIZE) & (size // PAGE_SIZE - 1):
            problems.append(f"ring_buffer_size: must be a power of two of at least 4KiB (e.g. 256KiB, 1MiB), got {size}")
        elif size > MAX_RING_BUFFER:
            problems.append(f"ring_buffer_size: at most 256MiB, got {size}")
        if self.rate_limit_per_cgroup < 0:
            problems.append(f"rate_limit_per_cgroup: must be 0 (no limit) or more, got {self.rate_limit_per_cgroup}")
        if not 64 <= self.max_tracked <= 1 << 20:
            problems.append(f"max_tracked: must be between 64 and 1048576, got {self.max_tracked}")
        if self.flush_interval > 10:
            problems.append(f"flush_interval: at most 10s, got {self.flush_interval}")
        if self.traces.max_pending < 0:
            problems.append(f"traces.max_pending: must be 0 or more, got {self.traces.max_pending}")
        if self.container_cache_size < 1:
            problems.append(f"container_cache_size: must be at least 1, got {self.container_cache_size}")
        if not any(getattr(self.events, k) for k in ("process", "file", "network", "oom", "signal")):
            problems.append("events: at least one event kind must be enabled")
        return problems
