"""Finding out what this host supports, then compiling and attaching the BPF program.

Invariants:
- Every startup problem is an `EbpfStartupError` whose message says what is
  missing and how to fix it (not root, no bcc, no kernel headers, no
  tracefs); a missing tracepoint only disables the event kinds that need it,
  and `Program.disabled` says which and why.
- One compile at a time in this process (`_COMPILE_LOCK`): bcc/LLVM crash
  when two compiles overlap. Compiling happens off the trio thread.
- `Program.close` detaches every probe and frees every map; it is safe to
  call twice.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import trio

from ._config import PAGE_SIZE, Config

#: bcc/LLVM cannot compile two programs at once in one process
_COMPILE_LOCK = threading.Lock()

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CGROUP2_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")

#: the tracepoints each event kind needs (all of them) and can use (any of them)
REQUIRED = {
    "process": ["sched/sched_process_exec", "sched/sched_process_exit"],
    "file": ["syscalls/sys_enter_openat", "syscalls/sys_exit_openat"],
    "network": ["sock/inet_sock_set_state"],
    "oom": ["oom/mark_victim", "sched/sched_process_exit"],
    "signal": ["signal/signal_generate"],
}
ALWAYS = ["sched/sched_process_fork"]


class EbpfStartupError(RuntimeError):
    """The receiver cannot run on this host; the message says why and what to do."""


@dataclass
class Program:
    """A compiled, attached program and what it was built with."""

    bpf: Any
    enabled: list[str]
    #: event kind -> why it is off on this host
    disabled: dict[str, str] = field(default_factory=dict)
    #: CLOCK_BOOTTIME ns + this = unix ns
    boot_to_unix_ns: int = 0
    _closed: bool = False

    def counters(self) -> list[int]:
        """The kernel's counter slots summed over CPUs (see CNT_* in the C source)."""
        table = self.bpf[b"counters"]
        return [sum(v) for v in (table.getvalue(table.Key(i)) for i in range(16))]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bpf.cleanup()


def find_tracefs() -> str:
    """The tracefs mount point, mounting it at /sys/kernel/tracing when needed (root)."""
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", b"/sys/kernel/tracing", b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise EbpfStartupError(
            f"tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {os.strerror(err)}; "
            "mount it (mount -t tracefs nodev /sys/kernel/tracing) or run as root"
        )
    return "/sys/kernel/tracing"


def tracepoint_fields(tracefs: str, name: str) -> set[str] | None:
    """Field names of a tracepoint ("cat/event"), or None if the kernel lacks it."""
    try:
        with open(os.path.join(tracefs, "events", name, "format")) as f:
            text = f.read()
    except OSError:
        return None
    fields = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:"):].split(";", 1)[0]
            fields.add(decl.split()[-1].split("[")[0])
    return fields


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    cap_eff = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    cap_eff = int(line.split()[1], 16)
    except OSError:
        pass
    CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
    if cap_eff & (1 << CAP_SYS_ADMIN) or (cap_eff & (1 << CAP_BPF) and cap_eff & (1 << CAP_PERFMON)):
        return
    raise EbpfStartupError("the ebpf receiver needs root or the capabilities CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)")


def check_headers() -> None:
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(os.path.join(build, "include")):
        raise EbpfStartupError(
            f"kernel headers are missing: {build}/include does not exist; install linux-headers for this kernel "
            "(Debian: linux-headers-amd64) and link them there (see scripts/setup.sh)"
        )


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise EbpfStartupError(
            f"bcc is not importable ({exc}): install python3-bpfcc (Debian) and link /usr/lib/python3/dist-packages/bcc into the virtualenv"
        ) from None
    return bcc


def cgroup2_root() -> str | None:
    for path in CGROUP2_CANDIDATES:
        if os.path.exists(os.path.join(path, "cgroup.procs")) and os.path.exists(os.path.join(path, "cgroup.subtree_control")):
            return path
    return None


def resolve_cgroup_ids(entries: list[str]) -> list[int]:
    ids = []
    for entry in entries:
        if entry.isdigit():
            ids.append(int(entry))
            continue
        path = entry
        root = cgroup2_root()
        if not os.path.isdir(path) and root is not None:
            path = os.path.join(root, entry.lstrip("/"))
        try:
            ids.append(os.stat(path).st_ino)
        except OSError as exc:
            raise EbpfStartupError(f"filters.cgroups: cannot find cgroup {entry!r}: {exc.strerror}") from None
    return ids


def _c_prefix_test(var: str, prefixes: list[str]) -> str:
    terms = []
    for p in prefixes:
        data = p.encode()
        terms.append("(" + " && ".join(f"{var}[{i}] == {b}" for i, b in enumerate(data)) + ")")
    return " || ".join(terms) if terms else "0"


def path_filter_source(include: list[str], exclude: list[str]) -> str:
    """C for ``path_allowed(const char *p)``: straight-line compares the verifier accepts cheaply."""
    keep = _c_prefix_test("p", include) if include else "1"
    drop = _c_prefix_test("p", exclude)
    return (
        "static __always_inline int path_allowed(const char *p) {\n"
        f"    if (!({keep})) return 0;\n"
        f"    if ({drop}) return 0;\n"
        "    return 1;\n"
        "}\n"
    )


def plan(config: Config, tracefs: str) -> tuple[list[str], dict[str, str], list[str]]:
    """Which kinds run, which are off and why, and the -D flags for the kernel's tracepoints."""
    wanted = [k for k in ("process", "file", "network", "oom", "signal") if getattr(config.events, k)]
    enabled, disabled, cflags = [], {}, []
    fields: dict[str, set[str] | None] = {}

    def tp(name: str) -> set[str] | None:
        if name not in fields:
            fields[name] = tracepoint_fields(tracefs, name)
        return fields[name]

    for name in ALWAYS:
        if tp(name) is None:
            raise EbpfStartupError(f"the kernel lacks the tracepoint {name}, which every event kind needs")
    for kind in wanted:
        missing = [t for t in REQUIRED[kind] if tp(t) is None]
        if missing:
            disabled[kind] = "the kernel lacks the tracepoint " + ", ".join(missing)
        else:
            enabled.append(kind)
    if "process" in enabled:
        cflags += ["-DKIND_EXEC", "-DKIND_EXIT"]
        if tp("syscalls/sys_enter_execve") is not None:
            cflags.append("-DHAVE_EXECVE_ARGS")
            if tp("syscalls/sys_enter_execveat") is not None:
                cflags.append("-DHAVE_EXECVEAT")
        if tp("syscalls/sys_enter_exit_group") is None:
            raise EbpfStartupError("the kernel lacks syscalls/sys_enter_exit_group")
        if tp("signal/signal_deliver") is not None:
            cflags.append("-DHAVE_SIGNAL_DELIVER")
    exit_fields = tp("sched/sched_process_exit") or set()
    if "group_dead" in exit_fields:
        cflags.append("-DHAVE_GROUP_DEAD")
    if "file" in enabled:
        cflags.append("-DKIND_OPEN")
        if tp("syscalls/sys_enter_open") is not None and tp("syscalls/sys_exit_open") is not None:
            cflags.append("-DHAVE_SYS_OPEN")
    if "network" in enabled:
        cflags.append("-DKIND_TCP")
        for name, flag in (("accept4", "-DHAVE_ACCEPT4"), ("accept", "-DHAVE_ACCEPT")):
            if tp(f"syscalls/sys_enter_{name}") is not None and tp(f"syscalls/sys_exit_{name}") is not None:
                cflags.append(flag)
    if "oom" in enabled:
        cflags.append("-DKIND_OOM")
        oom = tp("oom/mark_victim") or set()
        if {"total_vm", "anon_rss", "file_rss", "shmem_rss"} <= oom:
            cflags.append("-DHAVE_OOM_RSS")
        for fname, flag in (("uid", "-DHAVE_OOM_UID"), ("pgtables", "-DHAVE_OOM_PGTABLES"), ("oom_score_adj", "-DHAVE_OOM_SCORE_ADJ")):
            if fname in oom:
                cflags.append(flag)
    if "signal" in enabled:
        cflags.append("-DKIND_SIGNAL")
    if tp("signal/signal_generate") is not None:
        cflags.append("-DHAVE_SIGNAL_GENERATE")
    return enabled, disabled, cflags


def _boot_to_unix_ns() -> int:
    """Offset from CLOCK_BOOTTIME (bpf_ktime_get_boot_ns) to unix time: the midpoint of two wall-clock reads."""
    a = time.time_ns()
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    b = time.time_ns()
    return (a + b) // 2 - boot


def _build(config: Config, self_pid: int) -> Program:
    check_privileges()
    bcc = import_bcc()
    check_headers()
    tracefs = find_tracefs()
    enabled, disabled, cflags = plan(config, tracefs)
    if not enabled:
        raise EbpfStartupError("no event kind can run on this host: " + "; ".join(f"{k}: {v}" for k, v in disabled.items()))
    f = config.filters
    cflags += [
        f"-DRINGBUF_PAGES={int(config.ring_buffer_size) // PAGE_SIZE}",
        f"-DRATE_LIMIT={int(config.rate_limit_per_cgroup)}ULL",
        f"-DMAX_TRACKED={int(config.max_tracked)}",
    ]
    if f.exclude_self:
        cflags.append(f"-DSELF_TGID={self_pid}")
    if f.container_only:
        st = os.stat("/proc/1/ns/pid")
        cflags += [f"-DFILTER_HOST_PIDNS_DEV={st.st_dev}ULL", f"-DFILTER_HOST_PIDNS_INO={st.st_ino}ULL"]
    cgroup_ids = resolve_cgroup_ids(f.cgroups)
    if cgroup_ids:
        cflags.append("-DFILTER_CGROUPS")
    if f.comms:
        cflags.append("-DFILTER_COMMS")
    source = resources.files("tapio.bpf").joinpath("ebpf_receiver.bpf.c").read_text()
    source = source.replace(
        "// ---------------------------------------------------------------- file",
        "// ---------------------------------------------------------------- file\n"
        + path_filter_source(list(f.path_prefixes), list(f.exclude_path_prefixes)),
        1,
    )
    with _COMPILE_LOCK:
        try:
            bpf = bcc.BPF(text=source.encode(), cflags=cflags)
        except Exception as exc:
            raise EbpfStartupError(f"compiling or loading the BPF program failed: {exc}") from exc
        # LLVM keeps ~100 MB after a compile; hand it back (the program is loaded)
        bpf.free_bcc_memory()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    program = Program(bpf=bpf, enabled=enabled, disabled=disabled, boot_to_unix_ns=_boot_to_unix_ns())
    try:
        if cgroup_ids:
            table = bpf[b"cgroup_filter"]
            for cid in cgroup_ids:
                table[table.Key(cid)] = table.Leaf(1)
        if f.comms:
            table = bpf[b"comm_filter"]
            for comm in f.comms:
                key = table.Key()
                key.comm = comm.encode()
                table[key] = table.Leaf(1)
    except BaseException:
        program.close()
        raise
    return program


async def open_program(config: Config) -> Program:
    """Check the host, compile (in a worker thread) and attach; the caller must `Program.close` it.

    Raises EbpfStartupError. Cancellation while compiling waits for the
    compile to end (it cannot be interrupted), then detaches.
    """
    self_pid = os.getpid()
    built: list[Program] = []

    def build() -> None:
        built.append(_build(config, self_pid))

    try:
        await trio.to_thread.run_sync(build, abandon_on_cancel=False)
    except BaseException:
        # cancelled while compiling: the compile finished, its program must not leak
        for program in built:
            program.close()
        raise
    return built[0]
