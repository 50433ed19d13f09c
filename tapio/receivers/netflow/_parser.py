"""NetFlow v5, NetFlow v9 (RFC 3954), IPFIX (RFC 7011) and sFlow v5 (`_sflow`) datagrams to events. Sans-IO: bytes in, events out.

Invariants:
- State lives in one `Session` per (exporter address, protocol version,
  source id / observation domain); nothing is shared between sessions.
  A session holds its templates and options templates, the sampling rates
  and system init time learnt from options data, and the sequence number it
  expects next.
- `Collector.feed` never raises on peer input: a datagram that breaks its
  format ends in a `Malformed` event, after the events of the sets before
  the bad one (what decoded is kept).
- A data set whose template is unknown is held, as bytes, until its template
  arrives (then decoded as if it had arrived then, with its own export
  header), or until it is older than ``held_timeout`` or pushed out by
  ``max_held_sets`` (both bounds over all sessions): each set is reported
  once as `UnknownTemplate` when it arrives and, if never decoded, once as
  `HeldDropped`.
- Sequence numbers: v5 counts flows, v9 export packets, IPFIX data records
  (RFC 7011 §3.1; exporters that count only flow records, or count the
  message's own records too, as softflowd does, are recognised). A number
  ahead of the one expected is a `SequenceGap` with the count of what went
  missing; one behind it (reordering, an exporter restart) only resets the
  expectation. An IPFIX message with sets that could not be counted
  (unknown templates) resets it too.
- Template ids below 256, zero-length fields, empty templates (v9), option
  scopes that do not fit, and set or header lengths beyond the datagram are
  malformed.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Union

from ._sflow import SFLOW, parse_sflow
from ._templates import VARIABLE, Field, MalformedError, Template

__all__ = [
    "Collector",
    "DataRecords",
    "Export",
    "HeldDropped",
    "Malformed",
    "MalformedError",
    "Session",
    "SequenceGap",
    "TemplateUpdate",
    "TemplateWithdrawn",
    "UnknownTemplate",
]

V5, V9, IPFIX = 5, 9, 10
FLOW_TYPES = {V5: "netflow_v5", V9: "netflow_v9", IPFIX: "ipfix", SFLOW: "sflow_5"}
_MOD32 = 1 << 32
_HALF32 = 1 << 31

_V5_HEADER = struct.Struct("!HHIIIIBBH")
_V9_HEADER = struct.Struct("!HHIIII")
_IPFIX_HEADER = struct.Struct("!HHIII")
_SET_HEADER = struct.Struct("!HH")
_PAIR = struct.Struct("!HH")
_TRIPLE = struct.Struct("!HHH")
_U32 = struct.Struct("!I")

#: NetFlow v5 records as a fixed template in IANA elements (the v5 record layout)
V5_FIELDS = (
    Field(8, 4), Field(12, 4), Field(15, 4), Field(10, 2), Field(14, 2), Field(2, 4), Field(1, 4),
    Field(22, 4), Field(21, 4), Field(7, 2), Field(11, 2), Field(210, 1), Field(6, 1), Field(4, 1),
    Field(5, 1), Field(16, 2), Field(17, 2), Field(9, 1), Field(13, 1), Field(210, 2),
)
V5_RECORD = 48
V5_MAX_COUNT = 30
V5_TEMPLATE = Template(0, V5_FIELDS)

# elements that options data can carry about sampling and time
_SAMPLING_INTERVAL = 34
_SAMPLER_ID = 48
_SAMPLER_RANDOM_INTERVAL = 50
_SELECTOR_ID = 302
_PACKET_INTERVAL = 305
_PACKET_SPACE = 306
_SAMPLING_PROBABILITY = 311
_SYSTEM_INIT_MS = 160

#: bounds on held data sets (the receiver's config sets its own)
DEFAULT_MAX_HELD_SETS = 1024
DEFAULT_HELD_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Export:
    """What a data set's message header said."""

    version: int
    sequence: int
    #: export time, unix seconds
    export_time: int
    #: unix milliseconds of the exporter's boot (v5/v9 header; IPFIX: from options data), None if unknown
    boot_ms: int | None
    #: v5 header's sampling interval (0: none or unknown)
    sampling: int = 0


@dataclass(eq=False, slots=True)
class Session:
    """The state of one exporter's (version, source id / observation domain)."""

    exporter: str
    version: int
    domain: int
    templates: dict[int, Template] = field(default_factory=dict)
    #: sampling rate (1 in N) by sampler/selector id; None is the default for records naming none
    sampling: dict[int | None, int] = field(default_factory=dict)
    #: IPFIX: unix ms of the exporter's init time (systemInitTimeMilliseconds), for sysUpTime fields
    system_init_ms: int | None = None
    next_sequence: int | None = None
    #: IPFIX: (sequence, data records, flow records) of the last message whose records could all be counted
    last_ipfix: tuple[int, int, int] | None = None
    #: IPFIX: which counting the exporter's sequence numbers follow (see `Collector._ipfix_sequence`)
    ipfix_convention: int = 0

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.exporter, self.version, self.domain)

    def sampling_rate(self, sampler: int | None = None) -> int:
        """The sampling rate for records of ``sampler`` (0 if unknown)."""
        rate = self.sampling.get(sampler)
        if rate is None and sampler is not None:
            rate = self.sampling.get(None)
        return rate or 0


@dataclass(slots=True)
class DataRecords:
    """Decoded data records of one data set (``template.options`` false) or options data records (true)."""

    session: Session
    template: Template
    rows: list[tuple]
    export: Export


@dataclass(slots=True)
class TemplateUpdate:
    """A template that is new or changed (a refresh with the same fields gives none)."""

    session: Session
    template: Template


@dataclass(slots=True)
class TemplateWithdrawn:
    """IPFIX template withdrawal; ``template_id`` 2 withdraws every data template, 3 every options template."""

    session: Session
    template_id: int


@dataclass(slots=True)
class UnknownTemplate:
    """A data set arrived before its template; ``held`` tells whether it waits for it."""

    session: Session
    template_id: int
    held: bool


@dataclass(slots=True)
class HeldDropped:
    """Held data sets whose template never came; ``reason`` is ``expired`` or ``overflow``."""

    session: Session
    template_id: int
    reason: str
    sets: int = 1


@dataclass(slots=True)
class SequenceGap:
    """Messages or records went missing between two datagrams of a session."""

    session: Session
    expected: int
    received: int
    missing: int


@dataclass(slots=True)
class Malformed:
    """A datagram broke its format; the rest of it was skipped."""

    exporter: str
    reason: str
    detail: str
    version: int = 0


Event = Union[DataRecords, TemplateUpdate, TemplateWithdrawn, UnknownTemplate, HeldDropped, SequenceGap, Malformed]


@dataclass(slots=True)
class _Held:
    session: Session
    template_id: int
    body: bytes
    export: Export
    arrived: float


class Collector:
    """Sessions of every exporter seen, and the held data sets; feed it datagrams.

    ``max_held_sets`` and ``held_timeout`` bound the data sets held for
    templates (0 sets holds none). ``max_sessions`` bounds the sessions: the
    least recently used one is forgotten past it (a flood of spoofed
    exporters cannot grow memory without limit).
    """

    def __init__(
        self,
        *,
        max_held_sets: int = DEFAULT_MAX_HELD_SETS,
        held_timeout: float = DEFAULT_HELD_TIMEOUT,
        max_sessions: int = 65536,
    ) -> None:
        self.max_held_sets = max_held_sets
        self.held_timeout = held_timeout
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[tuple[str, int, int], Session] = OrderedDict()
        self._held: OrderedDict[int, _Held] = OrderedDict()
        self._held_serial = 0

    # -- sessions and templates

    def session(self, exporter: str, version: int, domain: int) -> Session:
        key = (exporter, version, domain)
        found = self.sessions.get(key)
        if found is None:
            found = self.sessions[key] = Session(exporter, version, domain)
            if len(self.sessions) > self.max_sessions:
                _, gone = self.sessions.popitem(last=False)
                self._forget_held(gone)
        elif len(self.sessions) > 64:  # keep LRU order cheaply: only when there are many
            self.sessions.move_to_end(key)
        return found

    def restore(self, exporter: str, version: int, domain: int, template: Template) -> None:
        """Put back a template persisted earlier (no events)."""
        self.session(exporter, version, domain).templates[template.id] = template

    @property
    def held_sets(self) -> int:
        return len(self._held)

    # -- datagrams

    def feed(self, data: bytes, exporter: str, now: float) -> list[Event]:
        """The events of one datagram from ``exporter`` (its IP address as text) received at ``now`` (seconds, any clock)."""
        events: list[Event] = []
        if self._held:
            self._expire(now, events)
        if len(data) < 2:
            events.append(Malformed(exporter, "truncated_header", f"a {len(data)}-byte datagram has no version"))
            return events
        version = data[0] << 8 | data[1]
        try:
            if version == V9:
                self._v9(data, exporter, now, events)
            elif version == IPFIX:
                self._ipfix(data, exporter, now, events)
            elif version == V5:
                self._v5(data, exporter, events)
            elif version == 0 and data[2:4] == b"\x00\x05":  # sFlow: a 32-bit version 5
                parse_sflow(self, data, events)
            else:
                raise MalformedError("unknown_version", f"version {version} is not NetFlow v5, v9, IPFIX (10) or sFlow v5")
        except MalformedError as exc:
            events.append(Malformed(exporter, exc.reason, str(exc), version))
        return events

    def _v5(self, data: bytes, exporter: str, events: list[Event]) -> None:
        if len(data) < _V5_HEADER.size:
            raise MalformedError("truncated_header", f"a NetFlow v5 header is 24 bytes, the datagram has {len(data)}")
        _, count, uptime, secs, nsecs, sequence, engine_type, engine_id, sampling = _V5_HEADER.unpack_from(data)
        if count == 0 or count > V5_MAX_COUNT:
            raise MalformedError("bad_count", f"a NetFlow v5 datagram holds 1 to {V5_MAX_COUNT} records, this one says {count}")
        if len(data) < 24 + count * V5_RECORD:
            raise MalformedError("length_beyond_datagram", f"{count} v5 records need {24 + count * V5_RECORD} bytes, the datagram has {len(data)}")
        session = self.session(exporter, V5, engine_type << 8 | engine_id)
        interval = sampling & 0x3FFF
        if interval:
            session.sampling[None] = interval
        self._sequence(session, sequence, count, events)
        export = Export(V5, sequence, secs, secs * 1000 + nsecs // 1_000_000 - uptime, interval)
        rows = V5_TEMPLATE.decoder.decode(memoryview(data)[24 : 24 + count * V5_RECORD])
        events.append(DataRecords(session, V5_TEMPLATE, rows, export))

    def _v9(self, data: bytes, exporter: str, now: float, events: list[Event]) -> None:
        if len(data) < _V9_HEADER.size:
            raise MalformedError("truncated_header", f"a NetFlow v9 header is 20 bytes, the datagram has {len(data)}")
        _, _count, uptime, secs, sequence, source_id = _V9_HEADER.unpack_from(data)
        session = self.session(exporter, V9, source_id)
        self._sequence(session, sequence, 1, events)
        export = Export(V9, sequence, secs, secs * 1000 - uptime)
        self._sets(data, _V9_HEADER.size, len(data), session, export, now, events)

    def _ipfix(self, data: bytes, exporter: str, now: float, events: list[Event]) -> None:
        if len(data) < _IPFIX_HEADER.size:
            raise MalformedError("truncated_header", f"an IPFIX message header is 16 bytes, the datagram has {len(data)}")
        _, length, export_time, sequence, domain = _IPFIX_HEADER.unpack_from(data)
        if length > len(data):
            raise MalformedError("length_beyond_datagram", f"the IPFIX header says {length} bytes, the datagram has {len(data)}")
        if length < _IPFIX_HEADER.size:
            raise MalformedError("bad_length", f"the IPFIX header says {length} bytes, less than the header itself")
        session = self.session(exporter, IPFIX, domain)
        export = Export(IPFIX, sequence, export_time, session.system_init_ms)
        before = len(events)
        try:
            self._sets(data, _IPFIX_HEADER.size, length, session, export, now, events)
        finally:
            records = flows = 0
            countable = True
            for ev in events[before:]:
                if type(ev) is DataRecords:
                    records += len(ev.rows)
                    flows += 0 if ev.template.options else len(ev.rows)
                elif type(ev) is UnknownTemplate:
                    countable = False
            self._ipfix_sequence(session, sequence, records, flows, countable, events)

    def _ipfix_sequence(self, session: Session, sequence: int, records: int, flows: int, countable: bool, events: list[Event]) -> None:
        """RFC 7011 counts all data records before this message; some exporters (softflowd) count
        only flow records, or include this message's own: any of those steps is in order, and the
        one an exporter uses is remembered to size a gap."""
        last = session.last_ipfix
        session.last_ipfix = (sequence, records, flows) if countable else None
        if last is None:
            return
        last_sequence, last_records, last_flows = last
        steps = (last_records, last_flows, records, flows)
        step = (sequence - last_sequence) % _MOD32
        if step in steps:
            session.ipfix_convention = steps.index(step)
            return
        expected = (last_sequence + steps[session.ipfix_convention]) % _MOD32
        ahead = (sequence - expected) % _MOD32
        if ahead < _HALF32:
            events.append(SequenceGap(session, expected, sequence, ahead))

    def _sequence(self, session: Session, sequence: int, advance: int, events: list[Event], *, countable: bool = True) -> None:
        expected = session.next_sequence
        if expected is not None and sequence != expected:
            ahead = (sequence - expected) % _MOD32
            if ahead < _HALF32:
                events.append(SequenceGap(session, expected, sequence, ahead))
        session.next_sequence = (sequence + advance) % _MOD32 if countable else None

    # -- sets

    def _sets(self, data: bytes, pos: int, end: int, session: Session, export: Export, now: float, events: list[Event]) -> None:
        view = memoryview(data)
        v9 = session.version == V9
        while pos < end:
            if end - pos < 4:
                if v9 and not any(data[pos:end]):
                    return  # some v9 exporters pad the packet
                raise MalformedError("truncated_set", f"{end - pos} bytes after the last set are too few for a set header")
            set_id, length = _SET_HEADER.unpack_from(data, pos)
            if length < 4:
                raise MalformedError("bad_set_length", f"set {set_id} at byte {pos} has length {length} (at least 4)")
            if pos + length > end:
                raise MalformedError("length_beyond_datagram", f"set {set_id} at byte {pos} says {length} bytes, {end - pos} are left")
            body_start, pos = pos + 4, pos + length
            if set_id >= 256:
                template = session.templates.get(set_id)
                if template is None:
                    self._hold(session, set_id, data[body_start:pos], export, now, events)
                    continue
                if template.options:
                    self._options_data(session, template, view[body_start:pos], export, events)
                    continue
                if not v9 and export.boot_ms != session.system_init_ms:  # learnt from options data just now
                    export = Export(IPFIX, export.sequence, export.export_time, session.system_init_ms)
                events.append(DataRecords(session, template, template.decoder.decode(view[body_start:pos]), export))
            elif v9 and set_id == 0 or not v9 and set_id == 2:
                self._templates(data, body_start, pos, session, now, events)
            elif v9 and set_id == 1 or not v9 and set_id == 3:
                self._options_templates(data, body_start, pos, session, now, events)
            # other ids below 256 are reserved: skipped (RFC 7011 §3.3.2)

    def _options_data(self, session: Session, template: Template, body: memoryview, export: Export, events: list[Event]) -> None:
        rows = template.decoder.decode(body)
        columns = template.decoder.columns
        index = {c.id: i for i, c in enumerate(columns) if not c.pen and c.is_int}
        for row in rows:
            sampler = None
            for key in (_SAMPLER_ID, _SELECTOR_ID):
                if key in index:
                    sampler = row[index[key]]
                    break
            rate = 0
            if _SAMPLING_INTERVAL in index:
                rate = row[index[_SAMPLING_INTERVAL]]
            elif _SAMPLER_RANDOM_INTERVAL in index:
                rate = row[index[_SAMPLER_RANDOM_INTERVAL]]
            elif _PACKET_INTERVAL in index and row[index[_PACKET_INTERVAL]]:
                interval = row[index[_PACKET_INTERVAL]]
                space = row[index[_PACKET_SPACE]] if _PACKET_SPACE in index else 0
                rate = (interval + space) // interval
            if rate:
                session.sampling[sampler] = rate
            if _SYSTEM_INIT_MS in index:
                session.system_init_ms = row[index[_SYSTEM_INIT_MS]]
        events.append(DataRecords(session, template, rows, export))

    def _add_template(self, session: Session, template: Template, now: float, events: list[Event]) -> None:
        if template.id < 256:
            raise MalformedError("bad_template_id", f"template id {template.id} is reserved (data templates are 256 and above)")
        if not template.same_as(session.templates.get(template.id)):
            session.templates[template.id] = template
            events.append(TemplateUpdate(session, template))
        if self._held:
            self._release(session, template, events)

    def _withdraw(self, session: Session, template_id: int, events: list[Event]) -> None:
        if template_id in (2, 3):  # withdraw all data (2) or all options (3) templates
            options = template_id == 3
            for tid in [t for t, tpl in session.templates.items() if tpl.options == options]:
                del session.templates[tid]
        elif template_id < 256:
            raise MalformedError("bad_template_id", f"a withdrawal names reserved template id {template_id}")
        else:
            session.templates.pop(template_id, None)
        events.append(TemplateWithdrawn(session, template_id))

    def _templates(self, data: bytes, pos: int, end: int, session: Session, now: float, events: list[Event]) -> None:
        ipfix = session.version == IPFIX
        while end - pos >= 4:
            template_id, count = _PAIR.unpack_from(data, pos)
            pos += 4
            if count == 0:
                if template_id == 0 and not any(data[pos:end]):
                    return  # padding
                if not ipfix:
                    raise MalformedError("empty_template", f"NetFlow v9 template {template_id} has no fields")
                self._withdraw(session, template_id, events)
                continue
            fields, pos = _read_fields(data, pos, end, count, ipfix, template_id)
            self._add_template(session, Template(template_id, fields), now, events)

    def _options_templates(self, data: bytes, pos: int, end: int, session: Session, now: float, events: list[Event]) -> None:
        ipfix = session.version == IPFIX
        while end - pos >= (4 if ipfix else 6):
            if ipfix:
                template_id, count = _PAIR.unpack_from(data, pos)
                if count == 0:  # withdrawal: a 4-byte record
                    if template_id == 0 and not any(data[pos:end]):
                        return
                    pos += 4
                    self._withdraw(session, template_id, events)
                    continue
                if end - pos < 6:
                    raise MalformedError("truncated_template", f"options template {template_id} lacks its scope field count")
                _, _, scope = _TRIPLE.unpack_from(data, pos)
                pos += 6
                if scope == 0 or scope > count:
                    raise MalformedError("bad_scope", f"options template {template_id} has {scope} scope fields of {count}")
            else:
                template_id, scope_len, option_len = _TRIPLE.unpack_from(data, pos)
                if template_id == 0 and not any(data[pos:end]):
                    return
                pos += 6
                if scope_len % 4 or option_len % 4 or scope_len == 0:
                    raise MalformedError(
                        "bad_scope", f"options template {template_id}: scope length {scope_len} and option length {option_len} must be multiples of 4, scope at least 4"
                    )
                scope, count = scope_len // 4, (scope_len + option_len) // 4
            fields, pos = _read_fields(data, pos, end, count, ipfix, template_id)
            self._add_template(session, Template(template_id, fields, options=True, scope_count=scope), now, events)

    # -- held data sets

    def _hold(self, session: Session, template_id: int, body: bytes, export: Export, now: float, events: list[Event]) -> None:
        held = self.max_held_sets > 0 and self.held_timeout > 0
        events.append(UnknownTemplate(session, template_id, held))
        if not held:
            return
        self._held_serial += 1
        self._held[self._held_serial] = _Held(session, template_id, body, export, now)
        while len(self._held) > self.max_held_sets:
            _, gone = self._held.popitem(last=False)
            events.append(HeldDropped(gone.session, gone.template_id, "overflow"))

    def _release(self, session: Session, template: Template, events: list[Event]) -> None:
        waiting = [k for k, h in self._held.items() if h.session is session and h.template_id == template.id]
        for k in waiting:
            h = self._held.pop(k)
            body = memoryview(h.body)
            export = h.export
            if export.version == IPFIX and export.boot_ms is None and session.system_init_ms is not None:
                export = Export(export.version, export.sequence, export.export_time, session.system_init_ms, export.sampling)
            if template.options:
                self._options_data(session, template, body, export, events)
            else:
                events.append(DataRecords(session, template, template.decoder.decode(body), export))

    def _expire(self, now: float, events: list[Event]) -> None:
        limit = now - self.held_timeout
        while self._held:
            k, oldest = next(iter(self._held.items()))
            if oldest.arrived > limit:
                return
            del self._held[k]
            events.append(HeldDropped(oldest.session, oldest.template_id, "expired"))

    def _forget_held(self, session: Session) -> None:
        for k in [k for k, h in self._held.items() if h.session is session]:
            del self._held[k]


def _read_fields(data: bytes, pos: int, end: int, count: int, ipfix: bool, template_id: int) -> tuple[tuple[Field, ...], int]:
    fields = []
    for _ in range(count):
        if end - pos < 4:
            raise MalformedError("truncated_template", f"template {template_id} declares {count} fields, the set ends after {len(fields)}")
        fid, length = _PAIR.unpack_from(data, pos)
        pos += 4
        pen = 0
        if ipfix and fid & 0x8000:
            if end - pos < 4:
                raise MalformedError("truncated_template", f"template {template_id}: an enterprise field lacks its enterprise number")
            (pen,) = _U32.unpack_from(data, pos)
            pos += 4
            fid &= 0x7FFF
        if length == 0:
            raise MalformedError("zero_length_field", f"template {template_id} has field {fid} of length 0")
        if length == VARIABLE and not ipfix:
            raise MalformedError("zero_length_field", f"NetFlow v9 template {template_id} has field {fid} of length 65535 (variable length is IPFIX only)")
        fields.append(Field(fid, length, pen))
    return tuple(fields), pos


def template_key(session: Session, template_id: int) -> str:
    """The storage key of a session's template: ``exporter|version|domain|template id``."""
    return f"{session.exporter}|{session.version}|{session.domain}|{template_id}"


def parse_template_key(key: str) -> tuple[str, int, int, int]:
    """Inverse of `template_key` (raises ValueError)."""
    exporter, version, domain, tid = key.rsplit("|", 3)
    return exporter, int(version), int(domain), int(tid)
