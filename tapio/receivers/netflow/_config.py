"""The netflow receiver's configuration.

Invariants:
- A listener is enabled exactly when its group under ``protocols`` is not
  None. The default config enables the three conventional ports on
  127.0.0.1 (as the OpenTelemetry Collector's netflow receiver listens on
  2055): NetFlow/IPFIX 2055, IPFIX 4739, sFlow 6343. A config naming only
  some groups enables only those. Every listener decodes every format (the
  version field tells them apart); the ports are conventions.
- `validate` reports every problem, each prefixed with its dotted key; what
  it accepts runs (mappings name elements the registry parses, attribute
  names are known, endpoints parse and do not collide).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from tapio.component import StorageRef, setting
from tapio.units import ByteSize, Duration, parse_listen_address

from . import _ie
from ._records import ATTRIBUTES, MAPPING_TYPES, Mapping, Output

_LISTEN_DOC = "host:port to receive UDP datagrams on ([addr]:port for IPv6; an empty host listens on every interface; port 0 picks a free port)."
MAX_SOCKETS = 64
#: the largest receive buffer asked of the kernel
MAX_RECEIVE_BUFFER = ByteSize(1 << 30)


def parse_endpoint(text: str) -> tuple[str, int]:
    return parse_listen_address(text, example="127.0.0.1:2055")


@dataclass(frozen=True, kw_only=True)
class NetflowListener:
    endpoint: str = setting("127.0.0.1:2055", doc=_LISTEN_DOC)


@dataclass(frozen=True, kw_only=True)
class IpfixListener:
    endpoint: str = setting("127.0.0.1:4739", doc=_LISTEN_DOC)


@dataclass(frozen=True, kw_only=True)
class SflowListener:
    endpoint: str = setting("127.0.0.1:6343", doc=_LISTEN_DOC)


@dataclass(frozen=True, kw_only=True)
class Protocols:
    netflow: NetflowListener | None = setting(None, doc="The NetFlow listener (v5, v9 and IPFIX; port 2055 by convention); enabled when the key is present.")
    ipfix: IpfixListener | None = setting(None, doc="The IPFIX listener (port 4739, IANA's); enabled when the key is present.")
    sflow: SflowListener | None = setting(None, doc="The sFlow v5 listener (port 6343, IANA's); enabled when the key is present.")


def _all_protocols() -> Protocols:
    return Protocols(netflow=NetflowListener(), ipfix=IpfixListener(), sflow=SflowListener())


@dataclass(frozen=True, kw_only=True)
class MappingConfig:
    element: str = setting(
        "",
        doc="The element: an IANA name (`samplingInterval`), a number (an IANA element id or a NetFlow v9 field type, e.g. 34000), or `<enterprise number>:<id>` for an IPFIX enterprise element (e.g. `9:12232`).",
    )
    attribute: str = setting("", doc="The log record attribute it becomes, e.g. `cisco.trustsec.source_sgt`.")
    type: Literal["auto", "unsigned", "string", "ipv4", "ipv6", "mac", "bytes"] = setting(
        "auto",
        doc="How to turn the value into the attribute: `auto` follows the IANA type (enterprise and unknown elements: numbers of 1, 2, 4 or 8 bytes as integers, else bytes); `unsigned` reads any length as a big-endian integer.",
    )


@dataclass(frozen=True, kw_only=True)
class HoldConfig:
    max_sets: int = setting(
        1024,
        doc="Data sets kept, over all exporters, while their template has not arrived; the oldest is dropped (counted) past this. 0 holds none (they are counted as unknown templates and dropped).",
    )
    timeout: Duration = setting(Duration(60.0), doc="How long a held data set waits for its template before it is dropped and counted.")


@dataclass(frozen=True, kw_only=True)
class Config:
    protocols: Protocols = setting(default_factory=_all_protocols, doc="Which UDP listeners to run. Without a `protocols` key all three run with their defaults.")
    sockets: int = setting(
        1,
        doc="UDP sockets per listener, bound to the same port with SO_REUSEPORT; the kernel spreads exporters over them, each with its own receive buffer.",
    )
    receive_buffer_size: ByteSize = setting(
        ByteSize(4 * 1024 * 1024),
        doc="Kernel receive buffer of each socket (SO_RCVBUF; as root also beyond net.core.rmem_max). Datagrams that arrive while it is full are dropped by the kernel and counted. 0 keeps the kernel's default.",
    )
    storage: StorageRef | None = setting(
        None,
        doc="A storage extension (e.g. `storage`) where templates are kept, so data arriving right after a restart still decodes. None keeps them in memory only.",
    )
    attributes: list[str] = setting(
        default_factory=list,
        doc="Which built-in attributes to put on each flow's log record (see the list above). Empty means all of them; fewer attributes cost less to build.",
    )
    mapping: list[MappingConfig] = setting(
        default_factory=list,
        doc="More attributes from elements the records carry: each entry names an `element`, the `attribute` it becomes and its `type`.",
    )
    enterprise_elements: Literal["raw", "drop"] = setting(
        "raw",
        doc="Enterprise-specific elements no mapping names: `raw` keeps each as a bytes attribute `ipfix.<enterprise number>.<id>`; `drop` leaves them out.",
    )
    apply_sampling: bool = setting(
        False,
        doc="Multiply bytes and packets (on records and in the metrics) by the sampling rate the exporter announced (options data, the v5 header, sFlow samples). false reports them as sent.",
    )
    hold: HoldConfig = setting(default_factory=HoldConfig, doc="Data sets that arrive before their template.")
    max_batch_records: int = setting(
        2048,
        doc="Most log records in one batch handed to the pipeline; the receiver reads whatever datagrams are waiting, up to this.",
    )
    metrics_interval: Duration = setting(
        Duration(10.0),
        doc="How often traffic totals (bytes, packets, flows by exporter and protocol), error counters and sFlow interface counters are emitted on the metrics signal. 0 emits none.",
    )

    def output(self) -> Output:
        """The record builder's settings from this config (assumes `validate` passed)."""
        mappings = []
        for m in self.mapping:
            pen, eid = _ie.parse_element(m.element)
            mappings.append(Mapping(pen, eid, m.attribute, m.type))
        return Output(
            attributes=frozenset(self.attributes or ATTRIBUTES),
            mappings=tuple(mappings),
            enterprise_raw=self.enterprise_elements == "raw",
            apply_sampling=self.apply_sampling,
        )

    def listeners(self) -> list[tuple[str, str]]:
        """(config key, endpoint) of each enabled listener."""
        out = []
        for name in ("netflow", "ipfix", "sflow"):
            group = getattr(self.protocols, name)
            if group is not None:
                out.append((f"protocols.{name}.endpoint", group.endpoint))
        return out

    def validate(self) -> list[str]:
        problems: list[str] = []
        listeners = self.listeners()
        if not listeners:
            problems.append("protocols: must enable at least one of netflow, ipfix, sflow")
        seen: dict[tuple[str, int], str] = {}
        for key, endpoint in listeners:
            try:
                addr = parse_endpoint(endpoint)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                continue
            if addr in seen and addr[1] != 0:
                problems.append(f"{key}: {endpoint} is also {seen[addr]}")
            seen.setdefault(addr, key)
        if not 1 <= self.sockets <= MAX_SOCKETS:
            problems.append(f"sockets: must be 1 to {MAX_SOCKETS}, got {self.sockets}")
        if self.receive_buffer_size > MAX_RECEIVE_BUFFER:
            problems.append(f"receive_buffer_size: at most 1GiB, got {int(self.receive_buffer_size)}")
        known = set(ATTRIBUTES)
        for i, name in enumerate(self.attributes):
            if name not in known:
                close = difflib.get_close_matches(name, ATTRIBUTES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"attributes[{i}]: {name!r} is not a built-in attribute{hint}; elements the records carry can be added with `mapping`")
        names: dict[str, int] = {}
        for i, m in enumerate(self.mapping):
            try:
                _ie.parse_element(m.element)
            except ValueError as exc:
                problems.append(f"mapping[{i}].element: {exc}")
            if not m.attribute.strip():
                problems.append(f"mapping[{i}].attribute: must name the attribute the element becomes")
            elif m.attribute in known:
                problems.append(f"mapping[{i}].attribute: {m.attribute!r} is a built-in attribute; choose another name")
            elif m.attribute in names:
                problems.append(f"mapping[{i}].attribute: {m.attribute!r} is also mapping[{names[m.attribute]}]")
            names.setdefault(m.attribute, i)
            if m.type not in MAPPING_TYPES:
                problems.append(f"mapping[{i}].type: must be one of {', '.join(MAPPING_TYPES)}")
        if self.hold.max_sets < 0:
            problems.append(f"hold.max_sets: must be 0 or more, got {self.hold.max_sets}")
        if self.max_batch_records < 1:
            problems.append(f"max_batch_records: must be at least 1, got {self.max_batch_records}")
        return problems
