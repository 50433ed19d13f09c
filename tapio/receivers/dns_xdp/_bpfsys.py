"""The few bpf(2) commands the agent needs beyond the ring buffer, through ctypes (no bcc in the agent); and a timerfd.

- `HashMap`: batch reads and single deletes of a hash map (the queries the
  kernel waits on), so the sweeper can expire them.
- `prog_name_by_id` and `held_prog_ids`: to tell a stale attachment (its
  loader gone) from a live one, by the program's name and by whether any
  process still holds a descriptor of it.
- `Ticker`: a periodic timerfd(2), which paces the drains (Python 3.11's
  os module has no timerfd).

Invariants: every call either succeeds or raises OSError naming the
command; no memory outside buffers owned here is touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}.get(platform.machine())
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
#: offsets in struct bpf_prog_info (include/uapi/linux/bpf.h)
_PROG_INFO_ID = 4
_PROG_INFO_NAME = 64
_PROG_INFO_SIZE = 80
BPF_OBJ_NAME_LEN = 16

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    if _SYS_BPF is None:
        raise OSError(errno.ENOSYS, f"no bpf(2) system call number known for {platform.machine()}")
    return _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class HashMap:
    """A hash map read in batches of ``chunk`` entries (BPF_MAP_LOOKUP_BATCH, Linux 5.6+)."""

    def __init__(self, fd: int, key_size: int, value_size: int, chunk: int = 1024) -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        # a hash map's batch position is a bucket number (u32)
        self._in = ctypes.c_uint32()
        self._out = ctypes.c_uint32()
        self._key = ctypes.create_string_buffer(key_size)
        self._alloc(chunk)

    def _alloc(self, chunk: int) -> None:
        self._chunk = chunk
        self._keys = ctypes.create_string_buffer(self.key_size * chunk)
        self._values = ctypes.create_string_buffer(self.value_size * chunk)

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) now in the map (entries added or removed meanwhile may or may not be in it)."""
        out: list[tuple[bytes, bytes]] = []
        attr = _BatchAttr(map_fd=self.fd, keys=ctypes.addressof(self._keys), values=ctypes.addressof(self._values))
        first = True
        while True:
            attr.in_batch = 0 if first else ctypes.addressof(self._in)
            attr.out_batch = ctypes.addressof(self._out)
            attr.count = self._chunk
            rc = _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            err = ctypes.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                if err == errno.ENOSPC and self._chunk < 1 << 20:  # one bucket holds more than a chunk
                    self._alloc(self._chunk * 4)
                    return self.items()
                raise OSError(err, f"bpf(BPF_MAP_LOOKUP_BATCH): {os.strerror(err)}")
            keys, values = self._keys.raw, self._values.raw
            ks, vs = self.key_size, self.value_size
            for i in range(attr.count):
                out.append((keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]))
            if rc != 0:  # ENOENT: that was the last batch
                return out
            self._in.value = self._out.value
            first = False

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False if it was not there (someone else removed it first)."""
        self._key.raw = key
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(self._key))
        if _bpf(BPF_MAP_DELETE_ELEM, attr) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"bpf(BPF_MAP_DELETE_ELEM): {os.strerror(err)}")


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of the program behind ``fd``."""
    buf = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = _InfoAttr(bpf_fd=fd, info_len=_PROG_INFO_SIZE, info=ctypes.addressof(buf))
    if _bpf(BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(BPF_OBJ_GET_INFO_BY_FD): {os.strerror(err)}")
    raw = buf.raw
    prog_id = int.from_bytes(raw[_PROG_INFO_ID : _PROG_INFO_ID + 4], "little")
    name = raw[_PROG_INFO_NAME : _PROG_INFO_NAME + BPF_OBJ_NAME_LEN].split(b"\0", 1)[0].decode(errors="replace")
    return prog_id, name


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of the loaded program ``prog_id``, or None if it is gone."""
    attr = _GetIdAttr(id=prog_id)
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise OSError(err, f"bpf(BPF_PROG_GET_FD_BY_ID, {prog_id}): {os.strerror(err)}")
    try:
        return prog_info(fd)[1]
    finally:
        os.close(fd)


def held_prog_ids(proc: str = "/proc") -> set[int]:
    """Ids of the BPF programs some process holds a descriptor of (as far as this PID namespace shows).

    Reads /proc/*/fdinfo only for descriptors that are BPF programs. A
    program referenced only by an interface attachment is not in the set:
    its loader is gone.
    """
    held: set[int] = set()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return held
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"{proc}/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            held.add(int(line.split()[1]))
                            break
            except (OSError, ValueError):
                continue
    return held


# -- a timer to pace the drains

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK, _TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Ticker:
    """A periodic CLOCK_MONOTONIC timerfd(2): readable each time a period has passed, until `stop`.

    Why: under trio, waiting for an fd to become readable costs ~100 µs of CPU
    less a wakeup than ``trio.sleep`` (no cancel scope or deadline to set up);
    the receiver wakes once a drain, so that is most of what it spends at low rates.
    """

    def __init__(self) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def _set(self, seconds: float) -> None:
        ns = max(0, round(seconds * 1e9))
        t = _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(_Itimerspec(t, t)), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def start(self, period: float) -> None:
        """Tick every ``period`` seconds (> 0) from now on."""
        self._set(period)

    def stop(self) -> None:
        self._set(0)
        self.ticks()

    def ticks(self) -> int:
        """Periods passed since the last call (0 if none), which makes the fd unreadable again."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)
