"""Finding out what this host supports, then compiling and attaching the BPF program.

Invariants:
- Every startup problem is an `EbpfStartupError` whose message says what is
  missing and how to fix it (not root, no bcc, no kernel headers, no
  tracefs); a missing tracepoint only disables the event kinds that need it,
  and `Program.disabled` says which and why.
- bcc is never imported in this process: a short-lived child (`_compile`)
  compiles, loads and attaches, and hands back the fds of the attachments
  (perf events), the ring buffer and the loss counters. The agent keeps
  neither bcc's ~60 MB of mapped libraries nor LLVM's heap. Waiting for the
  child is an ordinary trio wait: no thread, and a cancelled start kills
  the child, which frees whatever it had loaded.
- `Program.close` closes every fd, which detaches every probe and frees
  every map; it is safe to call twice.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

import trio

from ._config import PAGE_SIZE, Config
from ._decode import layout_problems
from ._ringbuf import PerCpuU64Array, RingBuffer

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
#: kernel features the program uses where the kernel has them (the helper
#: compiles again without a feature that fails to load): name -> -D flag
OPTIONAL_FEATURES = {
    # a syscall's pending arguments kept in the thread itself instead of a
    # hash keyed by thread id: cheaper per open and accept (Linux 6.2+)
    "task_storage": "-DHAVE_TASK_STORAGE",
}


class EbpfStartupError(RuntimeError):
    """The receiver cannot run on this host; the message says why and what to do."""


@dataclass
class Program:
    """A loaded, attached program: the fds that keep it so, and what it was built with."""

    #: the ring buffer map's fd (wait on it for readability) and its data size
    ring_fd: int
    ring_size: int
    counters_fd: int
    counter_slots: int
    #: perf-event fds of the attached tracepoints: closing them detaches
    link_fds: list[int]
    enabled: list[str]
    #: event kind -> why it is off on this host
    disabled: dict[str, str] = field(default_factory=dict)
    #: CLOCK_BOOTTIME ns + this = unix ns
    boot_to_unix_ns: int = 0
    #: optional kernel features (OPTIONAL_FEATURES): True, or why not
    features: dict[str, object] = field(default_factory=dict)
    _closed: bool = False
    _ring: RingBuffer | None = None
    _counters: PerCpuU64Array | None = None

    def ring(self) -> RingBuffer:
        """The ring buffer's consumer, mapped on first use."""
        if self._ring is None:
            self._ring = RingBuffer(self.ring_fd, self.ring_size)
        return self._ring

    def counters(self) -> list[int]:
        """The kernel's counter slots summed over CPUs (see CNT_* in the C source)."""
        if self._counters is None:
            self._counters = PerCpuU64Array(self.counters_fd, self.counter_slots)
        return self._counters.sums()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._ring.close()
        for fd in [*self.link_fds, self.ring_fd, self.counters_fd]:
            try:
                os.close(fd)
            except OSError:
                pass


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


#: capability numbers (linux/capability.h) the BPF receivers check for
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def effective_capabilities(status: str = "/proc/self/status") -> set[str] | None:
    """The names in `CAPABILITIES` this process holds (its CapEff), or None if it cannot be read.

    Checked whatever the uid: in a container uid 0 holds only the
    capabilities the pod grants (a DaemonSet adds BPF and PERFMON, not all).
    """
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    mask = int(line.split()[1], 16)
                    return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}
    except (OSError, ValueError, IndexError):
        pass
    return None


def missing_capabilities(*needed: str, status: str = "/proc/self/status") -> list[str]:
    """Of ``needed`` (CAP_BPF, CAP_PERFMON, ...), those this process lacks; none when it holds CAP_SYS_ADMIN.

    CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON (kernels before 5.8
    have only it), never for CAP_NET_ADMIN. An unreadable CapEff gives no
    verdict: the kernel's own answer will say.
    """
    held = effective_capabilities(status)
    if held is None:
        return []
    covered = {"CAP_BPF", "CAP_PERFMON"} if "CAP_SYS_ADMIN" in held else set()
    return [cap for cap in needed if cap not in held and cap not in covered]


def check_privileges() -> None:
    missing = missing_capabilities("CAP_BPF", "CAP_PERFMON")
    if missing:
        raise EbpfStartupError(
            f"the ebpf receiver needs the capabilities CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), and this process lacks {', '.join(missing)}; "
            "run as root, or in a pod add them: securityContext.capabilities.add: [BPF, PERFMON]"
        )


def check_headers() -> None:
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.isdir(os.path.join(build, "include")):
        raise EbpfStartupError(
            f"kernel headers are missing: {build}/include does not exist; install linux-headers for this kernel "
            "(Debian: linux-headers-amd64) and link them there (see scripts/setup.sh)"
        )


def check_bcc() -> None:
    """bcc must be importable by the compile helper (this process never imports it)."""
    if importlib.util.find_spec("bcc") is None:
        raise EbpfStartupError(
            "bcc is not importable: install python3-bpfcc (Debian) and link /usr/lib/python3/dist-packages/bcc into the virtualenv"
        )


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


#: the line of the BPF source that `prepare` replaces with `path_filter_source`'s function
PATH_FILTER_PLACEHOLDER = "@PATH_FILTER@"


def program_source() -> str:
    """The BPF C source as shipped (tapio/bpf/ebpf_receiver.bpf.c), placeholders unfilled."""
    return resources.files("tapio.bpf").joinpath("ebpf_receiver.bpf.c").read_text()


def splice(source: str, placeholder: str, text: str) -> str:
    """``source`` with the one line that is exactly ``placeholder`` replaced by ``text``.

    Raises ValueError unless there is exactly one such line, so a renamed or
    duplicated placeholder fails at start instead of compiling a program
    without its filter.
    """
    lines = source.split("\n")
    at = [i for i, line in enumerate(lines) if line.strip() == placeholder]
    if len(at) != 1:
        raise ValueError(f"the BPF source must hold the placeholder line {placeholder!r} exactly once, found {len(at)}")
    lines[at[0]] = text.rstrip("\n")
    return "\n".join(lines)


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


def host_pid_namespace() -> os.stat_result:
    """The host's PID namespace (nsfs device and inode), which container_only keeps events outside of.

    That of pid 1 where it can be read; where it cannot (a sandbox that hides
    pid 1), the agent's own, which is the host's when it runs with hostPID
    as a node agent must.
    """
    try:
        return os.stat("/proc/1/ns/pid")
    except OSError:
        pass
    try:
        return os.stat("/proc/self/ns/pid")
    except OSError as exc:
        raise EbpfStartupError(f"filters.container_only needs the host's PID namespace, but neither /proc/1/ns/pid nor /proc/self/ns/pid can be read: {exc.strerror}") from None


def prepare(config: Config, self_pid: int) -> tuple[dict, list[str], dict[str, str]]:
    """Check the host and write the compile request: (request, enabled kinds, disabled kinds and why)."""
    check_privileges()
    check_bcc()
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
        st = host_pid_namespace()
        cflags += [f"-DFILTER_HOST_PIDNS_DEV={st.st_dev}ULL", f"-DFILTER_HOST_PIDNS_INO={st.st_ino}ULL"]
    cgroup_ids = resolve_cgroup_ids(f.cgroups)
    if cgroup_ids:
        cflags.append("-DFILTER_CGROUPS")
    if f.comms:
        cflags.append("-DFILTER_COMMS")
    source = splice(program_source(), PATH_FILTER_PLACEHOLDER, path_filter_source(list(f.path_prefixes), list(f.exclude_path_prefixes)))
    request = {
        "source": source,
        "cflags": cflags,
        "optional": dict(OPTIONAL_FEATURES),
        "cgroup_ids": cgroup_ids,
        "comms": list(f.comms),
        "describe": [EVENT_LAYOUT_MAP],
    }
    return request, enabled, disabled


#: the most fds the helper may hand back (two maps and one per tracepoint)
MAX_HANDED_FDS = 64
#: the map whose value type is `union any_event`: its layout is checked against _decode's
EVENT_LAYOUT_MAP = "scratch"
#: how long the helper may take to exit once it has answered (it exits at once) or been killed
HELPER_EXIT_SECONDS = 5.0


def helper_path() -> str:
    """The compile helper script (`_compile`), run by file path so that it imports only the standard library and bcc."""
    return str(resources.files("tapio.receivers.ebpf").joinpath("_compile.py"))


def check_layouts(answer: dict) -> None:
    """Raise EbpfStartupError unless the compiled event structs are laid out as _decode reads them."""
    layout = answer.get("layouts", {}).get(EVENT_LAYOUT_MAP)
    if layout is None:
        raise EbpfStartupError(f"the BPF compile helper did not report the layout of the {EVENT_LAYOUT_MAP} map's events")
    problems = layout_problems(layout)
    if problems:
        raise EbpfStartupError(
            "the BPF program's event structs differ from what tapio/receivers/ebpf/_decode.py reads "
            "(keep them equal to tapio/bpf/ebpf_receiver.bpf.c): " + " | ".join(problems)
        )


async def run_compile_helper(request: dict, *, max_fds: int = MAX_HANDED_FDS) -> tuple[dict, list[int]]:
    """Run the compile helper (`_compile`) on one request; returns its answer and the fds it handed over.

    The caller owns the fds (close them). Raises EbpfStartupError with the
    helper's message when it answers an error or dies. Cancellation kills
    the child; whatever it had loaded goes with it.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds: list[int] = []
    handed = False
    proc = None
    try:
        with theirs:
            proc = await trio.lowlevel.open_process(
                [sys.executable, helper_path(), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        ours.setblocking(False)
        ours.send(json.dumps(request).encode())
        while True:
            await trio.lowlevel.wait_readable(ours)
            try:
                msg, fds, flags, _ = socket.recv_fds(ours, 1 << 16, max_fds)
            except BlockingIOError:
                continue
            break
        if not msg:
            code = await proc.wait()
            raise EbpfStartupError(f"the BPF compile helper exited ({code}) without an answer; its errors are on stderr")
        if flags & socket.MSG_CTRUNC:
            raise EbpfStartupError(f"the BPF compile helper handed back more than {max_fds} fds")
        answer = json.loads(msg)
        if "error" in answer:
            raise EbpfStartupError(answer["error"])
        handed = True
        return answer, fds
    finally:
        ours.close()
        if not handed:
            for fd in fds:
                os.close(fd)
        if proc is not None:
            await _reap(proc, kill=not handed)


async def open_program(config: Config) -> Program:
    """Check the host, compile and attach in a child process; the caller must `Program.close` it.

    Raises EbpfStartupError. Cancellation kills the child; whatever it had
    loaded goes with it.
    """
    request, enabled, disabled = prepare(config, os.getpid())
    answer, fds = await run_compile_helper(request)
    try:
        check_layouts(answer)
        return Program(
            ring_fd=fds[answer["maps"]["events"]],
            ring_size=answer["ring_size"],
            counters_fd=fds[answer["maps"]["counters"]],
            counter_slots=answer["counter_slots"],
            link_fds=[fds[i] for i in answer["links"]],
            enabled=enabled,
            disabled=disabled,
            boot_to_unix_ns=_boot_to_unix_ns(),
            features=answer.get("features", {}),
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


async def _reap(proc: trio.Process, *, kill: bool) -> None:
    """Wait for the helper to exit, shielded but bounded: one that has not exited in time is killed and waited for again."""
    with trio.CancelScope(shield=True):
        if kill and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        with trio.move_on_after(HELPER_EXIT_SECONDS):
            await proc.wait()
            return
        proc.send_signal(signal.SIGKILL)
        with trio.move_on_after(HELPER_EXIT_SECONDS):
            await proc.wait()
