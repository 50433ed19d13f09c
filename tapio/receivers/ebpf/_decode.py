"""Raw ring-buffer events → typed records. Pure: no I/O, no clocks.

Invariants:
- The layouts here mirror the structs of tapio/bpf/ebpf_receiver.bpf.c
  byte for byte (little-endian, natural alignment); `SIZES` is checked
  against every event, so a layout drift fails loudly as `DecodeError`
  instead of yielding shifted fields.
- `parse_event` either returns a record or raises `DecodeError`; any byte
  string is a valid input.
- Strings are cut at their first NUL and decoded as UTF-8 with replacement,
  so a hostile path or comm cannot break decoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EV_EXEC, EV_EXIT, EV_OPEN, EV_TCP, EV_OOM, EV_SIGNAL = 1, 2, 3, 4, 5, 6
KIND_NAMES = {EV_EXEC: "exec", EV_EXIT: "exit", EV_OPEN: "open", EV_TCP: "tcp", EV_OOM: "oom", EV_SIGNAL: "signal"}

TCP_CONNECT, TCP_ACCEPT, TCP_CLOSE = 1, 2, 3
TCP_EVENT_NAMES = {TCP_CONNECT: "connect", TCP_ACCEPT: "accept", TCP_CLOSE: "close"}
#: include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
AF_INET, AF_INET6 = 2, 10

_HDR = struct.Struct("<QQIIII16s")
_EXEC = struct.Struct("<IIIIII256s1024s")
_EXIT = struct.Struct("<QIiiI")
_OPEN = struct.Struct("<qiIiI256s")
_TCP = struct.Struct("<QQIHHHHiiIq16s16s")
_OOM = struct.Struct("<QQQQQQIi")
_SIGNAL = struct.Struct("<iiiIiI16s")

SIZES = {
    EV_EXEC: _HDR.size + _EXEC.size,
    EV_EXIT: _HDR.size + _EXIT.size,
    EV_OPEN: _HDR.size + _OPEN.size,
    EV_TCP: _HDR.size + _TCP.size,
    EV_OOM: _HDR.size + _OOM.size,
    EV_SIGNAL: _HDR.size + _SIGNAL.size,
}


class DecodeError(ValueError):
    """Bytes that are not an event of the layout this module knows."""


def _str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(slots=True)
class Header:
    ts: int  # CLOCK_BOOTTIME ns
    cgroup_id: int
    kind: int
    pid: int
    tid: int
    uid: int
    comm: str


@dataclass(slots=True)
class ExecEvent:
    h: Header
    ppid: int
    old_pid: int
    filename: str
    argv: list[str]
    args_truncated: bool


@dataclass(slots=True)
class ExitEvent:
    h: Header
    start_ts: int  # 0 when unknown
    ppid: int
    exit_code: int  # -1 when unknown
    exit_signal: int  # 0 when not killed by a signal


@dataclass(slots=True)
class OpenEvent:
    h: Header
    ret: int
    flags: int
    mode: int
    dfd: int
    path: str


@dataclass(slots=True)
class TcpEvent:
    h: Header
    sock: int
    start_ts: int
    event: int
    family: int
    sport: int
    dport: int
    owner_known: bool
    oldstate: int
    newstate: int
    states_seen: int
    fd: int
    saddr: str
    daddr: str


@dataclass(slots=True)
class OomEvent:
    h: Header
    mark_ts: int
    total_vm_kb: int
    anon_rss_kb: int
    file_rss_kb: int
    shmem_rss_kb: int
    pgtables_kb: int
    victim_uid: int
    oom_score_adj: int


@dataclass(slots=True)
class SignalEvent:
    h: Header
    sig: int
    code: int
    result: int
    target_pid: int
    group: int
    target_comm: str


Event = ExecEvent | ExitEvent | OpenEvent | TcpEvent | OomEvent | SignalEvent


def format_address(family: int, raw: bytes) -> str:
    """An IPv4 or IPv6 address from the 16 bytes the kernel side fills (IPv4 in the first 4)."""
    if family == AF_INET:
        return "%d.%d.%d.%d" % tuple(raw[:4])
    if family == AF_INET6:
        if raw[:12] == b"\0" * 10 + b"\xff\xff":
            return "::ffff:%d.%d.%d.%d" % tuple(raw[12:16])
        return _format_v6(raw)
    return ""


def _format_v6(raw: bytes) -> str:
    groups = [(raw[i] << 8) | raw[i + 1] for i in range(0, 16, 2)]
    # RFC 5952: the longest run (>= 2) of zero groups becomes "::"
    best_start, best_len, start = -1, 1, -1
    for i, g in enumerate(groups + [1]):
        if g == 0 and start < 0:
            start = i
        elif g != 0 and start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    if best_start < 0:
        return ":".join(f"{g:x}" for g in groups)
    head = ":".join(f"{g:x}" for g in groups[:best_start])
    tail = ":".join(f"{g:x}" for g in groups[best_start + best_len:])
    return f"{head}::{tail}"


def parse_argv(raw: bytes, length: int) -> list[str]:
    """NUL-separated arguments in the first ``length`` bytes (the last may be cut)."""
    data = raw[: max(0, min(length, len(raw)))]
    if data.endswith(b"\0"):
        data = data[:-1]
    if not data:
        return []
    return [a.decode("utf-8", "replace") for a in data.split(b"\0")]


def parse_event(data: bytes) -> Event:
    """One ring-buffer record → an event record (raises DecodeError)."""
    if len(data) < _HDR.size:
        raise DecodeError(f"event of {len(data)} bytes is shorter than the {_HDR.size}-byte header")
    ts, cgroup_id, kind, pid, tid, uid, comm = _HDR.unpack_from(data, 0)
    want = SIZES.get(kind)
    if want is None:
        raise DecodeError(f"unknown event kind {kind}")
    if len(data) != want:
        raise DecodeError(f"{KIND_NAMES[kind]} event of {len(data)} bytes, expected {want}")
    h = Header(ts, cgroup_id, kind, pid, tid, uid, _str(comm))
    off = _HDR.size
    if kind == EV_OPEN:
        ret, flags, mode, dfd, _, path = _OPEN.unpack_from(data, off)
        return OpenEvent(h, ret, flags, mode, dfd, _str(path))
    if kind == EV_EXEC:
        ppid, old_pid, argv_len, argc, truncated, _, filename, argv = _EXEC.unpack_from(data, off)
        return ExecEvent(h, ppid, old_pid, _str(filename), parse_argv(argv, argv_len)[:argc] if argc else [], bool(truncated))
    if kind == EV_EXIT:
        start_ts, ppid, code, sig, _ = _EXIT.unpack_from(data, off)
        return ExitEvent(h, start_ts, ppid, code, sig)
    if kind == EV_TCP:
        sock, start_ts, event, family, sport, dport, owner, old, new, states, fd, saddr, daddr = _TCP.unpack_from(data, off)
        if event not in TCP_EVENT_NAMES:
            raise DecodeError(f"unknown tcp event {event}")
        return TcpEvent(
            h, sock, start_ts, event, family, sport, dport, bool(owner), old, new, states, fd,
            format_address(family, saddr), format_address(family, daddr),
        )
    if kind == EV_OOM:
        return OomEvent(h, *_OOM.unpack_from(data, off))
    sig, code, result, target_pid, group, _, target_comm = _SIGNAL.unpack_from(data, off)
    return SignalEvent(h, sig, code, result, target_pid, group, _str(target_comm))


def states_list(mask: int) -> list[str]:
    """State names of a ``states_seen`` bitmask, in the kernel's numbering order (a new list each call)."""
    found = _STATES_SEEN.get(mask)
    if found is None:
        found = tuple(name for num, name in TCP_STATES.items() if mask & (1 << num))
        if len(_STATES_SEEN) < 4096:
            _STATES_SEEN[mask] = found
    return list(found)


#: memo of states_list and open_flags_text: few distinct masks occur
_STATES_SEEN: dict[int, tuple[str, ...]] = {}
_FLAGS_TEXT: dict[int, str] = {}


_OPEN_ACCESS = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
_OPEN_FLAGS = [  # composite flags first: O_SYNC includes O_DSYNC, O_TMPFILE includes O_DIRECTORY
    (0o4010000, "O_SYNC"), (0o20200000, "O_TMPFILE"),
    (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"), (0o2000, "O_APPEND"),
    (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"), (0o20000, "O_ASYNC"), (0o40000, "O_DIRECT"),
    (0o100000, "O_LARGEFILE"), (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"),
    (0o2000000, "O_CLOEXEC"), (0o10000000, "O_PATH"),
]


def open_flags_text(flags: int) -> str:
    """``O_WRONLY|O_CREAT|O_TRUNC`` for x86-64/arm64 open flags."""
    found = _FLAGS_TEXT.get(flags)
    if found is None:
        found = _flags_text(flags)
        if len(_FLAGS_TEXT) < 4096:
            _FLAGS_TEXT[flags] = found
    return found


def _flags_text(flags: int) -> str:
    parts = [_OPEN_ACCESS.get(flags & 3, "O_ACCMODE")]
    rest = flags & ~3
    for bit, name in _OPEN_FLAGS:
        if rest & bit == bit:
            parts.append(name)
            rest &= ~bit
    if rest:
        parts.append(hex(rest))
    return "|".join(parts)
