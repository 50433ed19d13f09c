"""The ring buffer consumer against a memfd laid out as the kernel lays out a BPF ring buffer.

The kernel maps the data area twice back to back so a record never wraps;
the fake producer here writes the area's bytes into both copies, which is
what a reader sees from a real map. The real map is exercised by
tests/test_ebpf_kernel.py.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio.receivers.ebpf import _ringbuf
from tapio.receivers.ebpf._ringbuf import BUSY_BIT, DISCARD_BIT, HEADER_SIZE, RingBuffer, RingBufferError, possible_cpus
from tapio.testing import prereq

PAGE = mmap.PAGESIZE


class FakeRing:
    """A producer writing records into a memfd with the kernel's ring buffer layout."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("fake-ringbuf")
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.map = mmap.mmap(self.fd, 2 * PAGE + 2 * size)
        self.prod = 0

    def consumer(self) -> int:
        return struct.unpack_from("<Q", self.map, 0)[0]

    def free(self) -> int:
        return self.size - (self.prod - self.consumer())

    def _write(self, pos: int, data: bytes) -> None:
        for copy in (0, self.size):
            for i, b in enumerate(data):
                self.map[2 * PAGE + copy + ((pos + i) % self.size)] = b

    def reserve(self, payload: bytes, *, busy: bool = False, discard: bool = False) -> int | None:
        """Write one record (header then payload) and publish it; None when it does not fit."""
        total = (len(payload) + HEADER_SIZE + 7) & ~7
        if total > self.free():
            return None
        pos = self.prod
        length = len(payload) | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discard else 0)
        self._write(pos, struct.pack("<II", length, 0) + payload)
        self.prod += total
        struct.pack_into("<Q", self.map, PAGE, self.prod)
        return pos

    def commit(self, pos: int) -> None:
        """Clear the BUSY bit of the record at ``pos``."""
        off = 2 * PAGE + pos % self.size
        length = struct.unpack_from("<I", self.map, off)[0] & ~BUSY_BIT
        self._write(pos, struct.pack("<I", length))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


#: every read test runs through the compiled reader and the Python one (its fallback)
both_readers = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])


def reader_for(fake: FakeRing, compiled: bool) -> RingBuffer:
    if compiled and _ringbuf.COMPILED_READ is None:
        prereq.missing("the ebpf receiver's compiled ring buffer reader", "scripts/setup.sh builds tapio/receivers/ebpf/_hotloop.c (gcc, python3-dev)")
    reader = RingBuffer(fake.fd, fake.size, compiled=compiled)
    assert (reader._compiled is not None) == compiled
    return reader


@pytest.fixture(params=[True, False], ids=["compiled", "python"])
def ring(request):
    fake = FakeRing(4096)
    reader = reader_for(fake, request.param)
    yield fake, reader
    reader.close()
    fake.close()


RECORDS = st.lists(st.tuples(st.binary(max_size=700), st.booleans()), max_size=40)


@both_readers
@settings(max_examples=100, deadline=None)
@given(rounds=st.lists(RECORDS, min_size=1, max_size=6))
def test_reads_every_committed_record_in_order_across_wraps(rounds, compiled):
    fake = FakeRing(4096)
    reader = reader_for(fake, compiled)
    try:
        for records in rounds:
            want = []
            for payload, discard in records:
                if fake.reserve(payload, discard=discard) is None:
                    break
                if not discard:
                    want.append(payload)
            assert reader.read() == want
            assert fake.consumer() == fake.prod and reader.pending() == 0
    finally:
        reader.close()
        fake.close()


def test_a_busy_record_stops_the_read_until_committed(ring):
    fake, reader = ring
    fake.reserve(b"first")
    busy = fake.reserve(b"second", busy=True)
    fake.reserve(b"third")
    assert reader.read() == [b"first"]
    assert reader.read() == []
    fake.commit(busy)
    assert reader.read() == [b"second", b"third"]


def test_limit_leaves_the_rest_for_the_next_read(ring):
    fake, reader = ring
    for i in range(5):
        fake.reserve(bytes([i]) * 3)
    assert reader.read(limit=2) == [b"\0" * 3, b"\1" * 3]
    assert reader.read() == [b"\2" * 3, b"\3" * 3, b"\4" * 3]


def test_a_corrupt_length_raises_instead_of_reading_out_of_bounds(ring):
    fake, reader = ring
    fake.reserve(b"x")
    struct.pack_into("<I", fake.map, 2 * PAGE, fake.size)  # longer than the data area
    with pytest.raises(RingBufferError):
        reader.read()
    assert fake.consumer() == 0, "nothing is freed past a corrupt length"


def test_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        RingBuffer(-1, 3000)


@pytest.mark.parametrize(("text", "cpus"), [("0\n", 1), ("0-1\n", 2), ("0-3,5\n", 6), ("0,2-7", 8)])
def test_possible_cpus(text, cpus):
    assert possible_cpus(text) == cpus
