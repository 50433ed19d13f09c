"""Raw ring-buffer events → typed records. Pure: no I/O, no clocks.

Invariants:
- `LAYOUTS` mirrors the event structs of tapio/bpf/ebpf_receiver.bpf.c field
  by field (little-endian, natural alignment). The sizes are checked against
  every event; at start the compile helper reports each field's offset as
  the compiler laid it out and `layout_problems` compares them, so a drift,
  even a swap of two fields of one size, stops the start instead of
  yielding shifted fields.
- `parse_event` either returns a record or raises `DecodeError`; any byte
  string is a valid input.
- Strings are cut at their first NUL and decoded as UTF-8 with replacement,
  so a hostile path or comm cannot break decoding.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from functools import cached_property

EV_EXEC, EV_EXIT, EV_OPEN, EV_TCP, EV_OOM, EV_SIGNAL = 1, 2, 3, 4, 5, 6
KIND_NAMES = {EV_EXEC: "exec", EV_EXIT: "exit", EV_OPEN: "open", EV_TCP: "tcp", EV_OOM: "oom", EV_SIGNAL: "signal"}

TCP_CONNECT, TCP_ACCEPT, TCP_CLOSE = 1, 2, 3
TCP_EVENT_NAMES = {TCP_CONNECT: "connect", TCP_ACCEPT: "accept", TCP_CLOSE: "close"}
#: include/net/tcp_states.h
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_CLOSED = 1, 2, 3, 7
TCP_STATES = {
    TCP_ESTABLISHED: "ESTABLISHED", TCP_SYN_SENT: "SYN_SENT", TCP_SYN_RECV: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", TCP_CLOSED: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
#: the kernel's address families (Linux numbers, as the socket module has them on Linux)
AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
#: open(2) flags of x86-64 and arm64 (include/uapi/asm-generic/fcntl.h)
O_CREAT = 0o100
#: the dfd of open(2), which is openat(AT_FDCWD, ...) (include/uapi/linux/fcntl.h)
AT_FDCWD = -100

#: struct format codes -> (size, alignment); arrays ("16s") align as bytes
_CODES = {"Q": 8, "q": 8, "I": 4, "i": 4, "H": 2, "h": 2, "B": 1}


@dataclass(frozen=True)
class Layout:
    """A C struct as read here: fields in order as (name, struct code); offsets follow natural alignment.

    A nested struct's fields are named ``member.field`` (``h.pid``), as
    `layout_problems` compares them.
    """

    name: str
    fields: tuple[tuple[str, str], ...]

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """Field name -> (offset, size)."""
        out, off = {}, 0
        for name, code in self.fields:
            size, align = _size_align(code)
            off = (off + align - 1) // align * align
            out[name] = (off, size)
            off += size
        return out

    @cached_property
    def size(self) -> int:
        align = max(_size_align(code)[1] for _, code in self.fields)
        end = max(off + size for off, size in self.offsets.values())
        return (end + align - 1) // align * align

    @cached_property
    def struct(self) -> struct.Struct:
        """All fields in order (padding as ``x``), for one ``unpack_from`` of the whole event."""
        fmt, at = "<", 0
        for name, code in self.fields:
            off, size = self.offsets[name]
            fmt += "x" * (off - at) + code
            at = off + size
        return struct.Struct(fmt + "x" * (self.size - at))


def _size_align(code: str) -> tuple[int, int]:
    if code.endswith("s"):
        return int(code[:-1] or 1), 1
    return _CODES[code], _CODES[code]


def _nested(member: str, fields: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{member}.{name}", code) for name, code in fields)


_HDR_FIELDS = (("ts", "Q"), ("cgroup_id", "Q"), ("kind", "I"), ("pid", "I"), ("tid", "I"), ("uid", "I"), ("comm", "16s"))
HDR = Layout("hdr", _HDR_FIELDS)
_H = _nested("h", _HDR_FIELDS)
EXEC = Layout("exec_event", _H + (
    ("ppid", "I"), ("old_pid", "I"), ("argv_len", "I"), ("argc", "I"), ("args_truncated", "I"), ("pad", "I"),
    ("filename", "256s"), ("argv", "1024s"),
))
EXIT = Layout("exit_event", _H + (("start_ts", "Q"), ("ppid", "I"), ("exit_code", "i"), ("exit_signal", "i"), ("pad", "I")))
OPEN = Layout("open_event", _H + (("ret", "q"), ("flags", "i"), ("mode", "I"), ("dfd", "i"), ("pad", "I"), ("path", "256s")))
TCP = Layout("tcp_event", _H + (
    ("sock", "Q"), ("start_ts", "Q"), ("event", "I"), ("family", "H"), ("sport", "H"), ("dport", "H"), ("owner_known", "H"),
    ("oldstate", "i"), ("newstate", "i"), ("states_seen", "I"), ("fd", "q"), ("saddr", "16s"), ("daddr", "16s"),
))
OOM = Layout("oom_event", _H + (
    ("mark_ts", "Q"), ("total_vm_kb", "Q"), ("anon_rss_kb", "Q"), ("file_rss_kb", "Q"), ("shmem_rss_kb", "Q"),
    ("pgtables_kb", "Q"), ("victim_uid", "I"), ("oom_score_adj", "i"),
))
SIGNAL = Layout("signal_event", _H + (
    ("sig", "i"), ("code", "i"), ("result", "i"), ("target_pid", "I"), ("group", "i"), ("pad", "I"), ("target_comm", "16s"),
))

#: event kind -> its layout
LAYOUTS = {EV_EXEC: EXEC, EV_EXIT: EXIT, EV_OPEN: OPEN, EV_TCP: TCP, EV_OOM: OOM, EV_SIGNAL: SIGNAL}
#: the members of the C source's `union any_event` (the leaf of its `scratch` map) -> layout
UNION_MEMBERS = {"exec": EXEC, "exit": EXIT, "open": OPEN, "tcp": TCP, "oom": OOM, "sig": SIGNAL}
SIZES = {kind: layout.size for kind, layout in LAYOUTS.items()}
_HDR = HDR.struct
_HEADER_SIZE = HDR.size


def layout_problems(reported: dict) -> list[str]:
    """What differs between the compiled program's `union any_event` and `UNION_MEMBERS`; empty when they agree.

    ``reported`` is the compile helper's layout of that union (see
    _compile's ``describe``): ``members`` maps each member to its size and
    ``fields`` each field, flattened (``tcp.h.pid``, ``tcp.sport``), to
    ``[offset, size]`` as the compiler laid it out; fields whose name starts
    with ``__pad`` are implicit padding and not compared. One message per
    struct, naming every field that differs.
    """
    problems = []
    fields, sizes = reported.get("fields", {}), reported.get("members", {})
    for member, layout in UNION_MEMBERS.items():
        theirs = {k[len(member) + 1:]: tuple(v) for k, v in fields.items() if k.startswith(member + ".") and "__pad" not in k}
        ours = layout.offsets
        diffs = []
        if member not in sizes:
            diffs.append(f"the program's union has no member {member}")
        elif sizes[member] != layout.size:
            diffs.append(f"{sizes[member]} bytes in the program, {layout.size} here")
        for name, (off, size) in ours.items():
            got = theirs.get(name)
            if got is None:
                diffs.append(f"{name} is missing from the program")
            elif got != (off, size):
                diffs.append(f"{name} is at offset {got[0]} ({got[1]} bytes) in the program, at {off} ({size} bytes) here")
        diffs += [f"{name} (offset {theirs[name][0]}) is in the program but not read here" for name in theirs if name not in ours]
        if diffs:
            problems.append(f"struct {layout.name}: " + "; ".join(diffs))
    return problems


class DecodeError(ValueError):
    """Bytes that are not an event of the layout this module knows; ``reason`` is one of `BAD_REASONS`."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


#: why a record did not decode (the label of tapio_bad_input_total)
BAD_REASONS = ("short_event", "unknown_event_kind", "wrong_event_size", "unknown_tcp_event")


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
    if len(data) < _HEADER_SIZE:
        raise DecodeError(f"event of {len(data)} bytes is shorter than the {_HEADER_SIZE}-byte header", "short_event")
    kind = _U32.unpack_from(data, 16)[0]
    layout = LAYOUTS.get(kind)
    if layout is None:
        raise DecodeError(f"unknown event kind {kind}", "unknown_event_kind")
    if len(data) != layout.size:
        raise DecodeError(f"{KIND_NAMES[kind]} event of {len(data)} bytes, expected {layout.size}", "wrong_event_size")
    ts, cgroup_id, kind, pid, tid, uid, comm, *rest = layout.struct.unpack_from(data, 0)
    h = Header(ts, cgroup_id, kind, pid, tid, uid, _str(comm))
    if kind == EV_OPEN:
        ret, flags, mode, dfd, _, path = rest
        return OpenEvent(h, ret, flags, mode, dfd, _str(path))
    if kind == EV_EXEC:
        ppid, old_pid, argv_len, argc, truncated, _, filename, argv = rest
        return ExecEvent(h, ppid, old_pid, _str(filename), parse_argv(argv, argv_len)[:argc] if argc else [], bool(truncated))
    if kind == EV_EXIT:
        start_ts, ppid, code, sig, _ = rest
        return ExitEvent(h, start_ts, ppid, code, sig)
    if kind == EV_TCP:
        sock, start_ts, event, family, sport, dport, owner, old, new, states, fd, saddr, daddr = rest
        if event not in TCP_EVENT_NAMES:
            raise DecodeError(f"unknown tcp event {event}", "unknown_tcp_event")
        return TcpEvent(
            h, sock, start_ts, event, family, sport, dport, bool(owner), old, new, states, fd,
            format_address(family, saddr), format_address(family, daddr),
        )
    if kind == EV_OOM:
        return OomEvent(h, *rest)
    sig, code, result, target_pid, group, _, target_comm = rest
    return SignalEvent(h, sig, code, result, target_pid, group, _str(target_comm))


_U32 = struct.Struct("<I")
#: event size -> (kind, unpack of its whole layout): every kind has a size of its own
_BY_SIZE = {layout.size: (kind, layout.struct.unpack) for kind, layout in LAYOUTS.items()}
assert len(_BY_SIZE) == len(LAYOUTS), "two event kinds of one size: decode_drain needs the kind field first"
#: where the tcp sub-event is in a tcp event's field tuple
_TCP_EVENT = [name for name, _ in TCP.fields].index("event")


def decode_drain(raws: list[bytes]) -> tuple[list[tuple], dict[str, int]]:
    """Each record as its layout's field tuple (`LAYOUTS`, header fields first; strings still raw), and the rest counted by reason.

    Accepts exactly what `parse_event` accepts; the fast path of a drain,
    which leaves string decoding to whoever needs the text.
    """
    out: list[tuple] = []
    bad: dict[str, int] = {}
    append, by_size = out.append, _BY_SIZE
    for raw in raws:
        found = by_size.get(len(raw))
        if found is not None:
            kind, unpack = found
            fields = unpack(raw)
            if fields[2] == kind and (kind != EV_TCP or fields[_TCP_EVENT] in TCP_EVENT_NAMES):
                append(fields)
                continue
        try:
            parse_event(raw)
        except DecodeError as exc:
            bad[exc.reason] = bad.get(exc.reason, 0) + 1
        else:  # pragma: no cover - the two decoders accept the same bytes (tested)
            raise AssertionError("decode_drain refused an event parse_event accepts")
    return out, bad


def bad_reasons(raws: list[bytes]) -> dict[str, int]:
    """Records `parse_event` refuses, counted by reason (every one of ``raws`` must be refused)."""
    bad: dict[str, int] = {}
    for raw in raws:
        try:
            parse_event(raw)
        except DecodeError as exc:
            bad[exc.reason] = bad.get(exc.reason, 0) + 1
        else:
            raise AssertionError("a record the drain check refused decodes")
    return bad


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
    (O_CREAT, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"), (0o2000, "O_APPEND"),
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
