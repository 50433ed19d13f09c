"""A BPF ring buffer and per-CPU array read straight from their map fds, without bcc or libbpf.

Ring buffer layout (the kernel's Documentation/bpf/ringbuf.rst): page 0 of
the map holds ``consumer_pos`` (u64; user space writes it), page 1
``producer_pos`` (u64; read-only to user space), and the data area of
``size`` bytes (a power of two) follows, mapped twice back to back so a
record never wraps. Each record starts with an 8-byte header: u32 length
with BUSY (bit 31, still being written) and DISCARD (bit 30) flags, u32
page offset; records are 8-byte aligned. A position is an ever-growing
byte count; ``pos & (size - 1)`` is its offset in the data area.

Invariants:
- `RingBuffer.read` returns the committed records in order, stops at the
  first record still BUSY (read on the next call), skips DISCARDed ones, and
  publishes the new consumer position once per call, which frees the space
  and re-arms the kernel's wakeup (it notifies only a consumer that has
  caught up).
- Only the memory the kernel exported is touched; a corrupt length (beyond
  the data area) raises `RingBufferError` instead of reading out of bounds.
- x86-64 and arm64: the compiled reader (tapio/receivers/ebpf/_hotloop.c,
  used when built) reads positions and headers with acquire loads and
  publishes the consumer position with a release store. The Python reader
  (its fallback) uses plain loads: on x86-64 (TSO) that is an acquire; on
  arm64 the interpreter's own barriers between the loads of producer_pos,
  a header and its payload are relied upon.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def _compiled_reader():
    """The compiled reader (``_hotloop.ring_read``), or None when it is not built or assumes other header bits."""
    try:
        from . import _hotloop  # type: ignore[attr-defined]
    except ImportError:
        return None
    if getattr(_hotloop, "ASSUMES", {}).get("RINGBUF") != (BUSY_BIT, DISCARD_BIT, HEADER_SIZE):
        return None
    return _hotloop.ring_read


COMPILED_READ = _compiled_reader()


class RingBufferError(RuntimeError):
    """The ring buffer's contents are not what the kernel's layout promises."""


class RingBuffer:
    """The consumer side of one BPF_MAP_TYPE_RINGBUF map; `close` unmaps (the fd stays the caller's).

    ``compiled``: read with the compiled reader when it is built (`COMPILED_READ`); the records are the same.
    """

    def __init__(self, fd: int, size: int, *, compiled: bool = True) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, got {size}")
        page = mmap.PAGESIZE
        self._size = size
        self._mask = size - 1
        self._data = page  # offset of the data area in the producer mapping
        self._compiled = COMPILED_READ if compiled else None
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._producer = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._consumer.close()
            raise

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (headers included)."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def read(self, limit: int = 1 << 20) -> list[bytes]:
        """Every committed record (at most ``limit``), oldest first, and free their space."""
        if self._compiled is not None:
            records, bad = self._compiled(self._producer, self._consumer, self._data, self._size, limit)
            if bad >= 0:
                raise RingBufferError(f"record of {bad} bytes in a {self._size}-byte ring buffer")
            return records
        consumer, producer = self._consumer, self._producer
        unpack_u32 = _U32.unpack_from
        mask, data, size = self._mask, self._data, self._size
        cons = _U64.unpack_from(consumer, 0)[0]
        prod = _U64.unpack_from(producer, 0)[0]
        out: list[bytes] = []
        append = out.append
        start = cons
        while cons < prod and len(out) < limit:
            off = data + (cons & mask)
            length = unpack_u32(producer, off)[0]
            if length & BUSY_BIT:
                break
            n = length & ~(BUSY_BIT | DISCARD_BIT)
            if n > size - HEADER_SIZE:
                raise RingBufferError(f"record of {n} bytes in a {size}-byte ring buffer")
            if not length & DISCARD_BIT:
                append(producer[off + HEADER_SIZE : off + HEADER_SIZE + n])
            cons += (n + HEADER_SIZE + 7) & ~7
            if cons >= prod:
                prod = _U64.unpack_from(producer, 0)[0]
        if cons != start:
            _U64.pack_into(consumer, 0, cons)
        return out

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()


# -- per-CPU array maps through the bpf(2) system call

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}.get(platform.machine())
_BPF_MAP_LOOKUP_ELEM = 1


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def possible_cpus(text: str | None = None) -> int:
    """How many CPUs the kernel sizes per-CPU values for (/sys/devices/system/cpu/possible, e.g. "0-3,5")."""
    if text is None:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read()
    highest = -1
    for part in text.strip().split(","):
        if part:
            highest = max(highest, int(part.split("-")[-1]))
    return highest + 1


class PerCpuU64Array:
    """Reads a BPF_MAP_TYPE_PERCPU_ARRAY of u64 values, summed over CPUs."""

    def __init__(self, fd: int, slots: int) -> None:
        if _SYS_BPF is None:
            raise OSError(f"no bpf(2) system call number known for {platform.machine()}")
        self._fd = fd
        self._slots = slots
        self._cpus = possible_cpus()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._key = ctypes.c_uint32()
        self._values = (ctypes.c_uint64 * self._cpus)()
        self._attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(self._key), value=ctypes.addressof(self._values))

    def sums(self) -> list[int]:
        out = []
        for slot in range(self._slots):
            self._key.value = slot
            if self._libc.syscall(_SYS_BPF, _BPF_MAP_LOOKUP_ELEM, ctypes.byref(self._attr), ctypes.sizeof(self._attr)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"bpf(BPF_MAP_LOOKUP_ELEM) on slot {slot}: {os.strerror(err)}")
            out.append(sum(self._values))
        return out
