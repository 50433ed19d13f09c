"""The dns-xdp receiver's user-space parts, without a kernel: records, names, netlink messages, config, metrics, encoding.

Every parser is fed crafted bytes and hypothesis-made ones: it returns values
or raises its own error type, never anything else; the receiver counts what
does not decode and goes on.
"""

from __future__ import annotations

import logging
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Signal
from tapio.receivers.dns_xdp import _decode as d
from tapio.receivers.dns_xdp import _netlink as nl
from tapio.receivers.dns_xdp import factory
from tapio.receivers.dns_xdp._attach import tc_filter_is_stale, tc_filter_name, tc_filter_owner
from tapio.receivers.dns_xdp._config import Config
from tapio.receivers.dns_xdp._loader import TC_INGRESS_PROG, compile_request, port_filter_source
from tapio.receivers.dns_xdp._stats import LATENCY_BOUNDS, DnsStats
from tapio.telemetry import Telemetry
from tapio.units import ByteSize, Duration
from tapio.testing.batches import attributes, log_records, spans
from tapio.testing.sink import RecordingConsumer


def wire(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label)


def event(
    *, name: bytes = wire("a.example.test"), kind: int = d.KIND_ANSWERED, family: int = 4, flags: int = 0x8180, qtype: int = 1,
    query_ts: int = 1_000_000, response_ts: int = 1_431_207, client: bytes = bytes([10, 0, 0, 7]) + bytes(12),
    server: bytes = bytes([10, 96, 0, 10]) + bytes(12), proto: int = 17, ancount: int = 1, name_len: int | None = None,
    client_port: int = 43121, dns_id: int = 0x4242,
) -> bytes:
    return d.EVENT.pack(
        query_ts, response_ts, 3, 4, client, server, client_port, 53, dns_id, flags, 0x0100, qtype, 1, ancount, 0, 1,
        len(name) if name_len is None else name_len, 0, 0, 88, family, proto, 1, 1, kind, name,
    )


# ---------------------------------------------------------------- records


def test_an_answered_event_decodes_with_both_times_and_the_question():
    ev = d.parse_event(event())
    assert (ev.query_ts, ev.response_ts, ev.kind) == (1_000_000, 1_431_207, d.KIND_ANSWERED)
    assert d.name_text(ev.name) == "a.example.test" and d.qtype_text(ev.qtype) == "A"
    assert d.address_text(ev.family, ev.client) == "10.0.0.7" and d.address_text(ev.family, ev.server) == "10.96.0.10"
    assert (ev.rcode, ev.opcode, d.flag_names(ev.flags)) == (0, 0, ["rd", "ra"])


def test_ipv6_addresses_and_rcodes_and_types_by_name_or_number():
    six = socket.inet_pton(socket.AF_INET6, "fd00::1")
    ev = d.parse_event(event(family=6, client=six, flags=0x8183, qtype=28))
    assert d.address_text(6, ev.client) == "fd00::1" and d.rcode_text(ev.rcode) == "NXDOMAIN" and d.qtype_text(ev.qtype) == "AAAA"
    assert d.qtype_text(65280) == "TYPE65280" and d.rcode_text(15) == "RCODE15" and d.qclass_text(7) == "CLASS7"


@pytest.mark.parametrize(
    "raw",
    [event()[:-1], event() + b"\0", event(family=5), event(kind=9), event(name_len=256)],
    ids=["short", "long", "family", "kind", "name_len"],
)
def test_a_record_of_another_layout_is_a_decode_error(raw):
    with pytest.raises(d.DecodeError):
        d.parse_event(raw)


@given(st.binary(min_size=d.EVENT.size, max_size=d.EVENT.size))
@settings(max_examples=400)
def test_any_record_decodes_or_raises_decode_error(raw):
    try:
        ev = d.parse_event(raw)
    except d.DecodeError:
        return
    try:
        d.name_text(ev.name)
    except d.DecodeError:
        pass


def test_inflight_entries_decode_with_their_key():
    key = d.KEY.pack(bytes([10, 0, 0, 7]) + bytes(12), bytes([10, 96, 0, 10]) + bytes(12), 43121, 0x4242, 4, 17)
    value = d.QUERY.pack(123, 3, 53, 28, 1, 0x0100, len(wire("x.y")), 100, 1, wire("x.y"))
    q = d.parse_query(key, value)
    assert (q.ts, q.ifindex, q.client_port, q.server_port, q.id, q.qtype, q.vlan, q.name) == (123, 3, 43121, 53, 0x4242, 28, 100, wire("x.y"))
    with pytest.raises(d.DecodeError):
        d.parse_query(key[:-1], value)
    with pytest.raises(d.DecodeError):
        d.parse_query(key, value[:-1])


@given(st.binary(min_size=d.KEY.size, max_size=d.KEY.size), st.binary(min_size=d.QUERY.size, max_size=d.QUERY.size))
@settings(max_examples=200)
def test_any_inflight_entry_decodes_or_raises_decode_error(key, value):
    try:
        d.parse_query(key, value)
    except d.DecodeError:
        pass


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"", "."),
        (wire("www.example.com"), "www.example.com"),
        (b"\x03a.b\x03com", "a\\.b.com"),
        (b"\x04a\\\"b", 'a\\\\\\"b'),
        (b"\x03a\tb\x02\x00\xff", "a\\tb.\\000\\255"),
        (b"\x02\r\n", "\\r\\n"),
        (b"\x01 ", "\\032"),
    ],
)
def test_names_in_presentation_form(raw, text):
    assert d.name_text(raw) == text


@pytest.mark.parametrize("raw", [b"\x05abc", b"\x00", b"\x40" + b"a" * 64, b"\x01a\x03bc"])
def test_a_wire_form_that_overruns_itself_is_a_decode_error(raw):
    with pytest.raises(d.DecodeError):
        d.name_text(raw)


@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=4))
def test_any_labels_round_trip_through_presentation_form(labels):
    text = d.name_text(b"".join(bytes([len(label)]) + label for label in labels))
    # presentation form is printable ASCII, and splitting at unescaped dots gives the labels back
    assert text.isascii() and text.isprintable()
    assert _unescape(text) == labels


def _unescape(text: str) -> list[bytes]:
    labels, cur, i = [], bytearray(), 0
    named = {"t": 9, "r": 13, "n": 10}
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]
            if nxt.isdigit():
                cur.append(int(text[i + 1 : i + 4]))
                i += 4
                continue
            cur.append(named.get(nxt, ord(nxt)))
            i += 2
            continue
        if c == ".":
            labels.append(bytes(cur))
            cur = bytearray()
        else:
            cur.append(ord(c))
        i += 1
    labels.append(bytes(cur))
    return labels


# ---------------------------------------------------------------- netlink


def link_message(msg_type: int, index: int, name: bytes, link_type: int = 1, flags: int = 1) -> bytes:
    attr = struct.pack("=HH", 4 + len(name) + 1, nl.IFLA_IFNAME) + name + b"\0"
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("=BxHiII", 0, link_type, index, flags, 0) + attr
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def test_link_messages_become_events():
    data = link_message(nl.RTM_NEWLINK, 7, b"veth1a2b") + link_message(nl.RTM_DELLINK, 8, b"cali0", flags=0)
    assert nl.parse_link_messages(data) == [
        nl.LinkEvent(True, 7, "veth1a2b", 1, True),
        nl.LinkEvent(False, 8, "cali0", 1, False),
    ]


def test_other_message_types_are_skipped():
    other = struct.pack("=IHHII", 20, 24, 0, 0, 0) + b"\0" * 4  # RTM_NEWROUTE
    assert nl.parse_link_messages(other + link_message(nl.RTM_NEWLINK, 2, b"lo", link_type=772)) == [nl.LinkEvent(True, 2, "lo", 772, True)]


@pytest.mark.parametrize("cut", [1, 8, 17, 20, 30])
def test_a_truncated_link_message_is_a_netlink_error_or_nothing(cut):
    data = link_message(nl.RTM_NEWLINK, 7, b"veth1a2b")
    try:
        assert nl.parse_link_messages(data[:cut]) == []
    except nl.NetlinkError:
        pass


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_any_datagram_parses_or_raises_netlink_error(data):
    try:
        nl.parse_link_messages(data)
    except nl.NetlinkError:
        pass


@given(st.lists(st.tuples(st.integers(1, 1 << 20), st.binary(min_size=1, max_size=15).filter(lambda b: b"\0" not in b), st.booleans()), max_size=8))
def test_any_sequence_of_link_messages_round_trips(links):
    data = b"".join(link_message(nl.RTM_NEWLINK if present else nl.RTM_DELLINK, i, name) for i, name, present in links)
    assert [(e.index, e.name.encode(errors="replace"), e.present) for e in nl.parse_link_messages(data)] == [
        (i, name.decode(errors="replace").encode(errors="replace"), p) for i, name, p in links
    ]


def test_netns_names_and_paths():
    assert nl.netns_path("pod1") == "/var/run/netns/pod1" and nl.netns_path("/proc/1/ns/net") == "/proc/1/ns/net"


# ---------------------------------------------------------------- attachments' names


def test_tc_filter_names_carry_their_owner_and_a_gone_owner_is_stale():
    import os

    from tapio.receivers.dns_xdp._attach import _start_time

    mine = tc_filter_name(TC_INGRESS_PROG, os.getpid(), _start_time(os.getpid()))
    assert tc_filter_owner(mine) == (os.getpid(), _start_time(os.getpid())) and not tc_filter_is_stale(mine)
    assert tc_filter_is_stale(tc_filter_name(TC_INGRESS_PROG, os.getpid(), "1"))  # a pid reused by another process
    assert tc_filter_owner("cilium_prog pid=1 start=2") is None and not tc_filter_is_stale("anything else")
    assert tc_filter_owner(f"{TC_INGRESS_PROG} pid=x") is None


# ---------------------------------------------------------------- config


def test_defaults_validate_and_every_problem_is_reported_at_once():
    assert Config().validate() == []
    bad = Config(
        interfaces=[], exclude_interfaces=["a/b"], ports=[0, 53, 53], query_timeout=Duration(0.001), max_inflight=1,
        ring_buffer_size=ByteSize(5000), max_servers=0,
    )
    problems = bad.validate()
    for key in ("interfaces:", "exclude_interfaces[0]", "ports[0]", "ports: [0, 53, 53] lists a port twice", "query_timeout", "max_inflight", "ring_buffer_size", "max_servers"):
        assert any(p.startswith(key) for p in problems), (key, problems)
    assert Config(interfaces=["averyveryverylongname"]).validate() == [
        "interfaces[0]: interface names are at most 15 bytes, got 'averyveryverylongname'"
    ]


def test_interfaces_match_by_glob_less_the_excluded():
    cfg = decode_dataclass(Config, {"interfaces": ["cali*", "eth0"], "exclude_interfaces": ["cali-skip*"]})
    assert [n for n in ("cali12", "cali-skip1", "eth0", "eth1", "lo") if cfg.wants(n)] == ["cali12", "eth0"]


def test_the_compiled_port_filter_and_programs_follow_the_config():
    assert "p == 53 || p == 5353" in port_filter_source([53, 5353])
    xdp = compile_request(decode_dataclass(Config, {"ports": [5353]}))
    assert xdp["programs"] == {"tapio_dns_xdp": "XDP"} and "p == 5353" in xdp["source"] and "-DPARSE_TCP=1" in xdp["cflags"]
    tc = compile_request(decode_dataclass(Config, {"mode": "tc", "tcp": False, "max_inflight": 128}))
    assert set(tc["programs"].values()) == {"SCHED_CLS"} and {"-DPARSE_TCP=0", "-DMAX_INFLIGHT=128"} <= set(tc["cflags"])


# ---------------------------------------------------------------- metrics


def test_stats_are_cumulative_histograms_and_sums_with_bounded_servers():
    stats = DnsStats(max_servers=2, start_unix_ns=5)
    stats.answered("10.0.0.1", "A", "NOERROR", 300_000)  # 0.3 ms
    stats.answered("10.0.0.1", "A", "NOERROR", 20_000_000_000)  # beyond the last bound
    stats.answered("10.0.0.2", "AAAA", "NXDOMAIN", 1_000_000)  # exactly 1 ms: the (0.5, 1] bucket
    stats.answered("10.0.0.3", "A", "SERVFAIL", 1)  # a third server: "other"
    stats.unanswered_query("10.0.0.1", "A")
    stats.response_only("REFUSED")
    stats.malformed = {"no_question": 2}
    req = stats.request([("host.name", "n1")], ("tapio.dns_xdp", "0"), 99)
    metrics = {m.name: m for m in req.resource_metrics[0].scope_metrics[0].metrics}
    points = {(attributes(p)["server.address"], attributes(p)["dns.response_code"]): p for p in metrics["tapio.dns_xdp.latency"].histogram.data_points}
    assert set(points) == {("10.0.0.1", "NOERROR"), ("10.0.0.2", "NXDOMAIN"), ("other", "SERVFAIL")}
    noerr = points[("10.0.0.1", "NOERROR")]
    assert noerr.count == 2 and noerr.bucket_counts[LATENCY_BOUNDS.index(0.0005)] == 1 and noerr.bucket_counts[-1] == 1
    assert points[("10.0.0.2", "NXDOMAIN")].bucket_counts[LATENCY_BOUNDS.index(0.001)] == 1
    assert (noerr.start_time_unix_nano, noerr.time_unix_nano, noerr.min, noerr.max) == (5, 99, 0.0003, 20.0)
    sums = {m: {tuple(attributes(p).values())[0]: p.as_int for p in metrics[m].sum.data_points} for m in metrics if metrics[m].WhichOneof("data") == "sum"}
    assert sums["tapio.dns_xdp.queries"] == {"A": 4, "AAAA": 1}
    assert sums["tapio.dns_xdp.responses"] == {"NOERROR": 2, "NXDOMAIN": 1, "SERVFAIL": 1, "REFUSED": 1}
    assert sums["tapio.dns_xdp.unanswered"] == {"10.0.0.1": 1} and sums["tapio.dns_xdp.packets.malformed"] == {"no_question": 2}


# ---------------------------------------------------------------- records to OTLP


def make_receiver(signals=tuple(Signal), sink=None):
    telemetry = Telemetry()
    settings = Settings(id=ComponentID("dns-xdp"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "dns-xdp"), logger=logging.getLogger("test.dns_xdp"))
    sink = sink or RecordingConsumer(signals)
    return factory.create(settings, Config(), Ports(output=sink)), sink, telemetry


async def test_ring_records_become_log_records_and_spans_with_the_semantic_convention_attributes():
    r, sink, telemetry = make_receiver()
    r.handle([event(), event(flags=0x8182, name=wire("x.fail.test")), event(kind=d.KIND_RESPONSE_ONLY, query_ts=0, name=wire("orphan.test"))])
    recs = {a["dns.question.name"]: (a, lr) for a, lr in log_records(sink.batches)}
    a, lr = recs["a.example.test"]
    assert (a["client.address"], a["client.port"], a["server.address"], a["server.port"]) == ("10.0.0.7", 43121, "10.96.0.10", 53)
    assert (a["dns.question.type"], a["dns.response_code"], a["tapio.dns_xdp.latency_ns"], a["network.transport"]) == ("A", "NOERROR", 431_207, "udp")
    assert "error.type" not in a and lr.severity_text == "INFO" and lr.event_name == "tapio.dns_xdp.answered"
    fail, flr = recs["x.fail.test"]
    assert fail["error.type"] == "SERVFAIL" and flr.severity_text == "WARN"
    orphan, _ = recs["orphan.test"]
    assert orphan["tapio.dns_xdp.status"] == "response_only" and "tapio.dns_xdp.latency_ns" not in orphan
    sp = {a["dns.question.name"]: s for a, s in spans(sink.batches)}
    assert set(sp) == {"a.example.test", "x.fail.test"}  # no span without a query
    assert sp["x.fail.test"].status.code == 2 and sp["x.fail.test"].trace_id == flr.trace_id
    assert sp["a.example.test"].end_time_unix_nano - sp["a.example.test"].start_time_unix_nano == 431_207
    assert telemetry.value("tapio_dns_xdp_events_total", kind="answered") == 2
    assert r.stats.latency[("10.96.0.10", "SERVFAIL")].count == 1


async def test_without_a_traces_pipeline_no_spans_are_built():
    r, sink, _ = make_receiver([Signal.LOGS])
    r.handle([event()])
    assert [b.signal for b in sink.batches] == [Signal.LOGS] and not log_records(sink.batches)[0][1].trace_id


async def test_a_record_that_does_not_decode_is_counted_and_the_rest_go_on():
    r, sink, telemetry = make_receiver()
    r.handle([event(family=9), event(name=b"\x09abc"), event()])
    assert [a["dns.question.name"] for a, _ in log_records(sink.batches)] == ["a.example.test"]
    assert telemetry.value("tapio_bad_input_total", reason="ring_record") == 2


async def test_a_full_pipeline_drops_the_batch_and_counts_it():
    r, sink, telemetry = make_receiver()
    sink.pause()
    r.handle([event(), event()])
    assert not sink.batches
    assert telemetry.value("tapio_dns_xdp_records_dropped_total", reason="pipeline_full", signal="logs") == 2
    assert telemetry.value("tapio_dns_xdp_records_dropped_total", reason="pipeline_full", signal="traces") == 2


async def test_a_refused_batch_is_dropped_and_counted_by_its_reason():
    from tapio.component import Refused

    class Refusing(RecordingConsumer):
        def send_nowait(self, batch):
            batch.done(False)  # as the memory limiter does before raising
            raise Refused("over the limit")

    r, _, telemetry = make_receiver(sink=Refusing())
    r.handle([event(), event(), event(kind=d.KIND_RESPONSE_ONLY, query_ts=0)])
    assert telemetry.value("tapio_dns_xdp_records_dropped_total", reason="refused", signal="logs") == 3
    assert telemetry.value("tapio_dns_xdp_records_dropped_total", reason="refused", signal="traces") == 2
    assert r._dropped == {"refused": 5}


_names = st.one_of(st.binary(max_size=255), st.lists(st.binary(min_size=1, max_size=63), max_size=5).map(lambda ls: b"".join(bytes([len(x)]) + x for x in ls)[:255]))
_records = st.one_of(
    st.binary(min_size=d.EVENT.size, max_size=d.EVENT.size),
    st.builds(
        lambda name, kind, family, flags, qtype, proto, ts: event(name=name, kind=kind, family=family, flags=flags, qtype=qtype, proto=proto, query_ts=ts[0], response_ts=ts[1]),
        _names, st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 4, 6]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from([6, 17, 99]),
        st.tuples(st.integers(0, 1 << 62), st.integers(0, 1 << 62)),
    ),
)


@given(st.lists(_records, max_size=6))
@settings(max_examples=200, deadline=None)
def test_any_ring_records_are_reported_or_counted(raws):
    import trio

    async def main():
        r, sink, telemetry = make_receiver()
        r.handle(raws)
        assert len(log_records(sink.batches)) + telemetry.value("tapio_bad_input_total", reason="ring_record") == len(raws)
        # the items' lengths are computed, not measured: the bytes parse to as many items, and (times
        # other than 0, which protobuf would leave out) are what protobuf writes
        exact = all(raw[:8] != bytes(8) and raw[8:16] != bytes(8) for raw in raws)
        for batch in sink.batches:
            assert batch.count == len(log_records([batch]) or spans([batch]))
            assert batch.raw[0] == batch.requests[0].SerializeToString() or not exact

    trio.run(main)


async def test_the_per_record_ints_are_written_as_protobuf_writes_them_at_every_varint_length():
    edges = [0, 1, 127, 128, 0x3FFF, 0x4000, 0xFFFF]
    latencies = [0, 127, 128, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 0xFFFFFFF, 0x10000000, 1 << 40]
    raws = [event(client_port=p, dns_id=i, response_ts=1_000_000 + lat) for p in edges for i in edges for lat in latencies[:3]]
    raws += [event(response_ts=1_000_000 + lat) for lat in latencies]
    r, sink, _ = make_receiver()
    r.handle(raws)
    got = [(a["client.port"], a["tapio.dns_xdp.id"], a["tapio.dns_xdp.latency_ns"]) for a, _ in log_records(sink.batches)]
    want = [(p, i, lat) for p in edges for i in edges for lat in latencies[:3]] + [(43121, 0x4242, lat) for lat in latencies]
    assert got == want
    assert [a["client.port"] for a, _ in spans(sink.batches)] == [p for p, _, _ in want]
    for batch in sink.batches:
        if batch.signal is not Signal.METRICS:
            assert batch.raw[0] == batch.requests[0].SerializeToString()


async def test_records_and_spans_are_written_exactly_as_protobuf_writes_them():
    r, sink, _ = make_receiver()
    r.handle([event(), event(flags=0x8182, name=wire("x.fail.test")), event(kind=d.KIND_RESPONSE_ONLY, query_ts=0, name=wire("o.test"))])
    for batch in sink.batches:
        if batch.signal is not Signal.METRICS:
            assert batch.raw[0] == batch.requests[0].SerializeToString()


# ---------------------------------------------------------------- the drain ticker


async def test_the_ticker_ticks_each_period_until_stopped():
    import select

    import trio

    from tapio.receivers.dns_xdp._bpfsys import Ticker

    ticker = Ticker()
    try:
        assert ticker.ticks() == 0  # not started: nothing to read
        ticker.start(0.005)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(ticker.fd)
        assert ticker.ticks() >= 1
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(ticker.fd)  # and it goes on ticking
        assert ticker.ticks() >= 1
        ticker.stop()
        assert ticker.ticks() == 0
        assert select.select([ticker.fd], [], [], 0.1)[0] == []  # twenty periods: none once stopped
    finally:
        ticker.close()
