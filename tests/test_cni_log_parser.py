"""The cni-log line parsers against fixtures of every plugin style, and fuzzed.

The fixtures in tests/data/cni/ were written from the plugins' public
documentation and source (the formats their loggers write), with made-up
pods, ids and addresses. Each expectation below is what a user would read
off the line by eye.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapio.receivers.cni_log._parser import ATTRIBUTES, EXTRA_PREFIX, MAX_EXTRA_FIELDS, MAX_EXTRA_VALUE, LineParser, plugin_for_path, severity

DATA = Path(__file__).parent / "data" / "cni"

CALICO_CID = "5f1c2a9e0b7d4c3a8e6f1b2d3c4a5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d"
CILIUM_CID = "9e2b7c41d0a35f68e1b9c2d4f7a0836e5b1c9d2f4a7e0b3c6d9f2a5e8b1c4d7f"
CILIUM_NETNS = "/var/run/netns/cni-2a7c9e1f-04b3-d8a6-52ef-9c1b7d3a6e40"
MULTUS_CID = "77ab01cd23ef4567890abcdef1234567890abcdef1234567890abcdef1234567"
MULTUS_UID = "3e1f5a7b-9c0d-4e2f-8a1b-3c5d7e9f0a2b"
AWS_CID = "b3c90d1e2f3a4b5c6d7e8f90a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0"
AWS_NETNS = "/var/run/netns/cni-0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a"

calico_pod = {"container.id": CALICO_CID, "k8s.namespace.name": "shop", "k8s.pod.name": "checkout-7d9c8b6f5-x2vqp"}
cilium_pod = {
    "container.id": CILIUM_CID,
    "tapio.cni.netns": CILIUM_NETNS,
    "network.interface.name": "eth0",
    "k8s.namespace.name": "payments",
    "k8s.pod.name": "ledger-0",
    "k8s.pod.uid": "0a4f3e2d-1c0b-4a9f-8e7d-6c5b4a3f2e1d",
}
aws_pod = {
    "container.id": AWS_CID,
    "tapio.cni.netns": AWS_NETNS,
    "network.interface.name": "eth0",
    "k8s.namespace.name": "web",
    "k8s.pod.name": "frontend-5c7d8f9b6-abcde",
    "k8s.pod.uid": "5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a",
}

#: (file, line number from 1, style, severity text, time as written in UTC, attributes that must be there with these values)
EXPECTED = [
    ("calico.log", 1, "calico", "INFO", "2024-05-14T09:12:01.402", {**calico_pod, "process.pid": 27311, "code.file.path": "plugin.go", "code.line.number": 327}),
    ("calico.log", 2, "calico", "INFO", "2024-05-14T09:12:01.403", {**calico_pod, "tapio.cni.operation": "ADD"}),
    ("calico.log", 3, "calico", "INFO", "2024-05-14T09:12:01.460", {"container.id": CALICO_CID, "tapio.cni.field.HandleID": f"k8s-pod-network.{CALICO_CID}"}),
    ("calico.log", 4, "calico", "INFO", "2024-05-14T09:12:01.472", {"tapio.cni.ips": ["10.244.17.9/26"], "tapio.cni.field.host": "node-a"}),
    ("calico.log", 5, "calico", "INFO", "2024-05-14T09:12:01.480", {"container.id": CALICO_CID, "tapio.cni.ips": ["10.244.17.9/26"]}),
    ("calico.log", 6, "kv", "INFO", "2024-05-14T09:12:01", {"tapio.cni.plugin": "calico", "code.file.path": "ipam_plugin.go", "code.line.number": 378}),
    ("calico.log", 7, "calico", "INFO", "2024-05-14T09:12:01.515", {**calico_pod}),
    ("calico.log", 8, "calico", "INFO", "2024-05-14T09:12:01.516", {**calico_pod, "tapio.cni.ips": ["10.244.17.9/32"]}),
    ("calico.log", 9, "calico", "INFO", "2024-05-14T09:12:01.530", {**calico_pod}),
    ("calico.log", 10, "calico", "INFO", "2024-05-14T09:14:30.101", {**calico_pod, "tapio.cni.operation": "DEL"}),
    ("calico.log", 11, "calico", "WARN", "2024-05-14T09:14:30.152", {"container.id": CALICO_CID}),
    ("calico.log", 12, "calico", "ERROR", "2024-05-14T09:15:02.004", {"tapio.cni.operation": "ADD", "error.message": "failed to set up pod network: connection is unauthorized: Unauthorized"}),
    ("calico.log", 13, "calico", "DEBUG", "2024-05-14T09:15:02.005", {
        "k8s.namespace.name": "shop", "k8s.pod.name": "cart-0", "container.id": "c0ffee00aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff"}),
    ("cilium-cni.log", 1, "cilium", "DEBUG", "2024-05-14T09:20:11.834512903", {**cilium_pod, "tapio.cni.operation": "ADD", "tapio.cni.event_id": "4c1d2e3f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"}),
    ("cilium-cni.log", 2, "cilium", "DEBUG", "2024-05-14T09:20:11.901337", {**cilium_pod, "tapio.cni.ips": ["10.0.3.77"]}),
    ("cilium-cni.log", 3, "cilium", "WARN", "2024-05-14T09:20:12.002", {**cilium_pod, "error.message": "[PUT /endpoint/{id}][429] putEndpointIdTooManyRequests"}),
    ("cilium-cni.log", 4, "cilium", "DEBUG", "2024-05-14T09:25:00", {**cilium_pod, "tapio.cni.operation": "CHECK"}),
    ("cilium-cni.log", 5, "cilium", "DEBUG", "2024-05-14T07:40:31.5", {**cilium_pod, "tapio.cni.operation": "DEL"}),
    ("cilium-cni.log", 6, "cilium", "INFO", "2024-05-14T09:40:32", {"container.id": CILIUM_CID, "tapio.cni.netns": CILIUM_NETNS, "network.interface.name": "eth0"}),
    ("multus.log", 1, "multus", "INFO", "2024-05-14T09:30:00", {
        "tapio.cni.operation": "ADD", "container.id": MULTUS_CID, "k8s.namespace.name": "telco", "k8s.pod.name": "upf-0",
        "k8s.pod.uid": MULTUS_UID, "network.interface.name": "eth0", "tapio.cni.netns": "/var/run/netns/cni-6f0e2d1c-3b4a-5968-7a8b-9c0d1e2f3a4b"}),
    ("multus.log", 2, "multus", "INFO", "2024-05-14T09:30:01", {
        "tapio.cni.operation": "ADD", "k8s.namespace.name": "telco", "k8s.pod.name": "upf-0", "k8s.pod.uid": MULTUS_UID,
        "network.interface.name": "eth0", "tapio.cni.network": "k8s-pod-network", "tapio.cni.ips": ["10.244.5.14/32"]}),
    ("multus.log", 3, "multus", "INFO", "2024-05-14T09:30:01", {
        "tapio.cni.operation": "ADD", "network.interface.name": "net1", "tapio.cni.network": "telco/n3-net", "tapio.cni.ips": ["192.168.30.21/24"]}),
    ("multus.log", 4, "multus", "INFO", "2024-05-14T09:30:01", {"tapio.cni.operation": "ADD", "container.id": MULTUS_CID}),
    ("multus.log", 5, "multus", "INFO", "2024-05-14T09:45:10", {
        "tapio.cni.operation": "DEL", "k8s.pod.name": "upf-0", "network.interface.name": "net1", "tapio.cni.network": "sriov-n3"}),
    ("multus.log", 6, "multus", "ERROR", "2024-05-14T09:46:00", {
        "k8s.namespace.name": "telco", "k8s.pod.name": "upf-1", "k8s.pod.uid": "8d2c4e6f-0a1b-4c3d-9e5f-7a9b1c3d5e7f"}),
    ("multus.log", 7, "multus", "ERROR", "2024-05-14T09:46:00", {"k8s.pod.name": "upf-1", "tapio.cni.network": "sriov-n3"}),
    ("multus.log", 8, "multus", "DEBUG", "2024-05-14T09:46:05", {}),
    ("multus.log", 9, "multus", "INFO", "2019-02-28T07:08:21", {
        "tapio.cni.operation": "ADD", "k8s.namespace.name": "default", "k8s.pod.name": "pod-case-01", "tapio.cni.network": "default-cni-network",
        "network.interface.name": "eth0", "tapio.cni.ips": ["10.244.2.3/24"]}),
    ("aws-plugin.log", 1, "aws-vpc-cni", "INFO", "2024-05-14T10:01:02.345", {"code.file.path": "routed-eni-cni-plugin/cni.go", "code.line.number": 128}),
    ("aws-plugin.log", 2, "aws-vpc-cni", "INFO", "2024-05-14T10:01:02.345", {**aws_pod, "tapio.cni.operation": "ADD"}),
    ("aws-plugin.log", 3, "aws-vpc-cni", "DEBUG", "2024-05-14T10:01:02.346", {}),
    ("aws-plugin.log", 4, "aws-vpc-cni", "INFO", "2024-05-14T10:01:02.391", {"tapio.cni.ips": ["192.168.42.17"]}),
    ("aws-plugin.log", 5, "aws-vpc-cni", "DEBUG", "2024-05-14T10:01:02.402", {"code.file.path": "driver/driver.go"}),
    ("aws-plugin.log", 6, "aws-vpc-cni", "INFO", "2024-05-14T10:20:40.001", {**aws_pod, "tapio.cni.operation": "DEL"}),
    ("aws-plugin.log", 7, "aws-vpc-cni", "INFO", "2024-05-14T10:20:40.037", {
        "k8s.pod.name": "frontend-5c7d8f9b6-abcde", "k8s.namespace.name": "web", "container.id": AWS_CID, "tapio.cni.ips": ["192.168.42.17"]}),
    ("aws-plugin.log", 8, "aws-vpc-cni", "ERROR", "2024-05-14T10:31:11.5", {}),
    ("aws-plugin.log", 9, "aws-vpc-cni", "INFO", "2019-03-12T20:40:42", {}),
    ("aws-plugin.log", 10, "aws-vpc-cni", "INFO", "2019-03-12T20:40:42", {
        "tapio.cni.operation": "ADD", "container.id": "4537a11399ab7a775d9714dc00674e8957f82cf78399db1fb3994c128a71811f",
        "tapio.cni.netns": "/proc/1361/ns/net", "k8s.namespace.name": "kube-ingress", "k8s.pod.name": "ingress-nginx-75dc9cb46b-bzrmv"}),
    ("aws-plugin.log", 11, "aws-vpc-cni", "ERROR", "2019-03-12T20:40:43", {
        "tapio.cni.operation": "DEL", "k8s.pod.name": "ingress-nginx-75dc9cb46b-bzrmv", "k8s.namespace.name": "kube-ingress",
        "container.id": "401bc7b65225585f61faa3c078f45c5abc7479f4f3fa442e74214a30c4f8a0e4"}),
    ("generic.log", 1, "azure-cni", "INFO", "2024-05-14T10:40:00.1", {
        "tapio.cni.operation": "ADD", "container.id": "aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44", "process.pid": 41122,
        "k8s.namespace.name": "default", "k8s.pod.name": "api-6b8f9c7d5-k2j4h", "network.interface.name": "eth0"}),
    ("generic.log", 2, "kv", "WARN", "2024-05-14T10:41:00.25", {
        "tapio.cni.operation": "ADD", "container.id": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "network.interface.name": "eth0", "tapio.cni.netns": "/var/run/netns/cni-a1b2c3d4"}),
    ("generic.log", 3, "kv", "ERROR", None, {"tapio.cni.operation": "DEL", "error.message": "link not found"}),
    ("generic.log", 4, "kv", "INFO", "2024-05-14T10:42:00", {
        "container.id": "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210", "network.interface.name": "eth0", "tapio.cni.ips": ["10.88.0.12/16"]}),
    ("generic.log", 5, "json", "INFO", "2024-05-14T10:42:03.5", {"tapio.cni.plugin": "bandwidth"}),
    ("generic.log", 6, "unparsed", "", None, {}),
    ("generic.log", 7, "unparsed", "", None, {}),
    ("generic.log", 8, "unparsed", "", None, {}),
]

#: each fixture as it would be found on a node, so the plugin hint comes from the path
HINT_PATHS = {
    "calico.log": "/var/log/calico/cni/cni.log",
    "cilium-cni.log": "/var/run/cilium/cilium-cni.log",
    "multus.log": "/var/log/multus.log",
    "aws-plugin.log": "/var/log/aws-routed-eni/plugin.log",
    "generic.log": "/var/log/cni/other.log",
}


def unix_ns(text: str) -> int:
    whole, _, frac = text.partition(".")
    seconds = calendar.timegm(dt.datetime.fromisoformat(whole).timetuple())
    return seconds * 10**9 + (int(frac.ljust(9, "0")) if frac else 0)


def fixture_line(name: str, number: int) -> str:
    return (DATA / name).read_text().splitlines()[number - 1]


def test_every_fixture_line_has_an_expectation():
    listed = {(name, n) for name, n, *_ in EXPECTED}
    for path in DATA.glob("*.log"):
        for n in range(1, len(path.read_text().splitlines()) + 1):
            assert (path.name, n) in listed, f"{path.name}:{n} has no expectation"


@pytest.mark.parametrize("name,number,style,sev,time,attrs", EXPECTED, ids=[f"{e[0]}:{e[1]}" for e in EXPECTED])
def test_fixture_line(name, number, style, sev, time, attrs):
    event = LineParser().parse(fixture_line(name, number), plugin_for_path(HINT_PATHS[name]))
    assert event.style == style
    assert event.attributes["tapio.cni.style"] == style
    assert severity(event.level)[1] == sev
    assert event.time_unix_nano == (unix_ns(time) if time else 0)
    for key, value in attrs.items():
        assert event.attributes.get(key) == value, f"{key}: {event.attributes.get(key)!r} != {value!r}"
    if style == "unparsed":
        assert set(event.attributes) <= {"tapio.cni.style", "tapio.cni.plugin"}
    for key in event.attributes:
        assert key in ATTRIBUTES or key.startswith(EXTRA_PREFIX), key


def test_plugin_names_follow_the_style_or_the_path():
    parser = LineParser()
    assert parser.parse(fixture_line("calico.log", 1)).attributes["tapio.cni.plugin"] == "calico"
    assert parser.parse(fixture_line("cilium-cni.log", 1)).attributes["tapio.cni.plugin"] == "cilium-cni"
    assert parser.parse(fixture_line("multus.log", 2)).attributes["tapio.cni.plugin"] == "multus"
    assert parser.parse(fixture_line("aws-plugin.log", 2)).attributes["tapio.cni.plugin"] == "aws-cni"
    # a line in a style any plugin may write takes the plugin from its file
    line = fixture_line("calico.log", 6)
    assert "tapio.cni.plugin" not in parser.parse(line).attributes
    assert parser.parse(line, plugin_for_path("/var/log/calico/cni/cni.log")).attributes["tapio.cni.plugin"] == "calico"
    assert plugin_for_path("/var/log/aws-routed-eni/plugin.log") == "aws-cni"
    assert plugin_for_path("/somewhere/else.log") == ""


def test_calico_fields_start_where_the_sorted_keys_do():
    # IPv4=1 IPv6=0 belong to the message: the formatter's fields are sorted, and ContainerID < IPv4
    event = LineParser().parse(fixture_line("calico.log", 3))
    assert event.message == "Calico CNI IPAM request count IPv4=1 IPv6=0"
    assert "tapio.cni.field.IPv4" not in event.attributes
    # a Go struct value with spaces, quotes and braces stays one field
    event = LineParser().parse(fixture_line("calico.log", 7))
    assert event.attributes["tapio.cni.field.endpoint"].startswith("&v3.WorkloadEndpoint{TypeMeta:")
    assert event.attributes["tapio.cni.field.WorkloadEndpoint"] == "node--a-k8s-checkout--7d9c8b6f5--x2vqp-eth0"


def test_calico_time_without_zone_is_read_in_the_configured_zone():
    line = fixture_line("calico.log", 1)
    utc = LineParser().parse(line).time_unix_nano
    plus2 = LineParser(naive_timezone=dt.timezone(dt.timedelta(hours=2))).parse(line).time_unix_nano
    assert utc - plus2 == 2 * 3600 * 10**9


def test_named_style_rejects_other_styles():
    cilium_only = LineParser(style="cilium")
    assert cilium_only.parse(fixture_line("cilium-cni.log", 1)).style == "cilium"
    assert cilium_only.parse(fixture_line("calico.log", 1)).style == "unparsed"
    with pytest.raises(ValueError, match="unknown CNI log style"):
        LineParser(style="flannel")


def test_extra_fields_are_bounded():
    obj = {"msg": "many fields", "level": "info", **{f"k{i:02}": "v" * 1000 for i in range(40)}}
    event = LineParser().parse(json.dumps(obj))
    extras = [k for k in event.attributes if k.startswith(EXTRA_PREFIX)]
    assert len(extras) == MAX_EXTRA_FIELDS
    assert all(len(event.attributes[k]) == MAX_EXTRA_VALUE for k in extras)


def test_go_escapes_in_quoted_values():
    event = LineParser().parse('time="2024-05-14T10:00:00Z" level=info msg="tab\\there \\"quoted\\" \\u00e9" error="x\\ny"')
    assert event.message == 'tab\there "quoted" é'
    assert event.attributes["error.message"] == "x\ny"


def test_impossible_times_are_zero():
    assert LineParser().parse("2024-13-45 99:99:99.000 [INFO][1] a.go 1: bad date").time_unix_nano == 0
    assert LineParser().parse('{"msg":"x","ts":"not a time"}').time_unix_nano == 0
    assert LineParser().parse('{"msg":"x","ts":1e300}').time_unix_nano == 0


# ------------------------------------------------------------------- fuzzing

ALL_LINES = [line for path in sorted(DATA.glob("*.log")) for line in path.read_text().splitlines()]


def check_event(event) -> None:
    assert event.style in ("calico", "cilium", "multus", "aws-vpc-cni", "azure-cni", "json", "kv", "unparsed")
    assert event.time_unix_nano >= 0
    for key, value in event.attributes.items():
        assert key in ATTRIBUTES or key.startswith(EXTRA_PREFIX)
        assert isinstance(value, (str, int)) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def test_every_truncation_and_trailing_junk_parses_cleanly():
    parser = LineParser()
    for line in ALL_LINES:
        for cut in range(len(line) + 1):
            check_event(parser.parse(line[:cut]))
        for junk in ("\x00\xff", " }}}", ' "', "=", " [[[", "\\"):
            check_event(parser.parse(line + junk))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_any_text(text):
    check_event(LineParser().parse(text))


fragments = st.sampled_from([
    "2024-05-14 09:12:01.402 [INFO][1] k8s.go 73: ", "2024-05-14T09:30:00Z [verbose] ", "2019-03-12T20:40:42Z [ERROR] ",
    "time=", "level=", "msg=", '"', "{", "}", "[", "]", "(", ")", " ", "=", ":", ";", "\\", "ContainerID(", "IfName:",
    "K8S_POD_NAME=", "K8S_POD_NAMESPACE=", "IPv4=[", "Add: ", "a:b:c:d ", "10.1.2.3/24", "::1", "fe80::1/64",
    '{"msg":', '"level":"error"', '"ts":', "1e308", "-1", "ipamd", "for pod ", "CmdAdd", "ADD", "\x00", "é",
])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(fragments, st.text(max_size=8)), max_size=40))
def test_fuzz_structured_fragments(parts):
    check_event(LineParser().parse("".join(parts)))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8,
), max_size=10))
def test_fuzz_json_objects(obj):
    check_event(LineParser().parse(json.dumps(obj)))
