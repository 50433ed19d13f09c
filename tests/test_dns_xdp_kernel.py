"""The dns-xdp receiver against the real kernel, a real dnsmasq and real dig, in both modes.

Needs root, bcc, kernel headers, iproute2, dnsmasq, dig and scapy. With
CI=true a missing prerequisite fails; elsewhere the tests skip and say why.

Topology (tapio.testing.dnsnet): client ── node ── server namespaces; the
receiver watches the node's namespace (both modes, both interfaces), or
the client's (tc on its one interface: the two namespaces joined by a
veth). Each test starts its own receiver (a compile is ~0.8 s); the
namespaces and dnsmasq are shared by the module. Every test waits on
recorded batches with a deadline; none sleeps and hopes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Signal
from tapio.telemetry import Telemetry
from tapio.testing import prereq
from tapio.testing.batches import attributes as attrs
from tapio.testing.batches import log_records as records
from tapio.testing.batches import spans
from tapio.testing.sink import RecordingConsumer

MODES = ["xdp", "tc"]
#: dig's "Query time" was seen 3 ms off a precisely timed client here
DIG_TOLERANCE_MS = 5
LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 20]) + ".example.test"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "root"
    if importlib.util.find_spec("bcc") is None:
        return "bcc (python3-bpfcc, linked into the venv by scripts/setup.sh)"
    if not Path(f"/lib/modules/{os.uname().release}/build/include").is_dir():
        return "kernel headers"
    for cmd in ("ip", "dnsmasq", "dig"):
        if shutil.which(cmd) is None:
            return f"the {cmd} command"
    for module, package in (("scapy", "scapy"), ("dns", "dnspython"), ("pyroute2", "pyroute2")):
        if importlib.util.find_spec(module) is None:
            return f"{package} (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def net():
    what = _missing()
    if what is not None:
        prereq.missing(what, "the dns-xdp kernel tests run as root with bcc, kernel headers, iproute2, dnsmasq, dig and scapy (scripts/setup.sh installs them)")
    from tapio.testing.dnsnet import DnsNet

    with DnsNet() as n:
        yield n


@pytest.fixture
def dns(net):
    """The shared network with dnsmasq running (restarted if a test stopped it)."""
    if "dnsmasq" not in net._procs:
        net.start_dns()
    return net


class Live:
    def __init__(self, receiver: Any, sink: RecordingConsumer, telemetry: Telemetry) -> None:
        self.receiver, self.sink, self.telemetry = receiver, sink, telemetry

    async def find(self, pick: Callable[[dict[str, Any]], bool], timeout: float = 10) -> tuple[dict[str, Any], Any]:
        found: list = []

        def ready() -> bool:
            found[:] = [r for r in records(self.sink.batches) if pick(r[0])]
            return bool(found)

        with trio.fail_after(timeout):
            await self.sink.wait_until(ready)
        return found[0]

    async def counters(self, pick: Callable[[dict[str, int]], bool], timeout: float = 10) -> dict[str, int]:
        with trio.fail_after(timeout):
            while True:
                self.receiver._poll_counters()
                c = self.receiver.kernel_counters()
                if pick(c):
                    return c
                await trio.sleep(0.02)

    def value(self, name: str, **labels: str) -> float:
        return self.telemetry.value(name, **labels)


@asynccontextmanager
async def receiver(config: dict[str, Any], signals=(Signal.LOGS, Signal.TRACES, Signal.METRICS)) -> AsyncIterator[Live]:
    from tapio.receivers.dns_xdp import factory

    telemetry = Telemetry()
    sink = RecordingConsumer(signals)
    cfg = decode_dataclass(factory.config_class, {"flush_interval": "0s", **config})
    assert cfg.validate() == []
    settings = Settings(
        id=ComponentID("dns-xdp"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "dns-xdp"), logger=logging.getLogger("test.dns_xdp")
    )
    r = factory.create(settings, cfg, Ports(output=sink))
    async with trio.open_nursery() as n:
        await n.start(r.run)
        try:
            yield Live(r, sink, telemetry)
        finally:
            n.cancel_scope.cancel()


def node_config(net, mode: str, **extra: Any) -> dict[str, Any]:
    return {"network_namespace": net.node_ns, "interfaces": ["v*"], "mode": mode, **extra}


async def dig(net, name: str, qtype: str = "A", **kwargs: Any):
    from tapio.testing.dnsnet import parse_dig

    result = await trio.run_process(net.dig_command(name, qtype, **kwargs), capture_stdout=True, check=False)
    return parse_dig(result.stdout.decode())


def attachments_in(ns: str) -> dict[str, dict[str, Any]]:
    """What `ip` shows attached to each interface of a namespace: XDP program ids and TC filters."""
    out: dict[str, dict[str, Any]] = {}
    links = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    for link in json.loads(links):
        name = link["ifname"]
        xdp = link.get("xdp", {})
        filters = []
        for direction in ("ingress", "egress"):
            r = subprocess.run(["tc", "-n", ns, "-j", "filter", "show", "dev", name, direction], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                # one entry per filter (with options) after one per priority (without)
                filters += [f for f in json.loads(r.stdout) if f.get("kind") == "bpf" and "options" in f]
        out[name] = {"xdp": xdp.get("prog", {}).get("id") if xdp else None, "tc": filters}
    return out


# ---------------------------------------------------------------- queries and answers


@pytest.mark.parametrize("mode", MODES)
async def test_a_aaaa_nxdomain_servfail_and_a_long_name_are_reported_with_rcode_and_latency(dns, mode):
    async with receiver(node_config(dns, mode)) as live:
        a = await dig(dns, "a.example.test", "A")
        aaaa = await dig(dns, "v6.example.test", "AAAA", server="fd77:2::2")
        nx = await dig(dns, "nope.nx.test", "A")
        fail = await dig(dns, "x.fail.test", "A")
        long = await dig(dns, LONG_NAME, "A")
        assert (a.status, aaaa.status, nx.status, fail.status, long.status) == ("NOERROR", "NOERROR", "NXDOMAIN", "SERVFAIL", "NOERROR")
        assert aaaa.answers == ["fd00::123"]

        rec, log = await live.find(lambda r: r.get("dns.question.name") == "a.example.test")
        assert rec["dns.question.type"] == "A" and rec["dns.response_code"] == "NOERROR"
        assert rec["tapio.dns_xdp.status"] == "answered" and rec["tapio.dns_xdp.answer_count"] == 1
        assert (rec["client.address"], rec["server.address"], rec["server.port"]) == ("10.77.1.2", "10.77.2.2", 53)
        assert 1024 <= rec["client.port"] <= 65535 and rec["network.transport"] == "udp" and rec["network.type"] == "ipv4"
        # the query enters the node from the client, the response from the server (XDP: both ingress)
        assert rec["network.interface.name"] == "vc"
        if mode == "xdp":
            assert rec["tapio.dns_xdp.response.interface"] == "vs"
            assert rec["tapio.dns_xdp.query.hook"] == "xdp" and rec["tapio.dns_xdp.response.hook"] == "xdp"
        else:
            assert rec["tapio.dns_xdp.query.hook"] == "tc_ingress"
        assert 0 < rec["tapio.dns_xdp.latency_ns"] < 1_000_000_000
        assert "rd" in rec["tapio.dns_xdp.response.flags"] and "ra" in rec["tapio.dns_xdp.response.flags"]
        assert log.severity_text == "INFO" and log.event_name == "tapio.dns_xdp.answered"

        rec6, _ = await live.find(lambda r: r.get("dns.question.name") == "v6.example.test")
        assert (rec6["dns.question.type"], rec6["network.type"], rec6["client.address"], rec6["server.address"]) == ("AAAA", "ipv6", "fd77:1::2", "fd77:2::2")
        recnx, _ = await live.find(lambda r: r.get("dns.question.name") == "nope.nx.test")
        assert recnx["dns.response_code"] == "NXDOMAIN" and recnx["tapio.dns_xdp.answer_count"] == 0 and "error.type" not in recnx
        recsf, logsf = await live.find(lambda r: r.get("dns.question.name") == "x.fail.test")
        assert recsf["dns.response_code"] == "SERVFAIL" and recsf["error.type"] == "SERVFAIL" and logsf.severity_text == "WARN"
        reclong, _ = await live.find(lambda r: r.get("dns.question.name") == LONG_NAME)
        assert len(LONG_NAME) > 200 and reclong["dns.response_code"] == "NOERROR"

        # each query once, however many hooks saw its packets (tc sees each twice on the node)
        for name in ("a.example.test", "v6.example.test", "nope.nx.test", "x.fail.test", LONG_NAME):
            assert len([r for r, _ in records(live.sink.batches) if r.get("dns.question.name") == name]) == 1, name
        # a span per answered query, joined to its log record
        sp, span = next((s for s in spans(live.sink.batches) if s[0].get("dns.question.name") == "x.fail.test"))
        assert span.name == "DNS A" and span.status.code == 2 and span.trace_id == logsf.trace_id
        assert span.end_time_unix_nano - span.start_time_unix_nano == recsf["tapio.dns_xdp.latency_ns"]


@pytest.mark.parametrize("mode", MODES)
async def test_latency_is_what_the_client_sees_less_one_hop_and_within_a_tolerance_of_dig(dns, mode):
    from tapio.testing.dnsnet import SLOW_DELAY

    async with receiver(node_config(dns, mode)) as live:
        # dnspython, timed by the client's kernel at send and at receive: the node
        # sees the query later and the response earlier, by one veth hop each
        for i in range(3):
            out = await trio.run_process(dns.timed_query_command(f"p{i}.slow.test"), capture_stdout=True)
            client = json.loads(out.stdout)
            assert client["rcode"] == "NOERROR"
            rec, _ = await live.find(lambda a, i=i: a.get("dns.question.name") == f"p{i}.slow.test")
            assert rec["client.port"] == client["port"]
            ours = rec["tapio.dns_xdp.latency_ns"]
            assert SLOW_DELAY * 1e9 <= ours <= client["ns"], (ours, client)
            # two veth hops and the node's forwarding
            assert client["ns"] - ours < 1_000_000, (ours, client)
        # dig reports whole milliseconds from its event loop's cached clock
        for i in range(3):
            r = await dig(dns, f"t{i}.slow.test", "A")
            assert r.status == "NOERROR" and r.query_ms is not None
            rec, _ = await live.find(lambda a, i=i: a.get("dns.question.name") == f"t{i}.slow.test")
            assert abs(r.query_ms - rec["tapio.dns_xdp.latency_ns"] / 1e6) <= DIG_TOLERANCE_MS, (r.query_ms, rec["tapio.dns_xdp.latency_ns"])


async def test_two_namespaces_joined_by_a_veth_tc_on_the_client(dns):
    async with receiver({"network_namespace": dns.client_ns, "interfaces": ["c0"], "mode": "tc"}) as live:
        r = await dig(dns, "direct.example.test", "A")
        assert r.status == "NOERROR"
        rec, _ = await live.find(lambda a: a.get("dns.question.name") == "direct.example.test")
        assert rec["tapio.dns_xdp.query.hook"] == "tc_egress" and rec["tapio.dns_xdp.response.hook"] == "tc_ingress"
        assert rec["network.interface.name"] == "c0" and rec["client.address"] == "10.77.1.2"
        assert rec["tapio.dns_xdp.latency_ns"] <= (r.query_ms + 1) * 1_000_000


async def test_the_default_loopback_attachment_sees_a_local_resolver_and_its_silence(dns):
    # the default config (interfaces: [lo], xdp): both halves enter lo, so both are seen
    await trio.to_thread.run_sync(dns.start_loopback_dns)
    try:
        async with receiver({"network_namespace": dns.server_ns, "query_timeout": "1s"}) as live:
            r = await dig(dns, "local.example.test", "A", server="127.0.0.1", ns=dns.server)
            assert r.status == "NOERROR"
            rec, _ = await live.find(lambda a: a.get("dns.question.name") == "local.example.test")
            assert (rec["client.address"], rec["server.address"], rec["network.interface.name"]) == ("127.0.0.1", "127.0.0.1", "lo")
            assert rec["tapio.dns_xdp.response.interface"] == "lo" and rec["tapio.dns_xdp.status"] == "answered"
            dns.stop_dns("loopback")
            assert (await dig(dns, "silent.example.test", "A", server="127.0.0.1", ns=dns.server)).status == ""
            rec, _ = await live.find(lambda a: a.get("dns.question.name") == "silent.example.test")
            assert rec["tapio.dns_xdp.status"] == "unanswered"
    finally:
        dns.stop_dns("loopback")


@pytest.mark.parametrize("mode", MODES)
async def test_dns_over_tcp_is_reported(dns, mode):
    async with receiver(node_config(dns, mode)) as live:
        r = await dig(dns, "tcp.example.test", "A", tcp=True)
        assert r.status == "NOERROR"
        rec, _ = await live.find(lambda a: a.get("dns.question.name") == "tcp.example.test")
        assert rec["network.transport"] == "tcp" and rec["dns.response_code"] == "NOERROR"


# ---------------------------------------------------------------- unanswered queries


@pytest.mark.parametrize("mode", MODES)
async def test_an_unanswered_query_is_reported_after_the_timeout(dns, mode):
    async with receiver(node_config(dns, mode, query_timeout="1s")) as live:
        dns.stop_dns()
        start = trio.current_time()
        r = await dig(dns, "gone.example.test", "A")
        assert r.status == ""  # nothing answered
        rec, log = await live.find(lambda a: a.get("dns.question.name") == "gone.example.test", timeout=10)
        assert trio.current_time() - start >= 1.0
        assert rec["tapio.dns_xdp.status"] == "unanswered" and "dns.response_code" not in rec and rec["error.type"] == "timeout"
        assert rec["server.address"] == "10.77.2.2" and log.severity_text == "WARN" and log.event_name == "tapio.dns_xdp.unanswered"
        assert live.value("tapio_dns_xdp_unanswered_total", observed="true") == 1
        assert live.receiver.stats.unanswered == {"10.77.2.2": 1}


async def test_an_unanswered_query_is_not_reported_where_the_response_path_is_not_observed(dns):
    # XDP on the client side only: a response would enter through vs, which is not attached
    async with receiver(node_config(dns, "xdp", interfaces=["vc"], query_timeout="1s")) as live:
        dns.stop_dns()
        r = await dig(dns, "unseen.example.test", "A")
        assert r.status == ""
        with trio.fail_after(10):
            while live.value("tapio_dns_xdp_unanswered_total", observed="false") < 1:
                await trio.sleep(0.05)
        assert not [a for a, _ in records(live.sink.batches) if a.get("dns.question.name") == "unseen.example.test"]


# ---------------------------------------------------------------- crafted packets


def _send_frames(net, frames: list[bytes], iface: str = "c0") -> None:
    """Send raw Ethernet frames out of the client's interface (an AF_PACKET socket in its namespace)."""
    code = textwrap.dedent(
        """
        import socket, sys
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((sys.argv[1], 0))
        data = sys.stdin.buffer.read()
        i = 0
        while i < len(data):
            n = int.from_bytes(data[i:i + 2], "big")
            s.send(data[i + 2:i + 2 + n])
            i += 2 + n
        """
    )
    payload = b"".join(len(f).to_bytes(2, "big") + f for f in frames)
    subprocess.run(["ip", "netns", "exec", net.client, sys.executable, "-c", code, iface], input=payload, check=True)


def _mac(ns: str, iface: str) -> str:
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", iface], capture_output=True, text=True, check=True).stdout)[0]["address"]


def _macs(net, client_iface: str = "c0", node_iface: str = "vc") -> tuple[str, str]:
    return _mac(net.client, client_iface), _mac(net.node, node_iface)


def _malformed(net) -> dict[str, list[bytes]]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt
    from scapy.layers.l2 import Ether

    c0, vc = _macs(net)
    # to the node's own address: delivered (or refused) there, never forwarded and seen twice
    base = Ether(src=c0, dst=vc) / IP(src="10.77.1.2", dst="10.77.1.1")
    header = (0x1234).to_bytes(2, "big") + b"\x01\x00" + b"\x00\x01" + b"\x00" * 6

    def udp(payload: bytes) -> bytes:
        return bytes(base / UDP(sport=40000, dport=53) / payload)

    bad_len = bytearray(udp(header + b"\x01a\x00\x00\x01\x00\x01"))
    bad_len[14 + 20 + 4 : 14 + 20 + 6] = (400).to_bytes(2, "big")  # UDP length beyond the packet
    return {
        "short_dns_header": [udp(b"\x12\x34\x01"), udp(b"")],  # a truncated header, zero-length UDP
        "compression_pointer_in_question": [udp(header + b"\xc0\x0c\x00\x01\x00\x01"), udp(header + b"\x03abc\xc0\x0c")],
        "truncated_question": [udp(header + b"\x3fabc"), udp(header + b"\x03abc\x00\x00")],  # an absurd label length, a cut-off type
        "bad_label_type": [udp(header + b"\x7fabc\x00\x00\x01\x00\x01")],
        "name_too_long": [udp(header + (b"\x3f" + b"x" * 63) * 5 + b"\x00\x00\x01\x00\x01")],
        "no_question": [udp(header[:4] + b"\x00\x00" + header[6:])],
        "bad_udp_length": [bytes(bad_len)],
        # more IPv6 extension headers than the program follows (six)
        "bad_ipv6_extension_headers": [bytes(_ipv6_with_headers(c0, vc, "fd77:1::1", [IPv6ExtHdrDestOpt() for _ in range(7)]) / UDP(sport=40000, dport=53) / header)],
    }


def _ipv6_with_headers(src_mac: str, dst_mac: str, dst: str, headers: list[Any]) -> Any:
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    pkt = Ether(src=src_mac, dst=dst_mac) / IPv6(src="fd77:1::2", dst=dst)
    for h in headers:
        pkt = pkt / h
    return pkt


def _query_and_response(
    net, name: str, *, tags: list[tuple[int, int]] = (), client_port: int = 41000, dns_id: int = 0x4242, ifaces: tuple[str, str] = ("c0", "vc")
) -> list[bytes]:
    """A query and its response, as Ethernet frames (with VLAN tags: (TPID, VID) outermost first)."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

    c0, vc = _macs(net, *ifaces)

    def frame(src: str, dst: str, l4: Any) -> bytes:
        pkt = Ether(src=c0, dst=vc)
        for tpid, vid in tags:
            pkt = pkt / (Dot1AD(vlan=vid) if tpid == 0x88A8 else Dot1Q(vlan=vid))
        return bytes(pkt / IP(src=src, dst=dst) / l4)

    q = UDP(sport=client_port, dport=53) / DNS(id=dns_id, rd=1, qd=DNSQR(qname=name, qtype="A"))
    r = UDP(sport=53, dport=client_port) / DNS(id=dns_id, qr=1, rd=1, ra=1, qd=DNSQR(qname=name, qtype="A"), an=DNSRR(rrname=name, rdata="10.9.9.9"))
    return [frame("10.77.1.2", "10.77.2.2", q), frame("10.77.2.2", "10.77.1.2", r)]


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_packets_are_counted_by_reason_and_parsing_goes_on(dns, mode):
    async with receiver(node_config(dns, mode)) as live:
        cases = _malformed(dns)
        before = live.receiver.kernel_counters()
        _send_frames(dns, [f for frames in cases.values() for f in frames])
        want = {reason: before[reason] + len(frames) for reason, frames in cases.items()}
        got = await live.counters(lambda c: all(c[k] >= v for k, v in want.items()))
        assert {k: got[k] for k in want} == want
        for reason, frames in cases.items():
            assert live.value("tapio_bad_input_total", reason=reason) == len(frames)
        # still attached, still parsing
        shown = attachments_in(dns.node)["vc"]
        assert (shown["xdp"] is not None) if mode == "xdp" else len(shown["tc"]) == 2
        r = await dig(dns, "after-bad.example.test", "A")
        assert r.status == "NOERROR"
        await live.find(lambda a: a.get("dns.question.name") == "after-bad.example.test")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tags", [[(0x8100, 100)], [(0x88A8, 10), (0x8100, 20)]], ids=["802.1Q", "802.1ad"])
async def test_vlan_tagged_queries_are_parsed_and_report_the_outer_vlan(dns, mode, tags):
    # The kernel here has no 802.1Q devices (CONFIG_VLAN_8021Q is off), so the
    # tagged frames are crafted; XDP reads the tags in the frame, TC finds the
    # outer one already taken into the packet's metadata by the stack.
    name = f"vlan{tags[0][1]}{mode}.example.test"
    async with receiver(node_config(dns, mode)) as live:
        _send_frames(dns, _query_and_response(dns, name, tags=tags))
        rec, _ = await live.find(lambda a: a.get("dns.question.name") == name)
        assert rec["tapio.dns_xdp.vlan.id"] == tags[0][1]
        assert rec["tapio.dns_xdp.status"] == "answered" and rec["tapio.dns_xdp.answer_count"] == 1


@pytest.mark.parametrize("mode", MODES)
async def test_an_ipv6_query_behind_extension_headers_is_matched_with_dnsmasqs_answer(dns, mode):
    # hop-by-hop, destination options and an atomic fragment header before UDP:
    # the node forwards it, dnsmasq answers it like any other query
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

    c0, vc = _macs(dns)
    name = f"ext6{mode}.example.test"
    query = _ipv6_with_headers(c0, vc, "fd77:2::2", [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(offset=0, m=0, id=7)])
    query = query / UDP(sport=42000, dport=53) / DNS(id=0x6006, rd=1, qd=DNSQR(qname=name, qtype="AAAA"))
    async with receiver(node_config(dns, mode)) as live:
        _send_frames(dns, [bytes(query)])
        rec, _ = await live.find(lambda a: a.get("dns.question.name") == name)
        assert rec["tapio.dns_xdp.status"] == "answered" and rec["network.type"] == "ipv6"
        assert (rec["client.address"], rec["client.port"], rec["server.address"]) == ("fd77:1::2", 42000, "fd77:2::2")
        assert rec["dns.question.type"] == "AAAA" and rec["tapio.dns_xdp.answer_count"] == 1
        assert rec["tapio.dns_xdp.latency_ns"] > 0


async def test_a_response_without_its_query_is_reported_without_latency(dns):
    async with receiver(node_config(dns, "xdp")) as live:
        _send_frames(dns, _query_and_response(dns, "orphan.example.test", dns_id=0x7777)[1:])
        rec, log = await live.find(lambda a: a.get("dns.question.name") == "orphan.example.test")
        assert rec["tapio.dns_xdp.status"] == "response_only" and "tapio.dns_xdp.latency_ns" not in rec
        assert log.event_name == "tapio.dns_xdp.response"
        assert not [s for s, _ in spans(live.sink.batches) if s.get("dns.question.name") == "orphan.example.test"]


# ---------------------------------------------------------------- interfaces


@pytest.mark.parametrize("mode", MODES)
async def test_an_interface_created_after_start_is_attached_and_a_deleted_one_forgotten(dns, mode):
    async with receiver(node_config(dns, mode)) as live:
        att = live.receiver.attachments
        assert sorted(a.name for a in att.attached.values()) == ["vc", "vs"]
        # a new veth whose node end matches v*, its peer in the client namespace
        subprocess.run(["ip", "-n", dns.node, "link", "add", "vnew", "type", "veth", "peer", "name", "cnew", "netns", dns.client], check=True)
        try:
            subprocess.run(["ip", "-n", dns.node, "link", "set", "vnew", "up"], check=True)
            subprocess.run(["ip", "-n", dns.client, "link", "set", "cnew", "up"], check=True)
            with trio.fail_after(10):
                while "vnew" not in {a.name for a in att.attached.values()}:
                    await trio.sleep(0.02)
            shown = attachments_in(dns.node)["vnew"]
            assert (shown["xdp"] is not None) if mode == "xdp" else len(shown["tc"]) == 2
            _send_frames(dns, _query_and_response(dns, "new-iface.example.test", ifaces=("cnew", "vnew")), iface="cnew")
            rec, _ = await live.find(lambda a: a.get("dns.question.name") == "new-iface.example.test")
            assert rec["network.interface.name"] == "vnew"
        finally:
            subprocess.run(["ip", "-n", dns.node, "link", "del", "vnew"], check=False)
        with trio.fail_after(10):
            while "vnew" in {a.name for a in att.attached.values()}:
                await trio.sleep(0.02)
        # and the receiver goes on
        r = await dig(dns, "after-del.example.test", "A")
        assert r.status == "NOERROR"
        await live.find(lambda a: a.get("dns.question.name") == "after-del.example.test")


@pytest.mark.parametrize("mode", MODES)
async def test_shutdown_detaches_everything(dns, mode):
    async with receiver(node_config(dns, mode)) as live:
        shown = attachments_in(dns.node)
        assert (shown["vc"]["xdp"] is not None) if mode == "xdp" else len(shown["vc"]["tc"]) == 2
        assert live.receiver.attachments is not None
    shown = attachments_in(dns.node)
    assert all(v["xdp"] is None and not v["tc"] for v in shown.values()), shown
    # and tc's clsact qdisc, which it added, is gone too
    qdiscs = subprocess.run(["tc", "-n", dns.node, "qdisc", "show", "dev", "vc"], capture_output=True, text=True).stdout
    assert "clsact" not in qdiscs


def agent_config(dns: Any, mode: str, tmp_path: Path) -> tuple[Path, int]:
    """A pipelines.yaml of dns-xdp alone on the node namespace's v* interfaces, and its metrics port."""
    from tapio.testing.process import free_port

    port = free_port()
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            receivers:
              dns-xdp:
                network_namespace: {dns.node_ns}
                interfaces: [v*]
                mode: {mode}
            exporters:
              debug:
                verbosity: basic
            service:
              telemetry:
                metrics: {{address: "127.0.0.1:{port}"}}
              pipelines:
                logs:
                  receivers: [dns-xdp]
                  exporters: [debug]
            """
        )
    )
    return config, port


async def run_and_kill_an_agent(dns: Any, mode: str, tmp_path: Path) -> dict[str, Any]:
    """A real ``tapio run`` attaches, then dies by SIGKILL; returns the attachments of vc it left behind."""
    from tapio.testing.process import TapioProcess

    config, port = agent_config(dns, mode, tmp_path)

    def run_and_kill() -> None:
        with TapioProcess([config], metrics_port=port) as proc:
            proc.wait_ready(60)
            proc.signal(signal.SIGKILL)
            proc.wait_exit(10)

    await trio.to_thread.run_sync(run_and_kill)
    stale = attachments_in(dns.node)["vc"]
    assert (stale["xdp"] is not None) if mode == "xdp" else len(stale["tc"]) == 2, "the killed agent's attachment should outlive it"
    return stale


@pytest.mark.parametrize("mode", MODES)
async def test_stale_attachments_of_a_killed_agent_are_swept_at_start(dns, mode, tmp_path):
    stale = await run_and_kill_an_agent(dns, mode, tmp_path)
    async with receiver(node_config(dns, mode)) as live:
        assert live.value("tapio_dns_xdp_attach_total", reason="stale_removed") == (2 if mode == "xdp" else 4)
        now = attachments_in(dns.node)["vc"]
        if mode == "xdp":
            assert now["xdp"] is not None and now["xdp"] != stale["xdp"]
        else:
            assert len(now["tc"]) == 2 and all(f"pid={os.getpid()}" in f["options"]["bpf_name"] for f in now["tc"])
        r = await dig(dns, "after-stale.example.test", "A")
        assert r.status == "NOERROR"
        await live.find(lambda a: a.get("dns.question.name") == "after-stale.example.test")
    assert all(v["xdp"] is None and not v["tc"] for v in attachments_in(dns.node).values())


async def test_metrics_carry_the_latency_histogram_and_counts(dns):
    async with receiver(node_config(dns, "xdp", metrics_interval="1s")) as live:
        for name, qtype in (("m1.example.test", "A"), ("m2.example.test", "AAAA"), ("m.nx.test", "A"), ("m.fail.test", "A")):
            assert (await dig(dns, name, qtype)).status
        await live.find(lambda a: a.get("dns.question.name") == "m.fail.test")

        def metrics() -> dict[str, Any]:
            out = {}
            for b in live.sink.batches:
                if b.signal is Signal.METRICS:
                    for req in b.requests:
                        for m in req.resource_metrics[0].scope_metrics[0].metrics:
                            out[m.name] = m
            return out

        with trio.fail_after(10):
            await live.sink.wait_until(lambda: "tapio.dns_xdp.latency" in metrics() and sum(p.count for p in metrics()["tapio.dns_xdp.latency"].histogram.data_points) >= 4)
        m = metrics()
        points = {(attrs(p)["server.address"], attrs(p)["dns.response_code"]): p for p in m["tapio.dns_xdp.latency"].histogram.data_points}
        assert points[("10.77.2.2", "NOERROR")].count >= 2 and points[("10.77.2.2", "NXDOMAIN")].count == 1
        assert points[("10.77.2.2", "SERVFAIL")].count == 1
        assert sum(points[("10.77.2.2", "NOERROR")].bucket_counts) == points[("10.77.2.2", "NOERROR")].count
        by_type = {attrs(p)["dns.question.type"]: p.as_int for p in m["tapio.dns_xdp.queries"].sum.data_points}
        assert by_type["AAAA"] == 1 and by_type["A"] >= 3
        by_rcode = {attrs(p)["dns.response_code"]: p.as_int for p in m["tapio.dns_xdp.responses"].sum.data_points}
        assert by_rcode["NXDOMAIN"] == 1 and by_rcode["SERVFAIL"] == 1


async def test_without_cap_sys_admin_an_unheld_xdp_program_is_left_alone_and_the_agent_still_starts(net, tmp_path):
    """The DaemonSet's capabilities (BPF, PERFMON, NET_ADMIN) cannot look a program up by id: a killed agent's
    XDP program (or another tool's pinned one) is then left where it is, said with what to do, and counted;
    the interface is not attached in xdp mode and everything else runs. In the agent's own network namespace
    (entering another one takes CAP_SYS_ADMIN too): a veth pair of the test's own there."""
    from tapio.testing.process import TapioProcess, free_port, metric_sum, with_capabilities

    wrap = with_capabilities({"BPF", "NET_ADMIN", "PERFMON"})
    a, b = f"tpsa{os.getpid() % 10000}", f"tpsb{os.getpid() % 10000}"
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        port = free_port()
        config = tmp_path / "pipelines.yaml"
        config.write_text(
            "receivers: {dns-xdp: {interfaces: [%s], mode: xdp, xdp_mode: generic}}\n"
            "exporters: {debug: {verbosity: basic}}\n"
            "service:\n  telemetry: {metrics: {address: '127.0.0.1:%d'}}\n"
            "  pipelines: {logs: {receivers: [dns-xdp], exporters: [debug]}}\n" % (a, port)
        )

        def xdp_id() -> str | None:
            link = json.loads(subprocess.run(["ip", "-j", "link", "show", "dev", a], check=True, capture_output=True, text=True).stdout)[0]
            return (link.get("xdp") or {}).get("prog", {}).get("id")

        def killed_then_least_privilege() -> tuple[Any, dict[str, float], str]:
            with TapioProcess([config], metrics_port=port) as proc:
                proc.wait_ready(60)
                proc.signal(signal.SIGKILL)
                proc.wait_exit(10)
            stale = xdp_id()
            assert stale is not None, "the killed agent's XDP program should outlive it"
            with TapioProcess([config], metrics_port=port, wrap=wrap) as proc:
                proc.wait_ready(60)
                return stale, proc.metrics(), proc.stderr

        stale, metrics, stderr = await trio.to_thread.run_sync(killed_then_least_privilege)
        assert metric_sum(metrics, "tapio_dns_xdp_attach_total", reason="stale_unverified") == 1, stderr
        assert metric_sum(metrics, "tapio_dns_xdp_attach_total", reason="busy") == 1
        assert f"ip link set dev {a} xdp off" in stderr, stderr
        assert xdp_id() == stale  # untouched
    finally:
        subprocess.run(["ip", "link", "del", a], check=False)


async def test_a_receiver_cancelled_while_it_opens_rtnetlink_leaves_no_asyncio_loop_behind():
    """pyroute2 gives each thread that uses it an asyncio loop of its own, closed only by a close from that
    thread. A start cancelled while the netlink thread was still opening the connection left that loop, its
    self-pipe sockets and the netlink transport open, and the garbage collector reported them during some
    later test."""
    import asyncio
    import gc
    import types

    from tapio.receivers.dns_xdp._attach import Attachments
    from tapio.receivers.dns_xdp._config import Config

    if os.geteuid() != 0 or importlib.util.find_spec("pyroute2") is None:
        prereq.missing("root and pyroute2", "the rtnetlink connection of dns-xdp needs both (scripts/setup.sh installs pyroute2)")
    attachments = Attachments(Config(), types.SimpleNamespace(prog_fds={}), logging.getLogger("test"), lambda reason, n: None)
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled at its first wait: the thread goes on opening the connection, abandoned
        await attachments.open()
    await attachments.detach_all()
    await trio.to_thread.run_sync(attachments._executor.shutdown, True)  # the thread has ended
    reported: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, reported.append
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert [u.exc_value for u in reported] == []
    assert not [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and not o.is_closed()]
