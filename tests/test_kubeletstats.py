"""The kubeletstats receiver against a stand-in kubelet over TLS (tapio.testing.fake_kubelet), and its parser.

The stand-in serves /stats/summary and /pods documents shaped as the
kubelet's published types behind the kubelet's authentication (bearer
token, client certificate); see its docstring for why it is a stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path
import logging

import pytest
import trio
from hypothesis import given, settings, strategies as st

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.decode import decode_dataclass
from tapio.receivers.kubeletstats import factory
from tapio.receivers.kubeletstats._component import KubeletStartupError, resolve_endpoint
from tapio.receivers.kubeletstats._summary import SummaryError, metrics_request, parse_pod_specs, parse_quantity, parse_summary, parse_time
from tapio.telemetry import Telemetry
from tapio.testing.fake_kubelet import as_bytes, open_fake_kubelet, pod_list, summary_document
from tapio.testing.sink import RecordingConsumer
from tests.test_otlp_exporter_tls import certs  # noqa: F401  (the fixture: a CA, server and client certificates)

DEADLINE = 30
TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token"


@pytest.fixture
def service_account(tmp_path, certs):  # noqa: F811
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(TOKEN + "\n")
    (d / "ca.crt").write_bytes(Path(certs.ca_pem).read_bytes())
    return d


def make(endpoint: str, **overrides):
    config = decode_dataclass(factory.config_class, {"endpoint": endpoint, "initial_delay": "0s", "collection_interval": "100ms", **overrides})
    assert config.validate() == []
    telemetry = Telemetry()
    settings_ = Settings(id=ComponentID("kubeletstats"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "kubeletstats"),
                         logger=logging.getLogger("test.kubeletstats"))
    sink = RecordingConsumer(ack=True)
    return factory.create(settings_, config, Ports(output=sink)), sink, telemetry


def points(sink) -> dict[tuple, object]:
    """(metric name, resource attrs, point attrs) → the data point, over everything recorded."""
    out = {}
    for req in sink.requests():
        for rm in req.resource_metrics:
            res = tuple(sorted((kv.key, kv.value.string_value) for kv in rm.resource.attributes))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    data = getattr(m, m.WhichOneof("data"))
                    for p in data.data_points:
                        out[(m.name, res, tuple(sorted((kv.key, kv.value.string_value) for kv in p.attributes)))] = (m, p)
    return out


def find(sink, name: str, **resource) -> list:
    return [(m, p) for (n, res, _), (m, p) in points(sink).items() if n == name and set(resource.items()) <= set(res)]


async def scrape_once(receiver, sink, n: int = 1) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        with trio.fail_after(DEADLINE):
            while receiver.scrapes < n:
                await receiver.scraped.wait()
        nursery.cancel_scope.cancel()


async def test_service_account_scrape_reports_the_collectors_metrics(certs, service_account):  # noqa: F811
    docs = as_bytes(summary_document(pods=4, containers=2)), as_bytes(pod_list(pods=4, containers=2))
    async with open_fake_kubelet(*docs, cert_file=certs.server_pem, key_file=certs.server_key, token=TOKEN) as kubelet:
        receiver, sink, telemetry = make(kubelet.endpoint, auth_type="serviceAccount", service_account_dir=str(service_account),
                                         metric_groups=["node", "pod", "container", "volume"])
        await scrape_once(receiver, sink)
    assert {path for path, _ in kubelet.requests} == {"/stats/summary", "/pods"}
    assert all(auth == f"Bearer {TOKEN}" for _, auth in kubelet.requests)
    assert telemetry.value("tapio_kubeletstats_scrapes_total", outcome="ok") == 1

    pod0 = {"k8s.pod.name": "web-0", "k8s.namespace.name": "shop", "k8s.node.name": "node-1"}
    (m, p), = find(sink, "k8s.pod.cpu.usage", **pod0)
    assert m.unit == "{cpu}" and p.as_double == pytest.approx(0.003)
    (m, p), = find(sink, "k8s.pod.memory.working_set", **pod0)
    assert m.unit == "By" and p.as_int == 24_000_000
    (m, p), = find(sink, "k8s.pod.cpu.time", **pod0)
    assert m.sum.is_monotonic and m.sum.aggregation_temporality == 2 and p.as_double == pytest.approx(90.0)
    assert p.start_time_unix_nano == parse_time("2025-05-20T10:00:00.123456789Z") and p.time_unix_nano == parse_time("2025-05-20T10:30:00.123456789Z")
    (m, p), = find(sink, "container.memory.rss", **pod0, **{"k8s.container.name": "app-1"})
    assert p.as_int == 9_000_000
    io = {dict(k[2])["direction"]: v[1].as_int for k, v in points(sink).items() if k[0] == "k8s.node.network.io" and dict(k[2])["interface"] == "eth0"}
    assert io == {"receive": 9_000_000_000, "transmit": 8_000_000_000}
    (m, p), = find(sink, "k8s.node.memory.available", **{"k8s.node.name": "node-1"})
    assert p.as_int == 6_000_000_000
    (m, p), = find(sink, "k8s.volume.capacity", **pod0, **{"k8s.volume.name": "data-0", "k8s.volume.type": "persistentVolumeClaim",
                                                             "k8s.persistentvolumeclaim.name": "data-web-0"})
    assert p.as_int == 100_000_000_000

    # limit utilisation: the working set over the spec's limit, only where a limit is set
    (m, p), = find(sink, "k8s.container.memory_limit_utilization", **pod0, **{"k8s.container.name": "app-0"})
    assert m.unit == "1" and p.as_double == pytest.approx(12_000_000 / (64 << 20))
    (m, p), = find(sink, "k8s.container.cpu_limit_utilization", **pod0, **{"k8s.container.name": "app-1"})
    assert p.as_double == pytest.approx(0.003 / 0.5)
    (m, p), = find(sink, "k8s.pod.memory_limit_utilization", **pod0)
    assert p.as_double == pytest.approx(24_000_000 / (2 * (64 << 20)))
    pod1 = {"k8s.pod.name": "web-1"}
    assert not find(sink, "k8s.container.memory_limit_utilization", **pod1, **{"k8s.container.name": "app-1"})
    assert find(sink, "k8s.container.memory_limit_utilization", **pod1, **{"k8s.container.name": "app-0"})
    assert not find(sink, "k8s.pod.memory_limit_utilization", **pod1)  # one container without a limit: the pod has none
    (m, p), = find(sink, "k8s.container.memory_request_utilization", **pod1, **{"k8s.container.name": "app-1"})
    assert p.as_double == pytest.approx(12_000_001 / (32 << 20))


async def test_a_wrong_token_is_refused_and_a_rotated_token_is_picked_up(certs, service_account):  # noqa: F811
    (service_account / "token").write_text("stale")
    docs = as_bytes(summary_document(pods=1)), as_bytes(pod_list(pods=1))
    async with open_fake_kubelet(*docs, cert_file=certs.server_pem, key_file=certs.server_key, token=TOKEN) as kubelet:
        receiver, sink, telemetry = make(kubelet.endpoint, service_account_dir=str(service_account))
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            with trio.fail_after(DEADLINE):
                while telemetry.value("tapio_kubeletstats_scrapes_total", outcome="http_403") < 1:
                    await receiver.scraped.wait()
                assert sink.item_count == 0
                (service_account / "token").write_text(TOKEN)
                await sink.wait_for_batches(1)
            nursery.cancel_scope.cancel()
    assert find(sink, "k8s.pod.memory.usage", **{"k8s.pod.name": "web-0"})


async def test_tls_client_certificate_and_insecure_skip_verify(certs):  # noqa: F811
    docs = as_bytes(summary_document(pods=1)), as_bytes(pod_list(pods=1))
    async with open_fake_kubelet(*docs, cert_file=certs.server_pem, key_file=certs.server_key, client_ca_file=certs.ca_pem) as kubelet:
        receiver, sink, _ = make(kubelet.endpoint, auth_type="tls", ca_file=certs.ca_pem, cert_file=certs.client_pem, key_file=certs.client_key)
        await scrape_once(receiver, sink)
        assert find(sink, "k8s.node.cpu.usage") and kubelet.requests[0][1] == ""
        # without a client certificate the kubelet refuses the handshake
        receiver, sink, telemetry = make(kubelet.endpoint, auth_type="none", ca_file=certs.ca_pem)
        await scrape_once(receiver, sink)
        assert sink.item_count == 0 and telemetry.value("tapio_kubeletstats_scrapes_total", outcome="ok") == 0
    async with open_fake_kubelet(*docs, cert_file=certs.server_pem, key_file=certs.server_key) as kubelet:
        # a CA that did not sign the kubelet's certificate: refused, unless verification is skipped
        receiver, sink, telemetry = make(kubelet.endpoint, auth_type="none", ca_file=certs.other_pem)
        await scrape_once(receiver, sink)
        assert sink.item_count == 0 and telemetry.value("tapio_kubeletstats_scrapes_total", outcome="connecterror") == 1
        receiver, sink, _ = make(kubelet.endpoint, auth_type="none", ca_file=certs.other_pem, insecure_skip_verify=True)
        await scrape_once(receiver, sink)
        assert find(sink, "k8s.node.cpu.usage")


async def test_bad_documents_and_failures_are_counted_and_scraping_goes_on_every_interval(certs):  # noqa: F811
    async with open_fake_kubelet(b"<html>not json", b"{}", cert_file=certs.server_pem, key_file=certs.server_key) as kubelet:
        receiver, sink, telemetry = make(kubelet.endpoint, auth_type="none", ca_file=certs.ca_pem, collection_interval="200ms")
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run)
            with trio.fail_after(DEADLINE):
                while receiver.scrapes < 1:
                    await receiver.scraped.wait()
                kubelet.fail_with = 503
                while receiver.scrapes < 2:
                    await receiver.scraped.wait()
                kubelet.fail_with = None
                kubelet.summary = as_bytes(summary_document(pods=2))
                await sink.wait_for_batches(3)
            nursery.cancel_scope.cancel()
    tel = telemetry
    assert tel.value("tapio_bad_input_total", reason="not_json") == 1
    assert tel.value("tapio_bad_input_total", reason="pods_bad_pod_list") >= 3
    assert tel.value("tapio_kubeletstats_scrapes_total", outcome="http_503") == 1
    starts = list(receiver.started_at)
    # scrapes start on the schedule set by the first (start + k * collection_interval), never sooner
    assert len(starts) >= 3 and all(t >= starts[0] + k * 0.2 for k, t in enumerate(starts)), starts
    assert not find(sink, "k8s.container.memory_limit_utilization")  # no pod specs: no utilisation, the rest reported
    assert find(sink, "container.cpu.usage", **{"k8s.container.name": "app-0"})


async def test_startup_fails_plainly_without_the_token_or_the_node_name(tmp_path):
    receiver, _, _ = make("https://127.0.0.1:1", service_account_dir=str(tmp_path))
    with pytest.raises(KubeletStartupError, match=r"cannot read the CA file .*/ca.crt"):
        await receiver.run()
    (tmp_path / "ca.crt").write_text("")
    receiver, _, _ = make("https://127.0.0.1:1", service_account_dir=str(tmp_path), insecure_skip_verify=True)
    with pytest.raises(KubeletStartupError, match=r"cannot read the service account token .*/token"):
        await receiver.run()
    with pytest.raises(KubeletStartupError, match="K8S_NODE_NAME"):
        resolve_endpoint("https://${env:K8S_NODE_NAME}:10250", {})
    assert resolve_endpoint("https://${env:K8S_NODE_NAME}:10250/", {"K8S_NODE_NAME": "n1"}) == "https://n1:10250"


def test_quantities_and_times():
    assert parse_quantity("64Mi") == 64 << 20 and parse_quantity("500m") == 0.5 and parse_quantity("2") == 2
    assert parse_quantity("1e3") == 1000 and parse_quantity("1E") == 1e18 and parse_quantity("1.5Gi") == 1.5 * (1 << 30)
    assert parse_quantity("lots") is None and parse_quantity(None) is None and parse_quantity(True) is None
    assert parse_time("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert parse_time("1970-01-01T01:00:01+01:00") == 1_000_000_000
    assert parse_time("2025-13-01T00:00:00Z") == 0 and parse_time("yesterday") == 0 and parse_time(5) == 0


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["node", "pods", "podRef", "uid", "name", "namespace", "cpu", "memory", "usageNanoCores", "workingSetBytes", "containers",
         "volume", "network", "interfaces", "time", "startTime", "items", "metadata", "spec", "resources", "limits"]), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_json_is_a_summary_or_a_summary_error(doc):
    data = json.dumps(doc).encode()
    for parse in (parse_summary, parse_pod_specs):
        try:
            parsed = parse(data)
        except SummaryError:
            continue
        if parse is parse_summary:
            metrics_request(parsed, groups=["node", "pod", "container", "volume"], now_ns=1, specs=None)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_are_a_summary_or_a_summary_error(data):
    try:
        parse_summary(data)
    except SummaryError:
        pass


async def test_a_kubelet_that_refuses_pods_leaves_only_the_utilization_out_and_says_which_permission(certs, caplog):  # noqa: F811
    docs = as_bytes(summary_document(pods=1)), as_bytes(pod_list(pods=1))
    async with open_fake_kubelet(*docs, cert_file=certs.server_pem, key_file=certs.server_key) as kubelet:
        kubelet.fail_pods_with = 403
        receiver, sink, telemetry = make(kubelet.endpoint, auth_type="none", ca_file=certs.ca_pem)
        with caplog.at_level(logging.WARNING, logger="test.kubeletstats"):
            await scrape_once(receiver, sink, n=2)
        assert telemetry.value("tapio_kubeletstats_scrapes_total", outcome="ok") == 2
        assert telemetry.value("tapio_kubeletstats_pod_specs_total", outcome="http_403") == 2
        assert find(sink, "k8s.pod.memory.usage") and not find(sink, "k8s.pod.memory_limit_utilization")
        warnings = [r.getMessage() for r in caplog.records if "/pods" in r.getMessage()]
        assert len(warnings) == 1 and "nodes/pods" in warnings[0] and "nodes/proxy" in warnings[0], warnings  # once, not every scrape
        kubelet.fail_pods_with = None
        receiver, sink, telemetry = make(kubelet.endpoint, auth_type="none", ca_file=certs.ca_pem)
        await scrape_once(receiver, sink)
        assert telemetry.value("tapio_kubeletstats_pod_specs_total", outcome="ok") == 1 and find(sink, "k8s.pod.memory_limit_utilization")
