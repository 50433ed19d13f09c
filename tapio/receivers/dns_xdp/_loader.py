"""Checking the host and loading the dns-xdp programs (not attaching them: see _attach).

Invariants:
- Every startup problem is a `DnsXdpStartupError` saying what is missing
  and how to fix it.
- bcc is never imported here: the ebpf receiver's compile helper (a
  short-lived child process) compiles and loads, and hands back the
  program and map descriptors. The programs live as long as a descriptor
  of them is open (ours, or an interface attachment's).
- `Program.close` closes every descriptor; it is safe to call twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

from tapio.receivers.ebpf._loader import EbpfStartupError, _boot_to_unix_ns, check_bcc, check_headers, missing_capabilities, run_compile_helper
from tapio.receivers.ebpf._ringbuf import PerCpuU64Array, RingBuffer

from . import _decode as d
from ._bpfsys import HashMap
from ._config import PAGE_SIZE, Config

#: the programs (bcc names them by function; the kernel keeps 15 characters)
XDP_PROG = "tapio_dns_xdp"
TC_INGRESS_PROG = "tapio_dns_tc_in"
TC_EGRESS_PROG = "tapio_dns_tc_eg"
PROG_NAMES = frozenset({XDP_PROG, TC_INGRESS_PROG, TC_EGRESS_PROG})
MAPS = ("events", "counters", "inflight")


class DnsXdpStartupError(RuntimeError):
    """The receiver cannot run on this host; the message says why and what to do."""


@dataclass
class Program:
    """The loaded programs and the maps the agent reads; `close` releases them."""

    prog_fds: dict[str, int]
    ring_fd: int
    ring_size: int
    counters_fd: int
    inflight_fd: int
    inflight_key_size: int
    inflight_value_size: int
    #: CLOCK_BOOTTIME ns + this = unix ns
    boot_to_unix_ns: int = 0
    _closed: bool = False
    _ring: RingBuffer | None = None
    _counters: PerCpuU64Array | None = None
    _inflight: HashMap | None = field(default=None)

    def ring(self) -> RingBuffer:
        if self._ring is None:
            self._ring = RingBuffer(self.ring_fd, self.ring_size)
        return self._ring

    def counters(self) -> list[int]:
        """The kernel's counters summed over CPUs (CNT_* in _decode)."""
        if self._counters is None:
            self._counters = PerCpuU64Array(self.counters_fd, d.CNT_SLOTS)
        return self._counters.sums()

    def inflight(self) -> HashMap:
        if self._inflight is None:
            self._inflight = HashMap(self.inflight_fd, self.inflight_key_size, self.inflight_value_size)
        return self._inflight

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._ring.close()
        for fd in [*self.prog_fds.values(), self.ring_fd, self.counters_fd, self.inflight_fd]:
            try:
                os.close(fd)
            except OSError:
                pass


def check_privileges() -> None:
    # CAP_PERFMON too: without it the verifier refuses the packet pointer arithmetic ("prohibited for !root")
    missing = missing_capabilities("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")
    if missing:
        raise DnsXdpStartupError(
            f"the dns-xdp receiver needs the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN stands for the first two), "
            f"and this process lacks {', '.join(missing)}; run as root, or in a pod add them: securityContext.capabilities.add: [BPF, PERFMON, NET_ADMIN]"
        )


def port_filter_source(ports: list[int]) -> str:
    """C for ``is_dns_port(u16 p)``: one compare per configured port."""
    test = " || ".join(f"p == {int(p)}" for p in ports) or "0"
    return f"static __always_inline int is_dns_port(u16 p) {{\n    return {test};\n}}\n\n"


def compile_request(config: Config) -> dict:
    source = resources.files("tapio.bpf").joinpath("dns_xdp.bpf.c").read_text()
    cflags = [
        f"-DRINGBUF_PAGES={int(config.ring_buffer_size) // PAGE_SIZE}",
        f"-DMAX_INFLIGHT={int(config.max_inflight)}",
        f"-DREPORT_UNMATCHED={int(config.report_unmatched_responses)}",
        f"-DPARSE_TCP={int(config.tcp)}",
    ]
    programs = {XDP_PROG: "XDP"} if config.mode == "xdp" else {TC_INGRESS_PROG: "SCHED_CLS", TC_EGRESS_PROG: "SCHED_CLS"}
    return {"source": port_filter_source(list(config.ports)) + source, "cflags": cflags, "programs": programs, "maps": list(MAPS)}


async def open_program(config: Config) -> Program:
    """Check the host, then compile and load in the helper; the caller must `Program.close` it."""
    check_privileges()
    try:
        check_bcc()
        check_headers()
        answer, fds = await run_compile_helper(compile_request(config))
    except EbpfStartupError as exc:
        raise DnsXdpStartupError(str(exc)) from None
    try:
        maps, info = answer["maps"], answer["map_info"]
        return Program(
            prog_fds={name: fds[i] for name, i in answer["programs"].items()},
            ring_fd=fds[maps["events"]],
            ring_size=int(info["events"]["max_entries"]),
            counters_fd=fds[maps["counters"]],
            inflight_fd=fds[maps["inflight"]],
            inflight_key_size=int(info["inflight"]["key_size"]),
            inflight_value_size=int(info["inflight"]["value_size"]),
            boot_to_unix_ns=_boot_to_unix_ns(),
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
