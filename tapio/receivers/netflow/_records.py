"""Decoded data records → OTLP log records and traffic totals, through code compiled per template.

Invariants:
- For each template shape (its decoder) one `Compiled` is built, once, for
  the configured `Output`: a function that writes one log record per row
  with exactly the configured attributes the template can fill, and one that
  adds the rows' bytes, packets and flows to per-protocol totals. Both are
  generated Python (one loop, no per-field calls), because per-field
  dispatch costs more than the decoding itself.
- Core attributes (the OpenTelemetry Collector netflow receiver's) are on
  every record: ports, counts, times and TCP flags are 0 when the template
  lacks them, as that receiver reports them; addresses are left out when
  absent. Extra attributes (interfaces, VLANs, AS numbers, next hops,
  masks, MACs, ToS, ICMP) appear only when the template carries them.
- ``flow.start``/``flow.end`` are unix nanoseconds from whichever time
  elements the template has (absolute seconds, milliseconds, NTP micro- or
  nanoseconds; sysUpTime offsets with the exporter's boot time; delta
  microseconds before export); 0 when it has none, or when sysUpTime needs a
  boot time not known yet. A record's time is its start, else its receipt.
- Sampling: the rate is a per-row element (samplingInterval), a per-row
  sampler id looked up in the session, or the session's default. With
  ``apply_sampling`` the bytes and packets of records and totals are
  multiplied by it (a rate of 0 or 1 leaves them).
- Enterprise elements appear as ``ipfix.<pen>.<id>`` (raw bytes) unless
  mapped or switched off; mapped elements take the attribute and type the
  mapping gives.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _encode as enc
from . import _ie
from ._parser import FLOW_TYPES, DataRecords
from ._sflow import IP, SFLOW

NTP_UNIX_OFFSET = 2208988800  # seconds from 1900 (NTP era 0) to 1970

CORE_ATTRIBUTES = (
    "source.address", "source.port", "destination.address", "destination.port", "network.transport", "network.type",
    "flow.io.bytes", "flow.io.packets", "flow.type", "flow.sequence_num", "flow.time_received", "flow.start", "flow.end",
    "flow.sampling_rate", "flow.sampler_address", "flow.tcp_flags",
)
#: extra attribute → the elements that can fill it, in order of preference
EXTRA_ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "flow.in_if": (10, 252), "flow.out_if": (14, 253), "flow.src_vlan": (58, 243), "flow.dst_vlan": (59, 254),
    "flow.src_as": (16,), "flow.dst_as": (17,), "flow.next_hop": (15, 62), "flow.bgp_next_hop": (18, 63),
    "flow.src_mask": (9, 29), "flow.dst_mask": (13, 30), "flow.src_mac": (56,), "flow.dst_mac": (80, 57),
    "flow.ip_tos": (5,), "flow.icmp_type": (32, 139, 176, 178), "flow.icmp_code": (32, 139, 177, 179),
    "flow.forwarding_status": (89,), "flow.observation_domain_id": (),
}
ATTRIBUTES = CORE_ATTRIBUTES + tuple(EXTRA_ATTRIBUTES)
_ELEMENTS = {
    "source.address": (8, 27), "source.port": (7, 180, 182), "destination.address": (12, 28),
    "destination.port": (11, 181, 183), "network.transport": (4,), "flow.io.bytes": (1, 85, 23, 352),
    "flow.io.packets": (2, 86, 24), "flow.tcp_flags": (6,), **EXTRA_ATTRIBUTES,
}
_START = (156, 154, 152, 150, 22, 158, 323)
_END = (157, 155, 153, 151, 21, 159)
_PER_SESSION = ("flow.type", "flow.sampler_address", "flow.observation_domain_id")
_ZERO_WHEN_ABSENT = {"source.port", "destination.port", "flow.io.bytes", "flow.io.packets", "flow.tcp_flags"}

#: IANA protocol numbers to the names the OpenTelemetry Collector reports
PROTOCOLS = {
    0: "hopopt", 1: "icmp", 2: "igmp", 4: "ipv4", 6: "tcp", 8: "egp", 9: "igp", 17: "udp", 27: "rdp", 33: "dccp",
    41: "ipv6", 43: "ipv6-route", 44: "ipv6-frag", 46: "rsvp", 47: "gre", 50: "esp", 51: "ah", 58: "ipv6-icmp",
    59: "ipv6-nonxt", 60: "ipv6-opts", 88: "eigrp", 89: "ospfigp", 94: "ipip", 103: "pim", 108: "ipcomp",
    112: "vrrp", 115: "l2tp", 132: "sctp", 136: "udplite", 137: "mpls-in-ip",
}

MAPPING_TYPES = ("auto", "unsigned", "string", "ipv4", "ipv6", "mac", "bytes")


def protocol_name(number: int) -> str:
    return PROTOCOLS.get(number, "unknown")


@dataclass(frozen=True, slots=True)
class Mapping:
    pen: int
    id: int
    attribute: str
    type: str = "auto"


@dataclass(frozen=True)
class Output:
    """What the receiver writes: the attributes to build, the element mappings, sampling."""

    attributes: frozenset[str] = frozenset(ATTRIBUTES)
    mappings: tuple[Mapping, ...] = ()
    enterprise_raw: bool = True
    apply_sampling: bool = False


# -- value conversions (for cached pieces)


def ip_text(value: bytes) -> str:
    if len(value) == 4:
        return socket.inet_ntop(socket.AF_INET, value)
    if len(value) == 16:
        return socket.inet_ntop(socket.AF_INET6, value)
    return value.hex()


def mac_text(value: bytes) -> str:
    return ":".join(f"{b:02x}" for b in value)


def string_text(value: bytes) -> str:
    return value.rstrip(b"\x00").decode("utf-8", "replace")


def as_int(value: Any) -> int:
    return int.from_bytes(value, "big") if isinstance(value, (bytes, bytearray)) else int(value)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    _ie.IPV4: ip_text, _ie.IPV6: ip_text, IP: ip_text, _ie.MAC: mac_text, _ie.STRING: string_text, "bytes": bytes,
}


def ntp_ns(value: Any) -> int:
    """A 64-bit NTP timestamp (seconds since 1900, 32-bit fraction) as unix nanoseconds."""
    v = as_int(value)
    return ((v >> 32) - NTP_UNIX_OFFSET) * 1_000_000_000 + ((v & 0xFFFFFFFF) * 1_000_000_000 >> 32)


class Context:
    """What a compiled builder needs besides the rows (one per data set)."""

    __slots__ = ("boot_ms", "export_s", "tail", "observed", "received_ns", "rate", "samplers")

    def __init__(self, boot_ms: int | None, export_s: int, tail: bytes, observed: bytes, received_ns: int, rate: int, samplers: dict) -> None:
        self.boot_ms, self.export_s, self.tail, self.observed = boot_ms, export_s, tail, observed
        self.received_ns, self.rate, self.samplers = received_ns, rate, samplers


@dataclass
class Compiled:
    """The builders of one template shape."""

    #: (rows, items out list, Context) -> None: appends one framed log record per row
    encode: Callable[[list, list, Context], None]
    #: (rows, totals dict proto -> [bytes, packets, flows], the set's sampling rate, the session's rates by sampler) -> None
    tally: Callable[[list, dict, int, dict], None]
    #: whether rows carry their own sampling rate (else the Context's is in the tail)
    per_row_rate: bool
    source: str = field(repr=False, default="")


class _Gen:
    """Collects generated source lines and the constants they name."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {
            "FB": int.from_bytes, "V": enc.varint, "SV": enc.SHORT_VARINTS, "P2": enc.VARINT_PAIRS, "HI": enc.HighVarints(),
            "Q": enc.FIXED64, "M64": (1 << 64) - 1, "ntp": ntp_ns,
        }
        self.lines: list[str] = []
        self.pieces: list[str] = []
        self._n = 0

    def const(self, value: Any) -> str:
        self._n += 1
        name = f"K{self._n}"
        self.names[name] = value
        return name


def compile_template(layout: Any, output: Output) -> Compiled:
    """The builders for a template (or sFlow layout) whose decoder has ``columns``."""
    columns = layout.decoder.columns
    sparse = getattr(layout.decoder, "sparse", False)
    index: dict[tuple[int, int], int] = {}
    for i, c in enumerate(columns):
        index.setdefault((c.pen, c.id), i)

    def find(elements: tuple[int, ...]) -> int | None:
        for e in elements:
            if (0, e) in index:
                return index[(0, e)]
        return None

    g = _Gen()
    body = g.lines
    wanted = output.attributes
    used: set[int] = set()

    def value_expr(i: int, numeric: bool) -> str:
        used.add(i)
        c = columns[i]
        if numeric and not c.is_int:
            return f"FB(r[{i}], 'big')"
        return f"r[{i}]"

    def direct_int(attr: str, expr: str, absent: str | None = None) -> None:
        # ints vary too much to cache (ports, counts): the key's bytes are prebuilt per varint length
        prefixes = g.const(enc.int_prefixes(attr))
        name = f"p{len(g.pieces)}"
        body.append(f"    v = {expr}")
        piece = f"{prefixes}[len(b := SV[v] if v < 16384 else V(v))] + b"
        body.append(f"    {name} = ({piece}) if v is not None else {absent}" if absent is not None else f"    {name} = {piece}")
        g.pieces.append(name)

    def cached(attr: str, i: int, convert: Callable[[Any], Any] | None, numeric: bool) -> None:
        expr = value_expr(i, numeric)
        if convert is None and numeric:
            absent = None
            if sparse:
                absent = g.const(enc.attribute(attr, 0)) if attr in _ZERO_WHEN_ABSENT else "b''"
            direct_int(attr, expr, absent)
            return
        cache = g.const(enc.PieceCache(attr, convert or (lambda v: v)))
        if sparse:
            name = f"p{len(g.pieces)}"
            absent = g.const(enc.attribute(attr, 0)) if attr in _ZERO_WHEN_ABSENT else "b''"
            body.append(f"    v = {expr}")
            body.append(f"    {name} = {cache}[v] if v is not None else {absent}")
            g.pieces.append(name)
        else:
            g.pieces.append(f"{cache}[{expr}]")

    def zero(attr: str) -> None:
        g.pieces.append(g.const(enc.attribute(attr, 0)))

    # sampling rate: per row from the record, or per set from the context
    rate_col = find((34,))
    sampler_col = find((48, 302))
    if rate_col is not None:
        body.append(f"    rate = {value_expr(rate_col, True)} or ctx.rate")
    elif sampler_col is not None:
        body.append(f"    rate = samplers.get({value_expr(sampler_col, True)}, ctx.rate)")
    per_row_rate = rate_col is not None or sampler_col is not None
    scale = output.apply_sampling

    # addresses, ports, protocol, counts
    for attr in ("source.address", "destination.address", "flow.next_hop", "flow.bgp_next_hop"):
        if attr in wanted and (i := find(_ELEMENTS[attr])) is not None:
            cached(attr, i, ip_text, False)
    if "network.type" in wanted:
        ipv = find((60,))
        if ipv is not None:
            names = {4: "ipv4", 6: "ipv6"}
            cache = g.const(enc.PieceCache("network.type", lambda v: names.get(v, "unknown")))
            g.pieces.append(f"{cache}[r[{ipv}]]")
        elif find((8, 12)) is not None:
            g.pieces.append(g.const(enc.attribute("network.type", "ipv4")))
        elif find((27, 28)) is not None:
            g.pieces.append(g.const(enc.attribute("network.type", "ipv6")))
    if "network.transport" in wanted and (i := find((4,))) is not None:
        cached("network.transport", i, protocol_name, True)
    for attr in ("source.port", "destination.port", "flow.tcp_flags"):
        if attr in wanted:
            i = find(_ELEMENTS[attr])
            cached(attr, i, None, True) if i is not None else zero(attr)
    for attr, count in (("flow.io.bytes", "b"), ("flow.io.packets", "k")):
        if attr not in wanted:
            continue
        i = find(_ELEMENTS[attr])
        if i is None:
            zero(attr)
            continue
        expr = value_expr(i, True)
        if scale:
            rate = "rate" if per_row_rate else "ctx.rate"
            body.append(f"    {count} = {expr}")
            body.append(f"    {count} = {count} * {rate} if {rate} > 1 else {count}")
            expr = count
        direct_int(attr, expr)
    if per_row_rate and "flow.sampling_rate" in wanted:
        direct_int("flow.sampling_rate", "rate")

    # times
    start_expr = _time_expr(columns, find(_START), g, used)
    end_expr = _time_expr(columns, find(_END), g, used)
    if sparse:  # sFlow carries no flow times: the sample's receipt is its start and end
        start_expr = end_expr = "ctx.received_ns"
    body.append(f"    t0 = {start_expr}")
    body.append(f"    t1 = {end_expr}")
    for attr, var in (("flow.start", "t0"), ("flow.end", "t1")):
        if attr in wanted:
            prefixes = g.const(enc.int_prefixes(attr))
            # nanosecond times are nine-byte varints: two 14-bit pairs from a table, the top 35 bits cached
            body.append(f"    {var}v = P2[{var} & 16383] + P2[{var} >> 14 & 16383] + HI[{var} >> 28] if 72057594037927936 <= {var} < 9223372036854775808 else V({var})")
            g.pieces.append(f"{prefixes}[len({var}v)]")
            g.pieces.append(f"{var}v")

    # extras
    for attr in ("flow.in_if", "flow.out_if", "flow.src_vlan", "flow.dst_vlan", "flow.src_as", "flow.dst_as",
                 "flow.src_mask", "flow.dst_mask", "flow.ip_tos", "flow.forwarding_status"):
        if attr in wanted and (i := find(_ELEMENTS[attr])) is not None:
            cached(attr, i, None, True)
    for attr in ("flow.src_mac", "flow.dst_mac"):
        if attr in wanted and (i := find(_ELEMENTS[attr])) is not None:
            cached(attr, i, mac_text, False)
    for attr, shift in (("flow.icmp_type", True), ("flow.icmp_code", False)):
        if attr not in wanted:
            continue
        if (i := find((32, 139))) is not None:
            cached(attr, i, (lambda v: v >> 8) if shift else (lambda v: v & 0xFF), True)
        elif (i := find((176, 178) if shift else (177, 179))) is not None:
            cached(attr, i, None, True)

    # mappings, then unmapped enterprise elements
    mapped: set[tuple[int, int]] = set()
    for m in output.mappings:
        mapped.add((m.pen, m.id))
        if (m.pen, m.id) in index:
            i = index[(m.pen, m.id)]
            cached(m.attribute, i, *_mapping_convert(m.type, columns[i]))
    if output.enterprise_raw:
        for i, c in enumerate(columns):
            if c.pen and (c.pen, c.id) not in mapped:
                cached(f"ipfix.{c.pen}.{c.id}", i, bytes, False)

    pieces = ", ".join(g.pieces + ["tail"])
    encode_src = "\n".join(
        [
            "def encode(rows, out, ctx):",
            "  tail, observed, samplers, boot_ms, export_s = ctx.tail, ctx.observed, ctx.samplers, ctx.boot_ms, ctx.export_s",
            "  append = out.append",
            "  for r in rows:",
            *["  " + line for line in body],
            f"      rec = b''.join((b'\\x09', Q((t0 or ctx.received_ns) & M64), {pieces}, observed))",
            "      n = len(rec)",
            "      append(b''.join((b'\\x12', SV[n] if n < 16384 else V(n), rec)))",
        ]
    )
    tally_src = _tally_source(find((4,)), find(_ELEMENTS["flow.io.bytes"]), find(_ELEMENTS["flow.io.packets"]), columns, scale, rate_col, sampler_col, sparse)
    namespace = dict(g.names)
    exec(compile(encode_src + "\n\n" + tally_src, f"<netflow template {layout.id}>", "exec"), namespace)  # noqa: S102 - generated from template fields, no user text
    return Compiled(namespace["encode"], namespace["tally"], per_row_rate, encode_src + "\n\n" + tally_src)


def _time_expr(columns: tuple, i: int | None, g: _Gen, used: set[int]) -> str:
    if i is None:
        return "0"
    used.add(i)
    c = columns[i]
    v = f"r[{i}]" if c.is_int else f"FB(r[{i}], 'big')"
    if c.id in (150, 151, 322):
        return f"{v} * 1000000000"
    if c.id in (152, 153, 323):
        return f"{v} * 1000000"
    if c.id in (154, 155, 156, 157, 324, 325):
        return f"ntp(r[{i}])"
    if c.id in (21, 22):
        return f"(({v} + boot_ms) * 1000000 if boot_ms is not None else 0)"
    return f"(export_s * 1000000000 - {v} * 1000)"  # 158, 159: microseconds before export


def _mapping_convert(kind: str, column: Any) -> tuple[Callable[[Any], Any] | None, bool]:
    """(converter, numeric) for a mapping's type on a column."""
    if kind == "auto":
        if column.is_int or column.kind in _ie.NUMERIC:
            return as_int, True
        if column.kind == _ie.FLOAT:
            return float, False
        if column.kind == _ie.OCTETS and column.length in (1, 2, 4, 8) and (column.pen or column.id not in _ie.BY_ID):
            return as_int, False  # enterprise and unknown elements of a number's length
        return _CONVERT.get(column.kind, bytes), False
    if kind == "unsigned":
        return as_int, not column.is_int
    return _CONVERT.get(kind, bytes), False


def _tally_source(proto: int | None, b: int | None, k: int | None, columns: tuple, scale: bool, rate_col: int | None, sampler_col: int | None, sparse: bool) -> str:
    def val(i: int | None) -> str:
        if i is None:
            return "0"
        expr = f"r[{i}]" if columns[i].is_int else f"FB(r[{i}], 'big')"
        return f"({expr} or 0)" if sparse else expr

    lines = ["def tally(rows, totals, set_rate, samplers):", "  for r in rows:"]
    if scale and rate_col is not None:
        lines.append(f"    rate = {val(rate_col)} or set_rate")
    elif scale and sampler_col is not None:
        lines.append(f"    rate = samplers.get({val(sampler_col)}, set_rate)")
    elif scale:
        lines.append("    rate = set_rate")
    lines.append(f"    t = totals.get({val(proto) if proto is not None else -1})")
    lines.append("    if t is None:")
    lines.append(f"      t = totals[{val(proto) if proto is not None else -1}] = [0, 0, 0]")
    if scale:
        lines.append("    m = rate if rate > 1 else 1")
        lines.append(f"    t[0] += {val(b)} * m")
        lines.append(f"    t[1] += {val(k)} * m")
    else:
        lines.append(f"    t[0] += {val(b)}")
        lines.append(f"    t[1] += {val(k)}")
    lines.append("    t[2] += 1")
    return "\n".join(lines)


class RecordBuilder:
    """Turns `DataRecords` events into framed log records and totals, compiling per template shape."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self._compiled: dict[int, tuple[Any, Compiled]] = {}
        self._session_pieces: dict[Any, bytes] = {}

    def compiled(self, layout: Any) -> Compiled:
        key = id(layout.decoder)
        found = self._compiled.get(key)
        if found is None or found[0] is not layout.decoder:
            if len(self._compiled) >= 4096:
                self._compiled.clear()
            found = self._compiled[key] = (layout.decoder, compile_template(layout, self.output))
        return found[1]

    @staticmethod
    def rate(ev: DataRecords) -> int:
        """The sampling rate of a data set's records that name no sampler of their own (0: unknown)."""
        return ev.export.sampling or ev.session.sampling_rate()

    def context(self, ev: DataRecords, received_ns: int, observed: bytes, compiled: Compiled) -> Context:
        session, export = ev.session, ev.export
        rate = export.sampling or session.sampling_rate()
        wanted = self.output.attributes
        tail = self._session_pieces.get(session)
        if tail is None:
            pairs = []
            if "flow.type" in wanted:
                pairs.append(("flow.type", FLOW_TYPES.get(session.version, "unknown")))
            if "flow.sampler_address" in wanted:
                pairs.append(("flow.sampler_address", session.exporter))
            if "flow.observation_domain_id" in wanted and session.version != SFLOW:
                pairs.append(("flow.observation_domain_id", session.domain))
            if len(self._session_pieces) >= 65536:
                self._session_pieces.clear()
            tail = self._session_pieces[session] = b"".join(enc.attribute(k, v) for k, v in pairs)
        parts = [tail]
        if "flow.sequence_num" in wanted:
            parts.append(enc.attribute("flow.sequence_num", export.sequence))
        if "flow.time_received" in wanted:
            parts.append(enc.attribute("flow.time_received", received_ns))
        if "flow.sampling_rate" in wanted and not compiled.per_row_rate:
            parts.append(enc.attribute("flow.sampling_rate", rate))
        return Context(export.boot_ms, export.export_time, b"".join(parts), observed, received_ns, rate, session.sampling)
