"""The netflow receiver with real exporters: softflowd and nfdump's nfreplay from Debian, and tapio run.

Flows come from pcaps made with scapy, exported by softflowd (v5, v9,
IPFIX) or re-sent by nfreplay (v5, v9) from what nfcapd captured, to the
running receiver over UDP on 127.0.0.1. Datagrams no exporter at hand sends
(templates after data, options with sampling, withdrawals, sFlow, malformed
ones) are written from the specs by `tapio.testing.netflow`. Every exporter
process is waited for or stopped by its PID.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections import defaultdict
from pathlib import Path

import pytest
import trio
from google.protobuf.json_format import MessageToDict

from tapio import otlpjson
from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Signal
from tapio.receivers.netflow import factory
from tapio.storage import Storage
from tapio.telemetry import Telemetry
from tapio.testing import netflow as nf
from tapio.testing import prereq
from tapio.testing.process import TapioProcess, free_port
from tapio.testing.sink import RecordingConsumer

from .test_netflow_parser import SOFTFLOWD_V4, v4_record

WAIT = 30


def require(tool: str) -> None:
    prereq.command(tool, "run scripts/setup.sh (apt packages softflowd and nfdump)")


def make_settings(extensions: dict | None = None, name: str = "") -> Settings:
    return Settings(
        id=ComponentID("netflow", name),
        kind=Kind.RECEIVER,
        telemetry=Telemetry().for_component("receiver", "netflow"),
        logger=logging.getLogger("test.netflow"),
        extensions=extensions or {},
        shutdown_grace=2.0,
    )


def make_receiver(config: dict | None = None, *, settings: Settings | None = None, sink: RecordingConsumer | None = None):
    base = {"protocols": {"netflow": {"endpoint": "127.0.0.1:0"}, "sflow": {"endpoint": "127.0.0.1:0"}}}
    cfg = decode_dataclass(factory.config_class, {**base, **(config or {})})
    sink = sink or RecordingConsumer()
    settings = settings or make_settings()
    return factory.create(settings, cfg, Ports(output=sink)), sink, settings


def port_of(receiver, listener: str = "netflow") -> int:
    return int(receiver.bound_endpoints[f"protocols.{listener}.endpoint"].rsplit(":", 1)[1])


def log_records(sink: RecordingConsumer) -> list[dict]:
    out = []
    for batch in sink.batches:
        if batch.signal is not Signal.LOGS:
            continue
        for req in batch.requests:
            for rl in req.resource_logs:
                for sl in rl.scope_logs:
                    for lr in sl.log_records:
                        out.append({a.key: next(iter(MessageToDict(a.value).values())) for a in lr.attributes})
    return out


def send(port: int, *datagrams: bytes, source_port: int = 0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if source_port:
            s.bind(("127.0.0.1", source_port))
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


# -- the pcap and what softflowd must report from it


@pytest.fixture(scope="module")
def flows_pcap(tmp_path_factory) -> tuple[Path, dict]:
    """A pcap of IPv4 and IPv6 TCP, UDP and ICMP flows, and the flows in it: key -> [bytes, packets]."""
    from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6EchoRequest, IPv6, wrpcap

    packets = []
    t = 1_700_000_000.0
    ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

    def add(p) -> None:
        nonlocal t
        p = Ether(bytes(p))  # lengths and checksums filled in
        p.time = t
        t += 0.01
        packets.append(p)

    for i in range(12):
        for n in range(1 + i % 3):  # several packets per flow
            add(ETH / IP(src=f"10.1.0.{i + 1}", dst="10.9.0.1") / TCP(sport=40000 + i, dport=443, flags="A") / (b"x" * (10 * n)))
    for i in range(6):
        add(ETH / IP(src="10.2.0.1", dst=f"10.9.1.{i + 1}") / UDP(sport=5000 + i, dport=53) / b"query")
    add(ETH / IP(src="10.3.0.1", dst="10.3.0.2") / ICMP(type=8, code=0))
    for i in range(5):
        add(ETH / IPv6(src=f"fd00::{i + 1:x}", dst="fd00::ff") / TCP(sport=41000 + i, dport=80, flags="S"))
        add(ETH / IPv6(src=f"fd00:1::{i + 1:x}", dst="fd00:1::ff") / UDP(sport=42000 + i, dport=123) / b"ntp")
    add(ETH / IPv6(src="fd00:2::1", dst="fd00:2::2") / ICMPv6EchoRequest())
    path = tmp_path_factory.mktemp("pcap") / "flows.pcap"
    wrpcap(str(path), packets)

    expected: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for p in packets:
        ip = p[IP] if IP in p else p[IPv6]
        length = ip.len if IP in p else ip.plen + 40
        proto = ip.proto if IP in p else ip.nh
        ports = (ip.payload.sport, ip.payload.dport) if proto in (6, 17) else (0, 0)
        e = expected[(ip.src, ip.dst, proto, *ports)]
        e[0] += length
        e[1] += 1
    return path, dict(expected)


PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}


def assert_flows(records: list[dict], expected: dict, *, ipv6: bool = True, times: bool = True) -> None:
    want = {k: v for k, v in expected.items() if ipv6 or ":" not in k[0]}
    got: dict[tuple, list[int]] = {}
    for r in records:
        proto = next(n for n, name in PROTO_NAMES.items() if name == r["network.transport"])
        ports = (int(r["source.port"]), int(r["destination.port"])) if proto in (6, 17) else (0, 0)
        key = (r["source.address"], r["destination.address"], proto, *ports)
        assert key not in got, f"flow {key} reported twice"
        got[key] = [int(r["flow.io.bytes"]), int(r["flow.io.packets"])]
        assert r["network.type"] == ("ipv6" if ":" in key[0] else "ipv4")
        # the pcap spans 1_700_000_000 s + 0.5 s; a v9 header's export time has whole seconds only
        assert not times or 1_699_999_999 * 10**9 <= int(r["flow.start"]) <= int(r["flow.end"]) <= 1_700_000_002 * 10**9
    assert got == want


async def run_until(receiver, sink, condition, action) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            await action()
            await sink.wait_until(condition)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [5, 9, 10], ids=["v5", "v9", "ipfix"])
async def test_softflowd_exports_every_flow_of_the_pcap(flows_pcap, version):
    require("softflowd")
    pcap, expected = flows_pcap
    receiver, sink, settings = make_receiver()
    want = len([k for k in expected if version != 5 or ":" not in k[0]])
    await run_until(receiver, sink, lambda: len(log_records(sink)) >= want, lambda: trio.to_thread.run_sync(nf.run_softflowd, pcap, port_of(receiver), version))
    records = log_records(sink)
    assert_flows(records, expected, ipv6=version != 5)
    assert {r["flow.type"] for r in records} == {{5: "netflow_v5", 9: "netflow_v9", 10: "ipfix"}[version]}
    tel = settings.telemetry.telemetry
    assert tel.value("tapio_netflow_flows_total", exporter="127.0.0.1") == want
    assert tel.value("tapio_netflow_malformed_datagrams_total") == 0
    assert tel.value("tapio_netflow_sequence_gaps_total") == 0  # softflowd's IPFIX counting is recognised
    assert tel.value("tapio_netflow_unknown_template_total") == 0


@pytest.fixture(scope="module")
def nfcapd_capture(flows_pcap, tmp_path_factory) -> Path:
    """What nfcapd stored of softflowd's v9 export of the pcap."""
    require("softflowd")
    require("nfcapd")
    pcap, _ = flows_pcap
    port = free_port()
    return nf.capture_with_nfcapd(lambda: nf.run_softflowd(pcap, port, 9), tmp_path_factory.mktemp("nfcapd"), port)


@pytest.mark.parametrize("version", [5, 9], ids=["v5", "v9"])
async def test_nfreplay_resends_every_flow(flows_pcap, nfcapd_capture, version):
    require("nfreplay")
    _, expected = flows_pcap
    receiver, sink, settings = make_receiver()
    want = len([k for k in expected if version != 5 or ":" not in k[0]])
    await run_until(receiver, sink, lambda: len(log_records(sink)) >= want, lambda: trio.to_thread.run_sync(nf.run_nfreplay, nfcapd_capture, port_of(receiver), version))
    records = log_records(sink)
    # nfreplay (nfdump 1.7.1) writes headers whose export time and uptime do not match the flows' (v5: unix time 3600): times are not compared
    assert_flows(records, expected, ipv6=version != 5, times=False)
    assert settings.telemetry.telemetry.value("tapio_netflow_malformed_datagrams_total") == 0


# -- what no exporter here sends


def softflowd_template(ipfix: bool = False) -> bytes:
    return nf.template_set([(1024, SOFTFLOWD_V4)], ipfix=ipfix)


async def test_templates_arriving_after_data_release_the_held_records():
    receiver, sink, settings = make_receiver()

    async def action() -> None:
        port = port_of(receiver)
        data = nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1000, 80) + v4_record("10.0.0.3", "10.0.0.4", 1001, 80))
        send(port, nf.v9_datagram([data], sequence=0))
        await trio.sleep(0.05)
        assert log_records(sink) == []
        send(port, nf.v9_datagram([softflowd_template()], sequence=1))

    await run_until(receiver, sink, lambda: len(log_records(sink)) >= 2, action)
    assert sorted(r["source.address"] for r in log_records(sink)) == ["10.0.0.1", "10.0.0.3"]
    tel = settings.telemetry.telemetry
    assert tel.value("tapio_netflow_unknown_template_total", exporter="127.0.0.1") == 1
    assert tel.value("tapio_netflow_held_sets_dropped_total") == 0


async def test_options_template_sampling_is_applied_to_records_and_totals():
    receiver, sink, _ = make_receiver({"apply_sampling": True})

    async def action() -> None:
        options = nf.options_template_set(300, [(1, 4)], [(34, 4)], ipfix=False)
        option_data = nf.flow_set(300, struct.pack("!II", 0, 64))
        data = nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1000, 80, octets=100, packets=2))
        send(port_of(receiver), nf.v9_datagram([options, option_data, softflowd_template(), data]))

    await run_until(receiver, sink, lambda: len(log_records(sink)) >= 1, action)
    (r,) = log_records(sink)
    assert int(r["flow.sampling_rate"]) == 64 and int(r["flow.io.bytes"]) == 6400 and int(r["flow.io.packets"]) == 128
    assert receiver.totals["127.0.0.1"][6] == [6400, 128, 1]
    metrics = MessageToDict(receiver.metrics_request())
    names = {m["name"]: m for m in metrics["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]}
    point = names["tapio.netflow.bytes"]["sum"]["dataPoints"][0]
    assert point["asInt"] == "6400"
    assert {a["key"]: a["value"]["stringValue"] for a in point["attributes"]} == {"flow.sampler_address": "127.0.0.1", "network.transport": "tcp"}


async def test_withdrawn_templates_stop_decoding_and_leave_storage(tmp_path):
    storage = Storage.open(tmp_path / "tapio.db")
    settings = make_settings({ComponentID("storage"): storage})
    receiver, sink, _ = make_receiver({"storage": "storage"}, settings=settings)
    checkpoints = storage.checkpoints("netflow")

    async def action() -> None:
        port = port_of(receiver)
        send(port, nf.ipfix_message([softflowd_template(ipfix=True), nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2), pad_to=1)]))
        await sink.wait_until(lambda: len(log_records(sink)) == 1)
        with trio.fail_after(5):
            while not checkpoints.items():
                await trio.sleep(0.01)
        send(port, nf.ipfix_message([nf.template_set([(1024, [])], ipfix=True)], sequence=1))
        send(port, nf.ipfix_message([nf.flow_set(1024, v4_record("10.0.0.5", "10.0.0.6", 1, 2), pad_to=1)], sequence=1))

    tel = settings.telemetry.telemetry
    await run_until(receiver, sink, lambda: tel.value("tapio_netflow_unknown_template_total") >= 1, action)
    with trio.fail_after(5):
        while checkpoints.items():
            await trio.sleep(0.01)
    assert [r["source.address"] for r in log_records(sink)] == ["10.0.0.1"]
    storage.close()


async def test_a_restart_between_template_and_data_decodes_with_persisted_templates(tmp_path):
    storage = Storage.open(tmp_path / "tapio.db")
    extensions = {ComponentID("storage"): storage}
    listen = {"protocols": {"netflow": {"endpoint": f"127.0.0.1:{free_port()}"}}, "storage": "storage"}
    first, first_sink, _ = make_receiver(listen, settings=make_settings(extensions))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            send(port_of(first), nf.v9_datagram([softflowd_template()], sequence=0))
            while not storage.checkpoints("netflow").items():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert log_records(first_sink) == []

    second, sink, settings = make_receiver(listen, settings=make_settings(extensions))
    data = nf.v9_datagram([nf.flow_set(1024, v4_record("10.0.0.7", "10.0.0.8", 1234, 443))], sequence=1)
    await run_until(second, sink, lambda: len(log_records(sink)) >= 1, lambda: trio.to_thread.run_sync(send, port_of(second), data))
    assert log_records(sink)[0]["source.address"] == "10.0.0.7"
    assert settings.telemetry.telemetry.value("tapio_netflow_unknown_template_total") == 0
    storage.close()

    # without storage the same data waits for a template (the control)
    third, third_sink, third_settings = make_receiver()
    tel = third_settings.telemetry.telemetry
    await run_until(third, third_sink, lambda: tel.value("tapio_netflow_unknown_template_total") == 1, lambda: trio.to_thread.run_sync(send, port_of(third), data))
    assert log_records(third_sink) == []


async def test_a_sequence_gap_is_counted_by_exporter_and_the_flows_after_it_still_arrive():
    receiver, sink, settings = make_receiver()

    async def action() -> None:
        port = port_of(receiver)
        for sequence, src in ((0, "10.0.0.1"), (1, "10.0.0.3"), (5, "10.0.0.5")):  # 2, 3 and 4 never arrive
            send(port, nf.v9_datagram([softflowd_template(), nf.flow_set(1024, v4_record(src, "10.0.0.2", 1000, 80))], sequence=sequence))

    await run_until(receiver, sink, lambda: len(log_records(sink)) >= 3, action)
    assert sorted(r["source.address"] for r in log_records(sink)) == ["10.0.0.1", "10.0.0.3", "10.0.0.5"]
    tel = settings.telemetry.telemetry
    assert tel.value("tapio_netflow_sequence_gaps_total", exporter="127.0.0.1") == 1
    assert tel.value("tapio_netflow_sequence_missed_total", exporter="127.0.0.1") == 3
    assert tel.value("tapio_netflow_malformed_datagrams_total") == 0


async def test_malformed_datagrams_are_counted_by_exporter_and_reason_and_reception_goes_on(caplog):
    receiver, sink, settings = make_receiver()

    async def action() -> None:
        port = port_of(receiver)
        send(port, b"\x00\x07junk", nf.v9_datagram([softflowd_template()])[:-9], nf.v5_datagram([]), b"")
        send(port, nf.v9_datagram([softflowd_template(), nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2))], sequence=5))

    await run_until(receiver, sink, lambda: len(log_records(sink)) >= 1, action)
    tel = settings.telemetry.telemetry
    for reason in ("unknown_version", "length_beyond_datagram", "bad_count", "truncated_header"):
        assert tel.value("tapio_netflow_malformed_datagrams_total", exporter="127.0.0.1", reason=reason) == 1, reason
        assert tel.value("tapio_bad_input_total", reason=reason) == 1
    assert "malformed" in caplog.text and "127.0.0.1" in caplog.text


async def test_several_sockets_share_a_port_and_every_exporter_arrives():
    receiver, sink, _ = make_receiver({"sockets": 3})

    async def action() -> None:
        assert len(receiver._sockets) == 6  # three per listener, those of one listener on one port
        assert len({s.getsockname()[1] for s, key in receiver._sockets if key.startswith("protocols.netflow")}) == 1
        port = port_of(receiver)
        for i in range(12):  # twelve exporters (source ports) spread by the kernel over the sockets
            send(port, nf.v9_datagram([softflowd_template(), nf.flow_set(1024, v4_record(f"10.5.0.{i + 1}", "10.0.0.2", 1, 2))]))

    await run_until(receiver, sink, lambda: len(log_records(sink)) >= 12, action)
    assert len({r["source.address"] for r in log_records(sink)}) == 12


async def test_a_full_pipeline_backs_up_into_the_socket_and_kernel_drops_are_counted():
    receiver, sink, settings = make_receiver({"receive_buffer_size": "64KiB", "max_batch_records": 1})
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            sink.pause()
            port = port_of(receiver)
            datagram = nf.v9_datagram([softflowd_template(), nf.flow_set(1024, v4_record("10.0.0.1", "10.0.0.2", 1, 2) * 20)])
            await trio.to_thread.run_sync(lambda: send(port, *[datagram] * 2000))
            receiver.poll_drops()
            drops = settings.telemetry.telemetry.value("tapio_netflow_socket_drops_total", listener="netflow")
            assert drops > 0
            sink.resume()
            await sink.wait_until(lambda: len(log_records(sink)) >= 20 * (2000 - drops))
            nursery.cancel_scope.cancel()
    assert len(log_records(sink)) == 20 * (2000 - drops)  # everything the kernel kept arrived


async def test_sflow_samples_and_counters_over_udp():
    from scapy.all import IP, TCP, Ether

    receiver, sink, _ = make_receiver({"metrics_interval": "50ms"}, sink=RecordingConsumer())
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.7.0.1", dst="10.7.0.2") / TCP(sport=999, dport=22))
    datagram = nf.sflow_datagram(
        [nf.sflow_flow_sample([nf.sflow_raw_header(frame, frame_length=1000)], rate=256), nf.sflow_counter_sample(7, in_octets=123, out_octets=456)],
        agent="192.0.2.77",
    )

    def metric_batches() -> list:
        return [b for b in sink.batches if b.signal is Signal.METRICS]

    await run_until(receiver, sink, lambda: log_records(sink) and metric_batches(), lambda: trio.to_thread.run_sync(send, port_of(receiver, "sflow"), datagram))
    (r,) = log_records(sink)
    assert (r["source.address"], int(r["destination.port"]), r["flow.sampler_address"], int(r["flow.sampling_rate"])) == ("10.7.0.1", 22, "192.0.2.77", 256)
    metrics = MessageToDict(metric_batches()[-1].requests[0])["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    io = next(m for m in metrics if m["name"] == "tapio.netflow.interface.io")
    values = {next(a["value"]["stringValue"] for a in p["attributes"] if a["key"] == "network.io.direction"): p["asInt"] for p in io["sum"]["dataPoints"]}
    assert values == {"receive": "123", "transmit": "456"}


# -- tapio run


def test_tapio_run_restart_between_template_and_data(tmp_path):
    """Two real `tapio run` processes sharing a storage file: the first hears the templates, the second only data."""
    port, metrics = free_port(), free_port()
    out = tmp_path / "out.jsonl"
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"""
receivers:
  netflow:
    protocols:
      ipfix: {{endpoint: "127.0.0.1:{port}"}}
    storage: storage
exporters:
  file: {{path: "{out}"}}
extensions:
  storage: {{path: "{tmp_path}/tapio.db"}}
service:
  extensions: [storage]
  pipelines:
    logs: {{receivers: [netflow], exporters: [file]}}
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
""")
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        send(port, nf.ipfix_message([softflowd_template(ipfix=True)]))
        t.wait_for(lambda: t.metrics().get('tapio_netflow_datagrams_total{exporter="127.0.0.1",receiver="netflow"}', 0) >= 1, WAIT, "the template datagram")
        t.signal()
        assert t.wait_exit() == 0
    with TapioProcess([cfg], metrics_port=metrics) as t:
        t.wait_ready()
        assert "1 templates restored" in t.stderr
        send(port, nf.ipfix_message([nf.flow_set(1024, v4_record("10.0.0.9", "10.0.0.10", 5555, 443), pad_to=1)], sequence=0))
        t.wait_for(lambda: out.exists() and "10.0.0.9" in out.read_text(), WAIT, "the record in the file")
        t.signal()
        assert t.wait_exit() == 0
    lines = [otlpjson.decode(Signal.LOGS, line.encode()) for line in out.read_text().splitlines() if json.loads(line).get("resourceLogs")]
    attrs = [{a.key: a.value for a in lr.attributes} for req in lines for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records]
    assert [(a["source.address"].string_value, a["destination.port"].int_value, a["flow.type"].string_value) for a in attrs] == [("10.0.0.9", 443, "ipfix")]
