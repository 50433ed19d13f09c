"""The netflow receiver's sans-IO parsers and record builders, on bytes only.

Datagrams are written from the specs by `tapio.testing.netflow` (and, for
sFlow's sampled headers, by scapy); the real exporters are in
test_netflow_receiver.py. Every malformed input must end in a counted
`Malformed` event, never an exception.
"""

from __future__ import annotations

import socket
import struct

import pytest
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from tapio.receivers.netflow import _encode as enc
from tapio.receivers.netflow._parser import (
    Collector,
    DataRecords,
    HeldDropped,
    Malformed,
    SequenceGap,
    TemplateUpdate,
    TemplateWithdrawn,
    UnknownTemplate,
)
from tapio.receivers.netflow._records import Mapping, Output, RecordBuilder
from tapio.receivers.netflow._sflow import InterfaceCounters
from tapio.receivers.netflow._templates import Template
from tapio.testing import netflow as nf

EXPORTER = "192.0.2.10"
# softflowd's IPv4 template, as it sends it (element, length)
SOFTFLOWD_V4 = [(8, 4), (12, 4), (22, 4), (21, 4), (1, 4), (2, 4), (10, 4), (14, 4), (61, 1), (136, 1), (7, 2), (11, 2), (4, 1), (6, 1), (60, 1), (5, 1)]
V4_RECORD = struct.Struct("!4s4sIIIIIIBBHHBBBB")


def v4_record(src: str, dst: str, sport: int, dport: int, proto: int = 6, octets: int = 100, packets: int = 2, first: int = 1000, last: int = 2000) -> bytes:
    return V4_RECORD.pack(socket.inet_aton(src), socket.inet_aton(dst), first, last, octets, packets, 1, 2, 0, 1, sport, dport, proto, 0x12, 4, 0)


def records(events) -> list[DataRecords]:
    return [e for e in events if isinstance(e, DataRecords) and not e.template.options]


def build(events, output: Output = Output(), received_ns: int = 1_800_000_000_000_000_000) -> list[dict]:
    """The log records the receiver would write for ``events``, parsed back with protobuf."""
    builder = RecordBuilder(output)
    items: list[bytes] = []
    for ev in records(events):
        compiled = builder.compiled(ev.template)
        compiled.encode(ev.rows, items, builder.context(ev, received_ns, enc.observed_time_field(received_ns), compiled))
    req = ExportLogsServiceRequest.FromString(enc.logs_request(enc.resource([("service.name", "tapio")]), enc.scope("t", "1"), items))
    out = []
    for lr in req.resource_logs[0].scope_logs[0].log_records:
        attrs = {a.key: next(iter(MessageToDict(a.value).values())) for a in lr.attributes}
        attrs["_time"] = lr.time_unix_nano
        out.append(attrs)
    return out


def v9_softflowd(records_bytes: list[bytes], *, sequence: int = 0, with_template: bool = True) -> bytes:
    sets = [nf.template_set([(1024, SOFTFLOWD_V4)], ipfix=False)] if with_template else []
    sets.append(nf.flow_set(1024, b"".join(records_bytes)))
    return nf.v9_datagram(sets, sequence=sequence, uptime_ms=10_000, unix_secs=1_700_000_000)


# -- NetFlow v9 and IPFIX


def test_v9_template_and_data_decode_to_otel_attributes():
    c = Collector()
    events = c.feed(v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1000, 80), v4_record("10.0.0.3", "10.0.0.4", 53, 5353, proto=17, octets=70, packets=1)]), EXPORTER, 0.0)
    assert [type(e) for e in events] == [TemplateUpdate, DataRecords]
    got = build(events)
    assert len(got) == 2
    first = got[0]
    assert first["source.address"] == "10.0.0.1" and first["destination.address"] == "10.0.0.2"
    assert int(first["source.port"]) == 1000 and int(first["destination.port"]) == 80
    assert first["network.transport"] == "tcp" and first["network.type"] == "ipv4"
    assert int(first["flow.io.bytes"]) == 100 and int(first["flow.io.packets"]) == 2
    assert first["flow.type"] == "netflow_v9" and first["flow.sampler_address"] == EXPORTER
    # sysUpTime 1000 ms at an uptime of 10 s when the header says 1_700_000_000 s
    assert int(first["flow.start"]) == (1_700_000_000_000 - 10_000 + 1000) * 1_000_000
    assert int(first["flow.end"]) == (1_700_000_000_000 - 10_000 + 2000) * 1_000_000
    assert first["_time"] == int(first["flow.start"])
    assert int(first["flow.tcp_flags"]) == 0x12 and int(first["flow.in_if"]) == 1 and int(first["flow.out_if"]) == 2
    assert got[1]["network.transport"] == "udp" and int(got[1]["flow.io.bytes"]) == 70


def test_only_the_configured_attributes_are_built():
    c = Collector()
    events = c.feed(v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1000, 80)]), EXPORTER, 0.0)
    got = build(events, Output(attributes=frozenset({"source.address", "flow.io.bytes"})))
    assert set(got[0]) == {"source.address", "flow.io.bytes", "_time"}


def test_template_refresh_with_same_fields_is_no_update_and_a_change_is():
    c = Collector()
    c.feed(v9_softflowd([]), EXPORTER, 0.0)
    assert not [e for e in c.feed(v9_softflowd([], sequence=1), EXPORTER, 0.0) if isinstance(e, TemplateUpdate)]
    changed = nf.v9_datagram([nf.template_set([(1024, [(8, 4), (12, 4)])], ipfix=False)], sequence=2)
    assert [type(e) for e in c.feed(changed, EXPORTER, 0.0)] == [TemplateUpdate]


def test_data_before_its_template_is_held_then_decoded_with_its_own_header():
    c = Collector()
    early = c.feed(v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1, 2)], with_template=False, sequence=0), EXPORTER, 0.0)
    assert [type(e) for e in early] == [UnknownTemplate] and early[0].held
    assert c.held_sets == 1
    late = c.feed(nf.v9_datagram([nf.template_set([(1024, SOFTFLOWD_V4)], ipfix=False)], sequence=1, uptime_ms=99_000, unix_secs=1_700_000_500), EXPORTER, 1.0)
    assert [type(e) for e in late] == [TemplateUpdate, DataRecords]
    assert late[1].export.sequence == 0 and late[1].export.boot_ms == 1_700_000_000_000 - 10_000
    assert c.held_sets == 0
    assert build(late)[0]["source.address"] == "10.0.0.1"


def test_held_sets_expire_and_overflow_and_each_is_counted_once():
    c = Collector(max_held_sets=2, held_timeout=5.0)
    for i in range(3):
        events = c.feed(v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1, 2)], with_template=False, sequence=i), EXPORTER, float(i))
    assert [e.reason for e in events if isinstance(e, HeldDropped)] == ["overflow"]
    assert c.held_sets == 2
    later = c.feed(nf.v9_datagram([], sequence=3), EXPORTER, 100.0)
    assert [e.reason for e in later if isinstance(e, HeldDropped)] == ["expired", "expired"]
    assert c.held_sets == 0


def test_nothing_is_held_when_holding_is_off():
    c = Collector(max_held_sets=0)
    events = c.feed(v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1, 2)], with_template=False), EXPORTER, 0.0)
    assert [(type(e), e.held) for e in events] == [(UnknownTemplate, False)] and c.held_sets == 0


def test_v9_options_template_sets_sampling_per_sampler_and_apply_sampling_scales():
    c = Collector()
    options = nf.options_template_set(300, [(1, 4)], [(48, 1), (34, 4)], ipfix=False)  # scope: system; samplerId, samplingInterval
    option_data = nf.flow_set(300, struct.pack("!IBI", 0, 7, 100))
    template = nf.template_set([(1024, [*SOFTFLOWD_V4, (48, 1)])], ipfix=False)
    data = nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2, octets=10, packets=1) + b"\x07")
    events = c.feed(nf.v9_datagram([options, option_data, template, data]), EXPORTER, 0.0)
    session = c.sessions[(EXPORTER, 9, 0)]
    assert session.sampling == {7: 100}
    plain = build(events)[0]
    assert int(plain["flow.sampling_rate"]) == 100 and int(plain["flow.io.bytes"]) == 10
    scaled = build(events, Output(apply_sampling=True))[0]
    assert int(scaled["flow.io.bytes"]) == 1000 and int(scaled["flow.io.packets"]) == 100


def test_ipfix_options_with_packet_interval_and_system_init_time():
    c = Collector()
    options = nf.options_template_set(256, [(143, 4)], [(160, 8), (305, 4), (306, 4)], ipfix=True)
    option_data = nf.flow_set(256, struct.pack("!IQII", 1, 1_699_999_000_000, 1, 9), pad_to=1)
    template = nf.template_set([(1024, SOFTFLOWD_V4)], ipfix=True)
    data = nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2, first=500), pad_to=1)
    events = c.feed(nf.ipfix_message([options, option_data, template, data]), EXPORTER, 0.0)
    session = c.sessions[(EXPORTER, 10, 0)]
    assert session.sampling == {None: 10} and session.system_init_ms == 1_699_999_000_000
    got = build(events)[0]
    assert int(got["flow.start"]) == (1_699_999_000_000 + 500) * 1_000_000
    assert int(got["flow.sampling_rate"]) == 10 and got["flow.type"] == "ipfix"


def test_ipfix_withdrawal_of_one_and_of_all_templates():
    c = Collector()
    c.feed(nf.ipfix_message([nf.template_set([(300, [(8, 4)]), (301, [(12, 4)])], ipfix=True)]), EXPORTER, 0.0)
    withdraw = c.feed(nf.ipfix_message([nf.template_set([(300, [])], ipfix=True)], sequence=0), EXPORTER, 0.0)
    assert [(type(e), e.template_id) for e in withdraw] == [(TemplateWithdrawn, 300)]
    after = c.feed(nf.ipfix_message([nf.flow_set(300, b"\x01\x02\x03\x04", pad_to=1)]), EXPORTER, 0.0)
    assert [type(e) for e in after] == [UnknownTemplate]
    everything = c.feed(nf.ipfix_message([nf.template_set([(2, [])], ipfix=True)]), EXPORTER, 0.0)
    assert [(type(e), e.template_id) for e in everything] == [(TemplateWithdrawn, 2)]
    assert c.sessions[(EXPORTER, 10, 0)].templates == {}


def test_ipfix_variable_length_enterprise_elements_and_padding():
    c = Collector()
    fields = [(8, 4), (210, 2), (82, 65535), (12235, 65535, 9), (12232, 2, 9)]
    template = nf.template_set([(400, fields)], ipfix=True)
    long_name = b"x" * 300
    rec1 = socket.inet_aton("10.1.1.1") + b"\0\0" + b"\x04eth0" + b"\x03web" + b"\x00\x2a"
    rec2 = socket.inet_aton("10.1.1.2") + b"\0\0" + b"\xff" + struct.pack("!H", 300) + long_name + b"\x00" + b"\x00\x07"
    data = nf.flow_set(400, rec1 + rec2 + b"\x00\x00\x00")  # three bytes of set padding
    events = c.feed(nf.ipfix_message([template, data]), EXPORTER, 0.0)
    (ev,) = records(events)
    assert ev.rows == [(b"\x0a\x01\x01\x01", b"eth0", b"web", b"\x00\x2a"), (b"\x0a\x01\x01\x02", long_name, b"", b"\x00\x07")]
    raw = build(events)
    assert raw[0]["ipfix.9.12235"] and raw[0]["ipfix.9.12232"]  # raw bytes (base64 in JSON)
    mapped = build(events, Output(mappings=(Mapping(9, 12235, "cisco.application", "string"), Mapping(9, 12232, "cisco.sgt"), Mapping(0, 82, "interface.name"))))
    assert mapped[0]["cisco.application"] == "web" and int(mapped[0]["cisco.sgt"]) == 42 and mapped[0]["interface.name"] == "eth0"
    assert "ipfix.9.12235" not in mapped[0] and "ipfix.9.12232" not in mapped[0]
    dropped = build(events, Output(enterprise_raw=False))
    assert not any(k.startswith("ipfix.") for k in dropped[0])


def test_v9_field_types_above_32767_map_like_cisco_trustsec_tags():
    c = Collector()
    template = nf.template_set([(1024, [(8, 4), (34000, 2), (34001, 2)])], ipfix=False)
    data = nf.flow_set(1024, socket.inet_aton("10.0.0.9") + struct.pack("!HH", 10, 20))
    events = c.feed(nf.v9_datagram([template, data]), EXPORTER, 0.0)
    got = build(events, Output(mappings=(Mapping(0, 34000, "cisco.trustsec.source_sgt"), Mapping(0, 34001, "cisco.trustsec.destination_sgt"))))[0]
    assert int(got["cisco.trustsec.source_sgt"]) == 10 and int(got["cisco.trustsec.destination_sgt"]) == 20


def test_reduced_size_and_odd_length_numbers():
    c = Collector()
    template = nf.template_set([(500, [(8, 4), (1, 3), (2, 8), (152, 8)])], ipfix=True)
    data = nf.flow_set(500, socket.inet_aton("10.0.0.1") + (70000).to_bytes(3, "big") + struct.pack("!QQ", 5, 1_700_000_000_123), pad_to=1)
    got = build(c.feed(nf.ipfix_message([template, data]), EXPORTER, 0.0))[0]
    assert int(got["flow.io.bytes"]) == 70000 and int(got["flow.io.packets"]) == 5
    assert int(got["flow.start"]) == 1_700_000_000_123_000_000


def test_ipfix_ntp_microsecond_times():
    c = Collector()
    template = nf.template_set([(500, [(8, 4), (154, 8), (155, 8)])], ipfix=True)
    ntp = ((1_700_000_000 + 2_208_988_800) << 32) | (1 << 31)  # .5 s
    data = nf.flow_set(500, socket.inet_aton("10.0.0.1") + struct.pack("!QQ", ntp, ntp), pad_to=1)
    got = build(c.feed(nf.ipfix_message([template, data]), EXPORTER, 0.0))[0]
    assert int(got["flow.start"]) == 1_700_000_000_500_000_000


@pytest.mark.parametrize("ms", [0, 1, 16_383, 72_057_594_037, 1_700_000_000_123, 9_223_372_036_854, 2**63 // 1_000_000 + 1, 2**64 - 1])
def test_flow_times_of_every_size_encode_as_protobuf_int64(ms):
    # nanosecond times take a table path between 2**56 and 2**63 and the general varint elsewhere
    c = Collector()
    template = nf.template_set([(500, [(8, 4), (152, 8), (153, 8)])], ipfix=True)
    data = nf.flow_set(500, socket.inet_aton("10.0.0.1") + struct.pack("!QQ", ms, ms), pad_to=1)
    got = build(c.feed(nf.ipfix_message([template, data]), EXPORTER, 0.0))[0]
    ns = ms * 1_000_000 & (1 << 64) - 1
    want = ns - (1 << 64) if ns >= 1 << 63 else ns
    assert int(got.get("flow.start", 0)) == want and int(got.get("flow.end", 0)) == want


def test_v5_records_and_header_sampling():
    c = Collector()
    rec = nf.v5_record("10.0.0.1", "10.0.0.2", sport=1234, dport=443, proto=6, packets=3, octets=300, first_ms=5000, last_ms=6000, src_as=64500, dst_as=64501, next_hop="10.0.0.254")
    events = c.feed(nf.v5_datagram([rec], sampling=(1 << 14) | 50), EXPORTER, 0.0)
    got = build(events, Output(apply_sampling=True))[0]
    assert got["flow.type"] == "netflow_v5" and int(got["flow.sampling_rate"]) == 50
    assert int(got["flow.io.bytes"]) == 15000 and int(got["flow.io.packets"]) == 150
    assert int(got["flow.src_as"]) == 64500 and got["flow.next_hop"] == "10.0.0.254"
    assert int(got["flow.start"]) == (1_700_000_000_000 - 10_000 + 5000) * 1_000_000


def test_sequence_gaps_per_protocol():
    c = Collector()
    c.feed(v9_softflowd([], sequence=10), EXPORTER, 0.0)
    gap = [e for e in c.feed(v9_softflowd([], sequence=14), EXPORTER, 0.0) if isinstance(e, SequenceGap)]
    assert [(g.expected, g.received, g.missing) for g in gap] == [(11, 14, 3)]
    assert not [e for e in c.feed(v9_softflowd([], sequence=12), EXPORTER, 0.0) if isinstance(e, SequenceGap)]  # behind: reset only
    rec = nf.v5_record("10.0.0.1", "10.0.0.2")
    c.feed(nf.v5_datagram([rec, rec], sequence=100), EXPORTER, 0.0)
    assert not [e for e in c.feed(nf.v5_datagram([rec], sequence=102), EXPORTER, 0.0) if isinstance(e, SequenceGap)]
    assert [e.missing for e in c.feed(nf.v5_datagram([rec], sequence=110), EXPORTER, 0.0) if isinstance(e, SequenceGap)] == [7]
    t = nf.template_set([(300, [(8, 4)])], ipfix=True)
    c.feed(nf.ipfix_message([t, nf.flow_set(300, b"\1\1\1\1" * 3, pad_to=1)], sequence=0), EXPORTER, 0.0)
    assert not [e for e in c.feed(nf.ipfix_message([nf.flow_set(300, b"\1\1\1\1", pad_to=1)], sequence=3), EXPORTER, 0.0) if isinstance(e, SequenceGap)]
    assert [e.missing for e in c.feed(nf.ipfix_message([], sequence=9), EXPORTER, 0.0) if isinstance(e, SequenceGap)] == [5]
    # wrap-around is no gap
    c.feed(v9_softflowd([], sequence=0xFFFFFFFF, with_template=False), "192.0.2.99", 0.0)
    assert not [e for e in c.feed(v9_softflowd([], sequence=0, with_template=False), "192.0.2.99", 0.0) if isinstance(e, SequenceGap)]


def test_sessions_are_per_exporter_and_domain():
    c = Collector()
    c.feed(v9_softflowd([]), EXPORTER, 0.0)
    other_domain = nf.v9_datagram([nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2))], source_id=7)
    assert [type(e) for e in c.feed(other_domain, EXPORTER, 0.0)] == [UnknownTemplate]
    assert [type(e) for e in c.feed(v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1, 2)], with_template=False), "192.0.2.11", 0.0)] == [UnknownTemplate]


def test_template_serialization_round_trips():
    t = Template(300, tuple(__import__("tapio.receivers.netflow._templates", fromlist=["Field"]).Field(*f) for f in [(8, 4), (82, 65535), (1, 4, 9)]), options=True, scope_count=1)
    back = Template.from_bytes(t.to_bytes())
    assert back.same_as(t) and back.id == 300
    with pytest.raises(ValueError):
        Template.from_bytes(b"\x00\x01")


# -- sFlow v5


def test_sflow_flow_samples_decode_raw_headers_to_the_five_tuple():
    from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, IPv6ExtHdrHopByHop

    tcp = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=42) / IP(src="10.0.0.1", dst="10.0.0.2", tos=8) / TCP(sport=4000, dport=443, flags="SA"))
    udp6 = bytes(Ether() / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / UDP(sport=5353, dport=53))
    icmp = bytes(Ether() / IP(src="10.0.0.3", dst="10.0.0.4") / ICMP(type=8, code=0))
    samples = [
        nf.sflow_flow_sample([nf.sflow_raw_header(tcp, frame_length=1500), nf.sflow_switch(42, 43)], rate=512, in_if=3, out_if=4),
        nf.sflow_flow_sample([nf.sflow_raw_header(udp6)], rate=512, sequence=2),
        nf.sflow_flow_sample([nf.sflow_raw_header(icmp)], rate=512, sequence=3),
        nf.sflow_counter_sample(3, in_octets=10_000, out_octets=20_000, in_packets=10, out_errors=2),
    ]
    c = Collector()
    events = c.feed(nf.sflow_datagram(samples, agent="192.0.2.50"), "198.51.100.1", 0.0)
    counters = [e for e in events if isinstance(e, InterfaceCounters)]
    assert [(e.if_index, e.in_octets, e.out_octets, e.out_errors) for e in counters] == [(3, 10_000, 20_000, 2)]
    got = build(events, received_ns=1_800_000_000_000_000_000)
    assert len(got) == 3
    t, u, i = got
    assert (t["source.address"], t["destination.address"], int(t["source.port"]), int(t["destination.port"])) == ("10.0.0.1", "10.0.0.2", 4000, 443)
    assert t["network.transport"] == "tcp" and int(t["flow.tcp_flags"]) == 0x12 and int(t["flow.io.bytes"]) == 1500
    assert int(t["flow.src_vlan"]) == 42 and int(t["flow.dst_vlan"]) == 43 and t["flow.src_mac"] == "02:00:00:00:00:01"
    assert int(t["flow.sampling_rate"]) == 512 and t["flow.type"] == "sflow_5" and t["flow.sampler_address"] == "192.0.2.50"
    assert int(t["flow.in_if"]) == 3 and int(t["flow.ip_tos"]) == 8
    assert int(t["flow.start"]) == 1_800_000_000_000_000_000
    assert (u["source.address"], u["network.type"], u["network.transport"], int(u["destination.port"])) == ("fd00::1", "ipv6", "udp", 53)
    assert i["network.transport"] == "icmp" and int(i["flow.icmp_type"]) == 8 and int(i["source.port"]) == 0
    scaled = build(events, Output(apply_sampling=True))
    assert int(scaled[0]["flow.io.bytes"]) == 1500 * 512 and int(scaled[0]["flow.io.packets"]) == 512


def test_sflow_sequence_gaps_count_datagrams():
    c = Collector()
    c.feed(nf.sflow_datagram([], sequence=5), EXPORTER, 0.0)
    assert [e.missing for e in c.feed(nf.sflow_datagram([], sequence=9), EXPORTER, 0.0) if isinstance(e, SequenceGap)] == [3]


# -- malformed input

_T = nf.template_set([(1024, SOFTFLOWD_V4)], ipfix=False)
MALFORMED = {
    "empty": (b"", "truncated_header"),
    "v9 header cut": (nf.v9_datagram([])[:12], "truncated_header"),
    "v5 header cut": (nf.v5_datagram([nf.v5_record("1.1.1.1", "2.2.2.2")])[:20], "truncated_header"),
    "ipfix header cut": (nf.ipfix_message([])[:10], "truncated_header"),
    "unknown version": (b"\x00\x07" + b"\x00" * 30, "unknown_version"),
    "v5 count zero": (nf.v5_datagram([]), "bad_count"),
    "v5 count huge": (struct.pack("!HH", 5, 1000) + b"\x00" * 20, "bad_count"),
    "v5 records missing": (nf.v5_datagram([nf.v5_record("1.1.1.1", "2.2.2.2")] * 3)[:100], "length_beyond_datagram"),
    "set beyond datagram": (nf.v9_datagram([_T])[:-10], "length_beyond_datagram"),
    "set length zero": (nf.v9_datagram([struct.pack("!HH", 1024, 0) + b"\x00" * 8]), "bad_set_length"),
    "ipfix length beyond": (struct.pack("!HHIII", 10, 500, 0, 0, 0), "length_beyond_datagram"),
    "ipfix length short": (struct.pack("!HHIII", 10, 8, 0, 0, 0), "bad_length"),
    "huge field count": (nf.v9_datagram([nf.flow_set(0, struct.pack("!HH", 1024, 65535) + b"\x00\x08\x00\x04")]), "truncated_template"),
    "zero-length field": (nf.v9_datagram([nf.template_set([(1024, [(8, 0)])], ipfix=False)]), "zero_length_field"),
    "v9 variable length": (nf.v9_datagram([nf.template_set([(1024, [(82, 65535)])], ipfix=False)]), "zero_length_field"),
    "empty v9 template": (nf.v9_datagram([nf.flow_set(0, struct.pack("!HH", 1024, 0) + b"\x00\x08\x00\x04")]), "empty_template"),
    "reserved template id": (nf.v9_datagram([nf.template_set([(100, [(8, 4)])], ipfix=False)]), "bad_template_id"),
    "options scope zero": (nf.ipfix_message([nf.flow_set(3, struct.pack("!HHH", 300, 2, 0) + struct.pack("!HHHH", 8, 4, 12, 4), pad_to=1)]), "bad_scope"),
    "enterprise number cut": (nf.ipfix_message([nf.flow_set(2, struct.pack("!HHHH", 300, 1, 0x8001, 4), pad_to=1)]), "truncated_template"),
    "variable field past set": (nf.ipfix_message([nf.template_set([(300, [(82, 65535)])], ipfix=True), nf.flow_set(300, b"\x20abc", pad_to=1)]), "record_beyond_set"),
    "sflow header cut": (struct.pack("!II", 5, 1) + b"\x01\x02", "truncated_sample"),
    "sflow bad address type": (struct.pack("!II", 5, 9) + b"\x00" * 24, "bad_address"),
    "sflow sample beyond": (nf.sflow_datagram([struct.pack("!II", 1, 4000)]), "length_beyond_datagram"),
    "sflow too many samples": (struct.pack("!II", 5, 1) + b"\x00" * 4 + struct.pack("!IIII", 0, 1, 1, 10**6), "bad_count"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_datagrams_are_reported_by_reason(name):
    data, reason = MALFORMED[name]
    events = Collector().feed(data, EXPORTER, 0.0)
    assert isinstance(events[-1], Malformed), events
    assert events[-1].reason == reason and events[-1].exporter == EXPORTER and events[-1].detail


def test_sets_before_a_malformed_one_are_kept():
    good = nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2))
    events = Collector().feed(nf.v9_datagram([_T, good, struct.pack("!HH", 1024, 2)]), EXPORTER, 0.0)
    assert [type(e) for e in events] == [TemplateUpdate, DataRecords, Malformed]


VALID = [
    v9_softflowd([v4_record("10.0.0.1", "10.0.0.2", 1, 2)] * 3),
    nf.ipfix_message([nf.template_set([(400, [(8, 4), (82, 65535), (12232, 2, 9)])], ipfix=True), nf.flow_set(400, socket.inet_aton("10.1.1.1") + b"\x02ab\x00\x01")]),
    nf.v5_datagram([nf.v5_record("10.0.0.1", "10.0.0.2")] * 2),
    nf.sflow_datagram([nf.sflow_flow_sample([nf.sflow_raw_header(b"\x02" * 12 + b"\x08\x00" + bytes(IPV4_HEADER := bytes.fromhex("450000280001000040067ccd0a0000010a000002") + b"\x0f\xa0\x01\xbb" + b"\x00" * 16))]), nf.sflow_counter_sample(1)]),
]


@pytest.mark.parametrize("data", VALID, ids=["v9", "ipfix", "v5", "sflow"])
def test_every_truncation_and_trailing_junk_fails_cleanly(data):
    whole = Collector().feed(data, EXPORTER, 0.0)
    assert not any(isinstance(e, Malformed) for e in whole)
    assert build(whole)
    for n in range(len(data)):
        events = Collector().feed(data[:n], EXPORTER, 0.0)
        build(events)  # what decoded builds
    for junk in (b"\x00", b"\xff" * 3, b"\x01\x02\x03\x04\x05\x06\x07"):
        build(Collector().feed(data + junk, EXPORTER, 0.0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_datagrams_never_raise(data):
    c = Collector()
    build(c.feed(data, EXPORTER, 0.0))
    for prefix in (b"\x00\x09", b"\x00\x0a", b"\x00\x05", b"\x00\x00\x00\x05"):
        build(c.feed(prefix + data, EXPORTER, 0.0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=255)), max_size=8))
def test_fuzz_mutated_datagrams_never_raise(data, flips):
    mutated = bytearray(data)
    for pos, value in flips:
        mutated[pos % len(mutated)] = value
    c = Collector()
    c.feed(VALID[0], EXPORTER, 0.0)  # a session with a template, so mutated data sets decode against it
    build(c.feed(bytes(mutated), EXPORTER, 0.0))
