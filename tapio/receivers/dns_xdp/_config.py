"""The dns-xdp receiver's configuration.

Invariants:
- Every default works on a fresh machine as root with no pods: XDP on the
  loopback interface (generic mode), where both queries and responses are
  ingress, so `make run` reports the node's own lookups through 127.0.0.1.
- `validate` reports every problem, each prefixed with its key; what it
  accepts compiles (ports and sizes are capped to what the program is built for).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from tapio.component import setting
from tapio.units import ByteSize, Duration

PAGE_SIZE = 4096
MAX_RING_BUFFER = 256 * 1024 * 1024
#: ports are compiled into the program as straight-line compares
MAX_PORTS = 16
#: IFNAMSIZ - 1
MAX_IFNAME = 15


@dataclass(frozen=True, kw_only=True)
class Config:
    interfaces: list[str] = setting(
        default_factory=lambda: ["lo"],
        doc="Interfaces to attach to: names or shell-style globs (`veth*`, `cali*`, `lxc*`, `eth0`). Interfaces that appear later and match are attached when they appear.",
    )
    exclude_interfaces: list[str] = setting(default_factory=list, doc="Names or globs never attached, even if `interfaces` matches them. Empty excludes none.")
    network_namespace: str = setting(
        "",
        doc="The network namespace whose interfaces are watched: a path (`/var/run/netns/NAME`, `/proc/PID/ns/net`) or a name under /var/run/netns. Empty: the agent's own.",
    )
    mode: Literal["xdp", "tc"] = setting(
        "xdp",
        doc="`xdp` sees each interface's ingress only (cheapest; on host-side pod veths that is the pods' queries and a local resolver's answers); `tc` attaches to clsact ingress and egress and sees both directions.",
    )
    xdp_mode: Literal["auto", "native", "generic"] = setting(
        "auto",
        doc="With `mode: xdp`: `native` runs in the driver (fails where the driver has no XDP), `generic` in the network stack (works everywhere), `auto` lets the kernel choose.",
    )
    ports: list[int] = setting(default_factory=lambda: [53], doc="UDP (and TCP) ports that are DNS: a query goes to one, a response comes from one.")
    tcp: bool = setting(True, doc="Also parse DNS over TCP, best effort: a segment that starts with a message's length and header.")
    query_timeout: Duration = setting(
        Duration(5.0),
        doc="A query without a response after this long is reported unanswered (where the response path is observed) and forgotten.",
    )
    max_inflight: int = setting(
        16384,
        doc="Queries the kernel remembers while waiting for their response (an LRU table: beyond it the oldest is forgotten, counted).",
    )
    report_unmatched_responses: bool = setting(
        True,
        doc="Report a response whose query was not seen (e.g. the query left through an interface that is not attached), without latency. false only counts them.",
    )
    ring_buffer_size: ByteSize = setting(
        ByteSize(1024 * 1024),
        doc="Size of the ring buffer from kernel to agent (352 bytes an answered query): a power of two, at least 4KiB. Events that do not fit are lost and counted.",
    )
    flush_interval: Duration = setting(
        Duration(0.05),
        doc="Longest time events wait in the ring buffer before being read into one batch; larger saves CPU. 0 reads on every wakeup.",
    )
    metrics_interval: Duration = setting(
        Duration(10.0),
        doc="How often the DNS metrics (latency histogram, counts) are emitted on the metrics signal. 0 emits none.",
    )
    max_servers: int = setting(
        1024,
        doc="Distinct server addresses that get metric series of their own; the rest are summed under `server.address=other`.",
    )

    def validate(self) -> list[str]:
        problems = []
        if not self.interfaces:
            problems.append("interfaces: name at least one interface or glob (e.g. [lo] or ['veth*'])")
        for key in ("interfaces", "exclude_interfaces"):
            for i, pattern in enumerate(getattr(self, key)):
                if not pattern or "/" in pattern or any(c.isspace() for c in pattern):
                    problems.append(f"{key}[{i}]: an interface name or glob without '/' or spaces, got {pattern!r}")
                elif not any(c in pattern for c in "*?[") and len(pattern.encode()) > MAX_IFNAME:
                    problems.append(f"{key}[{i}]: interface names are at most {MAX_IFNAME} bytes, got {pattern!r}")
        if not self.ports:
            problems.append("ports: at least one port (DNS is 53)")
        if len(self.ports) > MAX_PORTS:
            problems.append(f"ports: at most {MAX_PORTS}, got {len(self.ports)}")
        for i, port in enumerate(self.ports):
            if not 1 <= port <= 65535:
                problems.append(f"ports[{i}]: must be between 1 and 65535, got {port}")
        if len(set(self.ports)) != len(self.ports):
            problems.append(f"ports: {sorted(self.ports)} lists a port twice")
        if not 0.1 <= self.query_timeout <= 300:
            problems.append(f"query_timeout: must be between 100ms and 5m, got {self.query_timeout}")
        if not 64 <= self.max_inflight <= 1 << 20:
            problems.append(f"max_inflight: must be between 64 and 1048576, got {self.max_inflight}")
        size = int(self.ring_buffer_size)
        pages = size // PAGE_SIZE
        if size < PAGE_SIZE or size % PAGE_SIZE or pages & (pages - 1):
            problems.append(f"ring_buffer_size: must be a power of two of at least 4KiB (e.g. 256KiB, 1MiB), got {size}")
        elif size > MAX_RING_BUFFER:
            problems.append(f"ring_buffer_size: at most 256MiB, got {size}")
        if self.flush_interval > 10:
            problems.append(f"flush_interval: at most 10s, got {self.flush_interval}")
        if self.max_servers < 1:
            problems.append(f"max_servers: must be at least 1, got {self.max_servers}")
        if self.network_namespace and self.network_namespace != self.network_namespace.strip():
            problems.append(f"network_namespace: surrounding spaces in {self.network_namespace!r}")
        return problems

    def wants(self, name: str) -> bool:
        """Whether the interface ``name`` is to be attached."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.interfaces) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude_interfaces
        )
