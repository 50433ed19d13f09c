"""Records of the dns-xdp kernel program → Python values. Pure: no I/O, no clocks.

Invariants:
- The layouts here are those of tapio/bpf/dns_xdp.bpf.c (`struct event`,
  `struct flow_key`, `struct query`; x86-64/arm64 little-endian, natural
  alignment); a record of another size raises `DecodeError`.
- `name_text` turns a name's wire form into its presentation form as the
  OpenTelemetry semantic conventions ask for `dns.question.name`: labels
  joined by dots, the root as ".", printable bytes as they are, `.` `\\`
  and `"` inside a label escaped with a backslash, tab, CR and LF as
  ``\\t`` ``\\r`` ``\\n``, any other byte below 32 or above 126 as
  ``\\DDD``. A wire form whose labels overrun it raises `DecodeError`
  (the kernel checked it, so this means a layout mismatch).
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

EVENT = struct.Struct("<QQII16s16sHHHHHHHHHHHHHHBBBBB7x256s")
KEY = struct.Struct("<16s16sHHBBxx")
QUERY = struct.Struct("<QIHHHHHHB7x256s")
#: the part of a query value the sweeper reads to decide expiry
QUERY_TS = struct.Struct("<QI")
assert EVENT.size == 352 and KEY.size == 40 and QUERY.size == 288
#: `EVENT` cut where the records of one kind of query differ: query and response times, the
#: interfaces and addresses, client port, the server port (raw), DNS id, the rest (flags, counts, question)
EVENT_ROW = struct.Struct("<QQ40sH2sH290s")
assert EVENT_ROW.size == EVENT.size

KIND_ANSWERED, KIND_RESPONSE_ONLY = 1, 2
HOOKS = {1: "xdp", 2: "tc_ingress", 3: "tc_egress"}
FAMILY_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
TRANSPORTS = {17: "udp", 6: "tcp"}

# counter slots (CNT_* in the C source)
CNT_PACKETS, CNT_QUERIES, CNT_QUERY_REPEATED, CNT_RESPONSES = 0, 1, 2, 3
CNT_MATCHED, CNT_UNMATCHED, CNT_DUPLICATE, CNT_MISMATCHED = 4, 5, 6, 7
CNT_LOST, CNT_FRAGMENT, CNT_TCP_SKIPPED, CNT_LATE = 8, 9, 10, 11
CNT_BAD = 16
CNT_SLOTS = 32
#: malformed-packet reasons by slot offset from CNT_BAD (BAD_* in the C source)
BAD_REASONS = (
    "bad_ip_header",
    "bad_udp_length",
    "short_dns_header",
    "no_question",
    "bad_label_type",
    "compression_pointer_in_question",
    "name_too_long",
    "truncated_question",
    "bad_ipv6_extension_headers",
    "bad_l4_header",
)

#: RFC 1035 and IANA's DNS parameters registry: the types seen in practice
QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 17: "RP",
    18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV", 35: "NAPTR", 36: "KX",
    37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP", 45: "IPSECKEY",
    46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA",
    53: "SMIMEA", 55: "HIP", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD",
    64: "SVCB", 65: "HTTPS", 99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG",
    251: "IXFR", 252: "AXFR", 255: "ANY", 256: "URI", 257: "CAA",
}
QCLASSES = {1: "IN", 3: "CH", 4: "HS", 254: "NONE", 255: "ANY"}
#: the 4-bit RCODEs of the header (RFC 1035, 2136, 6895)
RCODES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE",
}
OPCODES = {0: "QUERY", 1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE", 6: "DSO"}
#: header flag bits below QR and the opcode, with their conventional names
FLAG_BITS = ((10, "aa"), (9, "tc"), (8, "rd"), (7, "ra"), (5, "ad"), (4, "cd"))


class DecodeError(ValueError):
    """A record that does not have the layout the kernel program writes."""


def qtype_text(value: int) -> str:
    """A type's mnemonic, or ``TYPE<n>`` (RFC 3597) for an unlisted one."""
    return QTYPES.get(value) or f"TYPE{value}"


def qclass_text(value: int) -> str:
    return QCLASSES.get(value) or f"CLASS{value}"


def rcode_text(value: int) -> str:
    return RCODES.get(value) or f"RCODE{value}"


def opcode_text(value: int) -> str:
    return OPCODES.get(value) or f"OPCODE{value}"


def flag_names(flags: int) -> list[str]:
    """The set flag bits of a header flags word, e.g. ["aa", "rd", "ra"]."""
    return [name for bit, name in FLAG_BITS if flags >> bit & 1]


_PLAIN = frozenset(range(33, 127)) - {ord("."), ord("\\"), ord('"')}
_ESCAPES = {ord("."): "\\.", ord("\\"): "\\\\", ord('"'): '\\"', 9: "\\t", 13: "\\r", 10: "\\n"}


#: a byte that is not written as it is in a label's presentation form
_NEEDS_ESCAPE = re.compile(rb'[^\x21\x23-\x2d\x2f-\x5b\x5d-\x7e]')


def _label_text(label: bytes) -> str:
    return "".join(chr(b) if b in _PLAIN else _ESCAPES.get(b) or f"\\{b:03d}" for b in label)


def name_text(wire: bytes) -> str:
    """A name's wire form (length-prefixed labels, without the final zero) in presentation form."""
    if not wire:
        return "."
    labels = []
    i, n = 0, len(wire)
    while i < n:
        length = wire[i]
        end = i + 1 + length
        if length == 0 or length > 63 or end > n:
            raise DecodeError(f"name wire form {wire[:64]!r}: a label overruns it at byte {i}")
        labels.append(wire[i + 1 : end])
        i = end
    if _NEEDS_ESCAPE.search(b"".join(labels)) is None:  # the usual name: nothing to escape
        return b".".join(labels).decode("ascii")
    return ".".join(map(_label_text, labels))


def address_text(family: int, raw: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    raise DecodeError(f"address family {family} (expected 4 or 6)")


@dataclass(frozen=True, slots=True)
class Event:
    """A response with its query (``query_ts`` set) or without (``query_ts`` 0)."""

    query_ts: int
    response_ts: int
    query_ifindex: int
    response_ifindex: int
    client: bytes
    server: bytes
    client_port: int
    server_port: int
    id: int
    flags: int
    query_flags: int
    qtype: int
    qclass: int
    ancount: int
    nscount: int
    arcount: int
    name: bytes
    query_vlan: int
    response_vlan: int
    size: int
    family: int
    proto: int
    query_hook: int
    response_hook: int
    kind: int

    @property
    def rcode(self) -> int:
        return self.flags & 0x0F

    @property
    def opcode(self) -> int:
        return self.flags >> 11 & 0x0F


def parse_event(raw: bytes) -> Event:
    if len(raw) != EVENT.size:
        raise DecodeError(f"event of {len(raw)} bytes (expected {EVENT.size})")
    (q_ts, r_ts, q_if, r_if, client, server, cport, sport, id_, flags, qflags, qtype, qclass, an, ns, ar,
     name_len, q_vlan, r_vlan, size, family, proto, q_hook, r_hook, kind, name) = EVENT.unpack(raw)
    if name_len > 255 or family not in FAMILY_AF or kind not in (KIND_ANSWERED, KIND_RESPONSE_ONLY):
        raise DecodeError(f"event with name length {name_len}, family {family}, kind {kind}")
    return Event(q_ts, r_ts, q_if, r_if, client, server, cport, sport, id_, flags, qflags, qtype, qclass, an, ns, ar,
                 name[:name_len], q_vlan, r_vlan, size, family, proto, q_hook, r_hook, kind)


def event_rows(raws: list[bytes]) -> Iterator[tuple] | None:
    """Records cut as `EVENT_ROW`, in one pass over them all; None if one is not `EVENT`'s size (no other check)."""
    blob = b"".join(raws)
    # all equal to size when they sum to n * size and none is shorter
    if not raws or len(blob) != EVENT.size * len(raws) or min(map(len, raws)) != EVENT.size:
        return None if raws else iter(())
    return EVENT_ROW.iter_unpack(blob)


@dataclass(frozen=True, slots=True)
class Query:
    """A query the kernel still waits on (an `inflight` entry), with its key."""

    key: bytes
    ts: int
    ifindex: int
    client: bytes
    server: bytes
    client_port: int
    server_port: int
    id: int
    family: int
    proto: int
    qtype: int
    qclass: int
    flags: int
    name: bytes
    vlan: int
    hook: int


def parse_query(key: bytes, value: bytes) -> Query:
    if len(key) != KEY.size or len(value) != QUERY.size:
        raise DecodeError(f"inflight entry of {len(key)}+{len(value)} bytes (expected {KEY.size}+{QUERY.size})")
    client, server, cport, id_, family, proto = KEY.unpack(key)
    ts, ifindex, sport, qtype, qclass, flags, name_len, vlan, hook, name = QUERY.unpack(value)
    if name_len > 255 or family not in FAMILY_AF:
        raise DecodeError(f"inflight entry with name length {name_len}, family {family}")
    return Query(key, ts, ifindex, client, server, cport, sport, id_, family, proto, qtype, qclass, flags, name[:name_len], vlan, hook)
