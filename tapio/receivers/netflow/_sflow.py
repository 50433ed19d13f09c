"""sFlow version 5 datagrams to events. Sans-IO, like `_parser`.

Invariants:
- A flow sample becomes one record of the fixed layout `FLOW_LAYOUT` (IANA
  element numbers, so the receiver builds it like any NetFlow record): the
  5-tuple, lengths, VLANs, MACs and TCP flags come from the sampled packet's
  raw header (Ethernet with up to two VLAN tags, IPv4, IPv6 with its
  extension headers, TCP, UDP, ICMP), or from the sampled IPv4/IPv6 data
  and extended switch/router/gateway records when the agent sends those.
  Values the sample does not carry are None.
- ``flow.io.bytes`` is the sampled frame's length (0 if no record gives it)
  and packets 1, as sent; the sampling rate travels with the record.
- A counter sample's generic interface counters become one
  `InterfaceCounters` event; other counter records are skipped.
- Sessions are keyed by the agent address in the datagram (not the UDP
  source) and the sub-agent id; sequence numbers count datagrams.
- Every read is bounds-checked: a length that runs past its container ends
  the datagram in `MalformedError` (the `Collector` turns it into a
  `Malformed` event after what decoded).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _ie
from ._templates import Column, MalformedError

if TYPE_CHECKING:
    from ._parser import Collector, Event

#: the session "version" of sFlow v5 (NetFlow v5 is 5)
SFLOW = 5005
#: most samples and records a datagram may declare (a 64 KiB datagram cannot hold more)
MAX_SAMPLES = 4096
#: the kind of an address column that is IPv4 or IPv6 by its length
IP = "ip"

_U32 = struct.Struct("!I")
_HEADER_TAIL = struct.Struct("!IIII")  # sub-agent, sequence, uptime, samples
_FLOW_SAMPLE = struct.Struct("!IIIIIIII")
_FLOW_SAMPLE_EXPANDED = struct.Struct("!IIIIIIIIIII")
_COUNTER_SAMPLE = struct.Struct("!III")
_COUNTER_SAMPLE_EXPANDED = struct.Struct("!IIII")
_RAW_HEADER = struct.Struct("!IIII")
_GENERIC_COUNTERS = struct.Struct("!IIQIIQIIIIIIQIIIIII")  # 88 bytes
_IPV4_DATA = struct.Struct("!II4s4sIIII")
_IPV6_DATA = struct.Struct("!II16s16sIIII")
_SWITCH = struct.Struct("!IIII")

# header protocols (sFlow v5 §5.2, "header_protocol")
_ETHERNET, _IPV4_HEADER, _IPV6_HEADER = 1, 11, 12


class _Layout:
    """A fixed record layout with the interface of a template's decoder (columns only)."""

    def __init__(self, layout_id: int, columns: tuple[Column, ...]) -> None:
        self.id = layout_id
        self.options = False
        self.scope_count = 0
        self.decoder = self
        self.columns = columns
        #: values may be None (absent from the sample)
        self.sparse = True


def _col(eid: int, kind: str, length: int = 4, is_int: bool = True) -> Column:
    return Column(eid, 0, length, kind, is_int)


FLOW_COLUMNS = (
    _col(8, IP, 0, False), _col(12, IP, 0, False), _col(60, _ie.UNSIGNED, 1), _col(4, _ie.UNSIGNED, 1),
    _col(7, _ie.UNSIGNED, 2), _col(11, _ie.UNSIGNED, 2), _col(6, _ie.UNSIGNED, 2), _col(5, _ie.UNSIGNED, 1),
    _col(1, _ie.UNSIGNED, 8), _col(2, _ie.UNSIGNED, 8), _col(10, _ie.UNSIGNED), _col(14, _ie.UNSIGNED),
    _col(58, _ie.UNSIGNED, 2), _col(59, _ie.UNSIGNED, 2), _col(56, _ie.MAC, 6, False), _col(80, _ie.MAC, 6, False),
    _col(34, _ie.UNSIGNED), _col(15, IP, 0, False), _col(16, _ie.UNSIGNED), _col(17, _ie.UNSIGNED),
    _col(9, _ie.UNSIGNED, 1), _col(13, _ie.UNSIGNED, 1), _col(32, _ie.UNSIGNED, 2),
)
FLOW_LAYOUT = _Layout(1, FLOW_COLUMNS)
(C_SRC, C_DST, C_IPV, C_PROTO, C_SPORT, C_DPORT, C_FLAGS, C_TOS, C_BYTES, C_PACKETS, C_IN, C_OUT, C_SVLAN, C_DVLAN,
 C_SMAC, C_DMAC, C_RATE, C_NEXTHOP, C_SAS, C_DAS, C_SMASK, C_DMASK, C_ICMP) = range(len(FLOW_COLUMNS))


@dataclass(slots=True)
class InterfaceCounters:
    """An sFlow counter sample's generic interface counters (cumulative, as the agent counts them)."""

    session: Any
    if_index: int
    if_speed: int
    in_octets: int
    in_packets: int
    in_discards: int
    in_errors: int
    out_octets: int
    out_packets: int
    out_discards: int
    out_errors: int


def parse_sflow(collector: "Collector", data: bytes, events: list["Event"]) -> None:
    """Decode one sFlow v5 datagram into ``events`` (raises MalformedError; see the module invariants)."""
    from ._parser import DataRecords, Export

    end = len(data)
    if end < 8:
        raise MalformedError("truncated_header", f"an sFlow header needs at least 28 bytes, the datagram has {end}")
    (addr_type,) = _U32.unpack_from(data, 4)
    if addr_type == 1:
        agent, pos = socket.inet_ntop(socket.AF_INET, _take(data, 8, 4, end)), 12
    elif addr_type == 2:
        agent, pos = socket.inet_ntop(socket.AF_INET6, _take(data, 8, 16, end)), 24
    else:
        raise MalformedError("bad_address", f"sFlow agent address type {addr_type} is neither IPv4 (1) nor IPv6 (2)")
    if end - pos < 16:
        raise MalformedError("truncated_header", f"the sFlow header is cut at byte {end}")
    sub_agent, sequence, uptime, samples = _HEADER_TAIL.unpack_from(data, pos)
    pos += 16
    if samples > MAX_SAMPLES:
        raise MalformedError("bad_count", f"the sFlow datagram declares {samples} samples")
    session = collector.session(agent, SFLOW, sub_agent)
    collector._sequence(session, sequence, 1, events)
    export = Export(SFLOW, sequence, 0, None)
    rows: list[tuple] = []
    try:
        for _ in range(samples):
            if end - pos < 8:
                raise MalformedError("truncated_sample", f"sample header cut at byte {pos}")
            fmt, length = struct.unpack_from("!II", data, pos)
            start, pos = pos + 8, pos + 8 + length
            if pos > end:
                raise MalformedError("length_beyond_datagram", f"a sample at byte {start - 8} says {length} bytes, {end - start} are left")
            if fmt >> 12:
                continue  # enterprise-specific sample: skipped
            fmt &= 0xFFF
            if fmt in (1, 3):
                rows.append(_flow_sample(data, start, pos, fmt == 3))
            elif fmt in (2, 4):
                _counter_sample(data, start, pos, fmt == 4, session, events)
    finally:
        if rows:
            events.append(DataRecords(session, FLOW_LAYOUT, rows, export))


def _take(data: bytes, pos: int, n: int, end: int) -> bytes:
    if pos + n > end:
        raise MalformedError("truncated_sample", f"{n} bytes needed at byte {pos}, the container ends at {end}")
    return data[pos : pos + n]


def _records(data: bytes, pos: int, end: int, count: int):
    """(format, start, end) of each record of a sample."""
    if count > MAX_SAMPLES:
        raise MalformedError("bad_count", f"a sample declares {count} records")
    for _ in range(count):
        if end - pos < 8:
            raise MalformedError("truncated_sample", f"record header cut at byte {pos}")
        fmt, length = struct.unpack_from("!II", data, pos)
        start, pos = pos + 8, pos + 8 + length
        if pos > end:
            raise MalformedError("length_beyond_datagram", f"a record at byte {start - 8} says {length} bytes, {end - start} are left")
        yield fmt, start, pos


def _flow_sample(data: bytes, pos: int, end: int, expanded: bool) -> tuple:
    row: list[Any] = [None] * len(FLOW_COLUMNS)
    if expanded:
        if end - pos < _FLOW_SAMPLE_EXPANDED.size:
            raise MalformedError("truncated_sample", "expanded flow sample cut")
        _, _, _, rate, _, _, _, in_if, _, out_if, count = _FLOW_SAMPLE_EXPANDED.unpack_from(data, pos)
        pos += _FLOW_SAMPLE_EXPANDED.size
    else:
        if end - pos < _FLOW_SAMPLE.size:
            raise MalformedError("truncated_sample", "flow sample cut")
        _, _, rate, _, _, in_if, out_if, count = _FLOW_SAMPLE.unpack_from(data, pos)
        pos += _FLOW_SAMPLE.size
        in_if &= 0x3FFFFFFF  # top two bits: format of the interface value
        out_if &= 0x3FFFFFFF
    row[C_RATE], row[C_IN], row[C_OUT], row[C_PACKETS], row[C_BYTES] = rate, in_if, out_if, 1, 0
    for fmt, start, stop in _records(data, pos, end, count):
        if fmt == 1:
            if stop - start < _RAW_HEADER.size:
                raise MalformedError("truncated_sample", "raw packet header record cut")
            proto, frame_length, _stripped, header_length = _RAW_HEADER.unpack_from(data, start)
            header = _take(data, start + 16, header_length, stop)
            row[C_BYTES] = frame_length
            if proto == _ETHERNET:
                _ethernet(header, row)
            elif proto == _IPV4_HEADER:
                _ipv4(header, 0, row)
            elif proto == _IPV6_HEADER:
                _ipv6(header, 0, row)
        elif fmt == 2 and stop - start >= 24:
            length = _U32.unpack_from(data, start)[0]
            row[C_BYTES] = row[C_BYTES] or length
            row[C_SMAC], row[C_DMAC] = data[start + 4 : start + 10], data[start + 12 : start + 18]
        elif fmt == 3 and stop - start >= _IPV4_DATA.size:
            length, proto, src, dst, sport, dport, flags, tos = _IPV4_DATA.unpack_from(data, start)
            if row[C_SRC] is None:
                row[C_SRC], row[C_DST], row[C_IPV], row[C_PROTO] = src, dst, 4, proto
                row[C_SPORT], row[C_DPORT], row[C_FLAGS], row[C_TOS] = sport, dport, flags, tos
            row[C_BYTES] = row[C_BYTES] or length
        elif fmt == 4 and stop - start >= _IPV6_DATA.size:
            length, proto, src, dst, sport, dport, flags, prio = _IPV6_DATA.unpack_from(data, start)
            if row[C_SRC] is None:
                row[C_SRC], row[C_DST], row[C_IPV], row[C_PROTO] = src, dst, 6, proto
                row[C_SPORT], row[C_DPORT], row[C_FLAGS], row[C_TOS] = sport, dport, flags, prio
            row[C_BYTES] = row[C_BYTES] or length
        elif fmt == 1001 and stop - start >= _SWITCH.size:
            svlan, _, dvlan, _ = _SWITCH.unpack_from(data, start)
            row[C_SVLAN] = row[C_SVLAN] or svlan
            row[C_DVLAN] = dvlan
        elif fmt == 1002:
            row[C_NEXTHOP], p = _address(data, start, stop)
            if stop - p >= 8:
                row[C_SMASK], row[C_DMASK] = struct.unpack_from("!II", data, p)
        elif fmt == 1003:
            _gateway(data, start, stop, row)
    return tuple(row)


def _address(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if end - pos < 4:
        raise MalformedError("truncated_sample", "address cut")
    (kind,) = _U32.unpack_from(data, pos)
    n = 4 if kind == 1 else 16 if kind == 2 else 0
    if n == 0:
        raise MalformedError("bad_address", f"address type {kind} is neither IPv4 (1) nor IPv6 (2)")
    return _take(data, pos + 4, n, end), pos + 4 + n


def _gateway(data: bytes, pos: int, end: int, row: list) -> None:
    row[C_NEXTHOP], pos = _address(data, pos, end)
    if end - pos < 16:
        raise MalformedError("truncated_sample", "extended gateway record cut")
    _router_as, src_as, _peer_as, segments = struct.unpack_from("!IIII", data, pos)
    pos += 16
    row[C_SAS] = src_as
    dst_as = None
    for _ in range(min(segments, MAX_SAMPLES)):
        if end - pos < 8:
            raise MalformedError("truncated_sample", "AS path segment cut")
        _kind, n = struct.unpack_from("!II", data, pos)
        pos += 8
        if n > (end - pos) // 4:
            raise MalformedError("truncated_sample", "AS path cut")
        if n:
            (dst_as,) = _U32.unpack_from(data, pos + 4 * (n - 1))
        pos += 4 * n
    row[C_DAS] = dst_as if dst_as is not None else 0


def _ethernet(h: bytes, row: list) -> None:
    if len(h) < 14:
        return
    row[C_DMAC], row[C_SMAC] = h[0:6], h[6:12]
    etype = h[12] << 8 | h[13]
    pos = 14
    tags = 0
    while etype in (0x8100, 0x88A8, 0x9100) and len(h) >= pos + 4 and tags < 2:
        vlan = (h[pos] << 8 | h[pos + 1]) & 0x0FFF
        if tags == 0:
            row[C_SVLAN] = vlan
        etype = h[pos + 2] << 8 | h[pos + 3]
        pos += 4
        tags += 1
    if etype == 0x0800:
        _ipv4(h, pos, row)
    elif etype == 0x86DD:
        _ipv6(h, pos, row)


def _ipv4(h: bytes, pos: int, row: list) -> None:
    if len(h) < pos + 20 or h[pos] >> 4 != 4:
        return
    ihl = (h[pos] & 0x0F) * 4
    row[C_IPV], row[C_TOS], row[C_PROTO] = 4, h[pos + 1], h[pos + 9]
    row[C_SRC], row[C_DST] = h[pos + 12 : pos + 16], h[pos + 16 : pos + 20]
    fragment_offset = (h[pos + 6] << 8 | h[pos + 7]) & 0x1FFF
    if fragment_offset == 0 and ihl >= 20:
        _transport(h, pos + ihl, h[pos + 9], row)


_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options: skipped to the transport header


def _ipv6(h: bytes, pos: int, row: list) -> None:
    if len(h) < pos + 40 or h[pos] >> 4 != 6:
        return
    row[C_IPV] = 6
    row[C_TOS] = ((h[pos] & 0x0F) << 4) | (h[pos + 1] >> 4)
    row[C_SRC], row[C_DST] = h[pos + 8 : pos + 24], h[pos + 24 : pos + 40]
    nxt, pos = h[pos + 6], pos + 40
    for _ in range(8):
        if nxt in _IPV6_EXTENSIONS and len(h) >= pos + 2:
            nxt, pos = h[pos], pos + (h[pos + 1] + 1) * 8
        elif nxt == 44 and len(h) >= pos + 8:  # fragment header: ports only in the first fragment
            first = (h[pos + 2] << 8 | h[pos + 3]) & 0xFFF8 == 0
            nxt, pos = h[pos], pos + 8
            if not first:
                row[C_PROTO] = nxt
                return
        else:
            break
    row[C_PROTO] = nxt
    _transport(h, pos, nxt, row)


def _transport(h: bytes, pos: int, proto: int, row: list) -> None:
    if proto in (6, 17, 132) and len(h) >= pos + 4:  # TCP, UDP, SCTP: ports first
        row[C_SPORT], row[C_DPORT] = h[pos] << 8 | h[pos + 1], h[pos + 2] << 8 | h[pos + 3]
        if proto == 6 and len(h) >= pos + 14:
            row[C_FLAGS] = h[pos + 13]
    elif proto in (1, 58) and len(h) >= pos + 2:  # ICMP, ICMPv6: type and code
        row[C_ICMP] = h[pos] << 8 | h[pos + 1]


def _counter_sample(data: bytes, pos: int, end: int, expanded: bool, session: Any, events: list) -> None:
    head = _COUNTER_SAMPLE_EXPANDED if expanded else _COUNTER_SAMPLE
    if end - pos < head.size:
        raise MalformedError("truncated_sample", "counter sample cut")
    count = head.unpack_from(data, pos)[-1]
    for fmt, start, stop in _records(data, pos + head.size, end, count):
        if fmt == 1 and stop - start >= _GENERIC_COUNTERS.size:
            (index, _type, speed, _direction, _status, in_octets, in_ucast, in_mcast, in_bcast, in_discards, in_errors, _unknown,
             out_octets, out_ucast, out_mcast, out_bcast, out_discards, out_errors, _promisc) = _GENERIC_COUNTERS.unpack_from(data, start)
            events.append(
                InterfaceCounters(
                    session, index, speed, in_octets, in_ucast + in_mcast + in_bcast, in_discards, in_errors,
                    out_octets, out_ucast + out_mcast + out_bcast, out_discards, out_errors,
                )
            )
