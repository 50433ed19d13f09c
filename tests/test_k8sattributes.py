"""The k8sattributes processor against the stand-in API server, through a real kubeconfig file.

Records are associated by each route (pod IP, pod uid, container id, the
connection's address), get pod, namespace, node, owner chain, labels and
annotations; records that name their pod themselves are regrouped; deleted
pods resolve for the grace period; misses are counted by reason; bytes that
arrived as OTLP leave as OTLP bytes.
"""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import given, settings as hsettings, strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tapio.component import Kind, Ports
from tapio.config import ConfigError, decode_dataclass
from tapio.pdata import Batch, Signal
from tapio.processors.k8sattributes import factory
from tapio.processors.k8sattributes import _wire
from tapio.receivers.otlp import factory as otlp_factory
from tapio.testing import fake_kube as fk
from tapio.testing.sink import RecordingConsumer
from tapio.testing.wait import until

from .k8s_helpers import attrs, kv, logs_request, records_by_resource, running_processor, settings

CID = "c0" * 32
OTHER_CID = "d1" * 32


@pytest.fixture
def kube():
    with fk.FakeKube(token="tok") as server:
        dep_uid = "11111111-2222-3333-4444-555555555555"
        rs = server.apply("replicasets", fk.replicaset("web-6c45f8d6f6", namespace="shop", deployment=("web", dep_uid)))
        server.apply("namespaces", fk.namespace("shop", labels={"team": "payments"}))
        server.apply("nodes", fk.node("node-1", labels={"topology.kubernetes.io/zone": "z1"}))
        server.apply(
            "pods",
            fk.pod(
                "web-6c45f8d6f6-abcde",
                namespace="shop",
                uid="aaaaaaaa-0000-0000-0000-000000000001",
                ip="10.1.0.5",
                containers={"app": "containerd://" + CID, "sidecar": "containerd://" + OTHER_CID},
                labels={"app.kubernetes.io/name": "web", "pod-template-hash": "6c45f8d6f6"},
                annotations={"commit": "abc123", "resource.opentelemetry.io/service.version": "1.2"},
                owner=fk.owner_ref("ReplicaSet", "web-6c45f8d6f6", rs["metadata"]["uid"]),
            ),
        )
        yield server


def base_config(kube: fk.FakeKube, tmp_path, **extra) -> dict:
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    return {"auth_type": "kubeConfig", "kube_config_path": str(path), "wait_for_metadata": True, **extra}


POD = {
    "k8s.pod.name": "web-6c45f8d6f6-abcde",
    "k8s.pod.uid": "aaaaaaaa-0000-0000-0000-000000000001",
    "k8s.namespace.name": "shop",
    "k8s.node.name": "node-1",
    "k8s.deployment.name": "web",
}


def has_pod(resource: dict) -> bool:
    return all(resource.get(k) == v for k, v in POD.items())


@pytest.mark.parametrize(
    "resource",
    [{"k8s.pod.ip": "10.1.0.5"}, {"k8s.pod.uid": "aaaaaaaa-0000-0000-0000-000000000001"}, {"container.id": CID}, {"container.id": "containerd://" + CID}],
    ids=["pod-ip", "pod-uid", "container-id", "container-id-with-scheme"],
)
async def test_each_resource_route_finds_the_pod_with_owner_labels_and_annotations(kube, tmp_path, resource):
    config = base_config(
        kube,
        tmp_path,
        extract={
            "metadata": ["k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.deployment.name", "k8s.replicaset.name", "k8s.node.name", "k8s.node.uid", "k8s.container.name", "container.image.tag"],
            "labels": [{"tag_name": "app", "key": "app.kubernetes.io/name"}, {"key": "team", "from": "namespace"}, {"tag_name": "zone", "key_regex": "topology.kubernetes.io/(.*)", "from": "node"}],
            "annotations": [{"tag_name": "git.$1", "key_regex": "(comm.*)"}],
            "otel_annotations": True,
        },
    )
    async with running_processor(factory, config) as h:
        out = await h.roundtrip(Batch.of(Signal.LOGS, logs_request([(resource, [{}, {}])])))
    [(res, bodies)] = records_by_resource([out])
    assert bodies == ["record 0", "record 1"]
    assert has_pod(res), res
    assert res["k8s.replicaset.name"] == "web-6c45f8d6f6"
    assert res["app"] == "web" and res["k8s.namespace.labels.team"] == "payments" and res["zone"] == "z1"
    assert res["git.commit"] == "abc123" and res["service.version"] == "1.2"
    assert res["k8s.node.uid"] == kube.get("nodes", "node-1")["metadata"]["uid"]
    if "container.id" in resource:
        assert res["k8s.container.name"] == "app" and res["container.image.tag"] == "1.0"
    else:
        assert "k8s.container.name" not in res
    assert h.value("tapio_k8sattributes_associated_items_total") == 2
    assert h.value("tapio_k8sattributes_owner_lookups_total", result="found") == 1
    # only the ReplicaSet of the cached pod was fetched: no list or watch of replicasets
    assert kube.count("replicasets", watch=False) == 0 and kube.count("replicasets", watch=True) == 0
    assert sum(1 for r in kube.requests if r.path.endswith("/replicasets/web-6c45f8d6f6")) == 1


async def test_the_connection_route_via_the_otlp_receiver(kube, tmp_path):
    """A real OTLP/HTTP client on 127.0.0.1: the receiver records the address, the processor finds the pod with that IP."""
    kube.apply("pods", fk.pod("local", namespace="shop", ip="127.0.0.1"))
    config = base_config(kube, tmp_path, pod_association=[{"sources": [{"from": "connection"}]}])
    async with running_processor(factory, config) as h:
        receiver_cfg = decode_dataclass(otlp_factory.config_class, {"protocols": {"http": {"endpoint": "127.0.0.1:0"}}})
        to_processor = _Forward(h)
        receiver = otlp_factory.create(settings(Kind.RECEIVER, "otlp"), receiver_cfg, Ports(output=to_processor))
        async with trio.open_nursery() as n:
            await n.start(receiver.run)
            port = receiver.bound_endpoints["protocols.http.endpoint"].rsplit(":", 1)[1]
            body = logs_request([({"service.name": "checkout"}, [{}])]).SerializeToString()
            async with httpx.AsyncClient() as client:
                r = await client.post(f"http://127.0.0.1:{port}/v1/logs", content=body, headers={"content-type": "application/x-protobuf"})
            assert r.status_code == 200
            with trio.fail_after(10):
                await h.sink.wait_for_batches(1)
            n.cancel_scope.cancel()
    [(res, _)] = records_by_resource(h.sink.batches)
    assert res["k8s.pod.name"] == "local" and res["service.name"] == "checkout"


class _Forward:
    """The otlp receiver's output: into the processor's input channel."""

    signals = frozenset(Signal)

    def __init__(self, harness) -> None:
        self._send = harness._send

    async def send(self, batch: Batch) -> None:
        await self._send.send(batch)

    def send_nowait(self, batch: Batch) -> None:
        self._send.send_nowait(batch)


async def test_records_naming_their_pod_are_regrouped_one_resource_per_pod_and_bytes_stay_bytes(kube, tmp_path):
    kube.apply("pods", fk.pod("db-0", namespace="shop", uid="bbbbbbbb-0000-0000-0000-000000000002", containers={"db": "containerd://" + "e2" * 32}))
    config = base_config(kube, tmp_path)
    node_resource = {"host.name": "node-1", "service.name": "tapio"}
    records = [
        {"container.id": CID, "process.pid": 10},  # web, by container id
        {"process.pid": 1},  # a host process
        {"k8s.pod.uid": "bbbbbbbb-0000-0000-0000-000000000002", "process.pid": 20},  # db, by pod uid
        {"container.id": "f3" * 32, "process.pid": 30},  # a container no pod has
        {"container.id": OTHER_CID},  # web again (its sidecar)
        {"message.id": 7},  # nothing to go by
    ]
    request = logs_request([(node_resource, records)])
    async with running_processor(factory, config) as h:
        out = await h.roundtrip(Batch.from_bytes(Signal.LOGS, request.SerializeToString()))
        reasons = {r: h.value("tapio_k8sattributes_unassociated_items_total", reason=r) for r in ("no_association_attribute", "no_matching_pod", "host_process")}
        regrouped = h.value("tapio_k8sattributes_regrouped_items_total")
    groups = records_by_resource([out])
    assert groups[0] == (node_resource, ["record 1", "record 3", "record 5"])
    web, db = groups[1], groups[2]
    assert has_pod(web[0]) and web[0]["host.name"] == "node-1" and web[1] == ["record 0", "record 4"]
    assert db[0]["k8s.pod.name"] == "db-0" and db[1] == ["record 2"]
    assert len(groups) == 3
    assert reasons == {"no_association_attribute": 1, "no_matching_pod": 1, "host_process": 1}
    assert regrouped == 3
    # the record attributes themselves are untouched; the scope is kept
    rl = out.requests[0].resource_logs[1]
    assert rl.scope_logs[0].scope.name == "test"
    assert attrs(rl.scope_logs[0].log_records[0]) == {"container.id": CID, "process.pid": 10}
    # the bytes exporters will send are the request
    assert out.raw[0] is not None and Signal.LOGS.request_class.FromString(out.raw[0]) == out.requests[0]


async def test_spans_are_regrouped_too_and_metrics_get_resource_attributes(kube, tmp_path):
    spans = ExportTraceServiceRequest()
    rs = spans.resource_spans.add()
    rs.resource.attributes.append(kv("host.name", "node-1"))
    ss = rs.scope_spans.add()
    for cid in (CID, ""):
        span = ss.spans.add(name="tcp connect")
        if cid:
            span.attributes.append(kv("container.id", cid))
    metrics = Signal.METRICS.request_class()
    rm = metrics.resource_metrics.add()
    rm.resource.attributes.append(kv("k8s.pod.ip", "10.1.0.5"))
    rm.scope_metrics.add().metrics.add(name="m").gauge.data_points.add(as_int=1)
    async with running_processor(factory, base_config(kube, tmp_path)) as h:
        traced = await h.roundtrip(Batch.from_bytes(Signal.TRACES, spans.SerializeToString()))
        measured = await h.roundtrip(Batch.of(Signal.METRICS, metrics))
    resources = [attrs(r.resource) for r in traced.requests[0].resource_spans]
    assert resources[0] == {"host.name": "node-1"} and has_pod(resources[1])
    assert has_pod(attrs(measured.requests[0].resource_metrics[0].resource))
    assert measured.raw == [None]  # arrived as objects: no bytes to keep in step


async def test_the_resource_keeps_its_own_values(kube, tmp_path):
    async with running_processor(factory, base_config(kube, tmp_path)) as h:
        out = await h.roundtrip(Batch.from_bytes(Signal.LOGS, logs_request([({"k8s.pod.ip": "10.1.0.5", "k8s.pod.name": "mine"}, [{}])]).SerializeToString()))
    rl = out.requests[0].resource_logs[0]
    keys = [a.key for a in rl.resource.attributes]
    assert len(keys) == len(set(keys)) and attrs(rl.resource)["k8s.pod.name"] == "mine"
    assert Signal.LOGS.request_class.FromString(out.raw[0]) == out.requests[0]


async def test_pod_changes_follow_the_watch_and_a_deleted_pod_resolves_for_the_grace_period(kube, tmp_path):
    config = base_config(kube, tmp_path, pod_delete_grace_period="1s")
    by_ip = lambda ip: Batch.of(Signal.LOGS, logs_request([({"k8s.pod.ip": ip}, [{}])]))  # noqa: E731
    async with running_processor(factory, config) as h:
        cache = h.component.cache
        kube.apply("pods", fk.pod("late", namespace="shop", uid="cccccccc-0000-0000-0000-000000000003", ip="10.1.0.9"))
        await until(lambda: "cccccccc-0000-0000-0000-000000000003" in cache.by_uid)
        [(res, _)] = records_by_resource([await h.roundtrip(by_ip("10.1.0.9"))])
        assert res["k8s.pod.name"] == "late"
        kube.apply("pods", fk.pod("late", namespace="shop", ip="10.1.0.10"))  # its IP changed
        await until(lambda: "10.1.0.10" in cache.by_ip)
        assert "10.1.0.9" not in cache.by_ip
        # 410 mid-watch: the processor re-lists and carries on
        kube.expire_watches()
        kube.delete("pods", "late", "shop")
        await until(lambda: cache.by_uid["cccccccc-0000-0000-0000-000000000003"].deleted_at is not None)
        assert h.value("tapio_kube_relists_total", reason="expired") == 1
        [(res, _)] = records_by_resource([await h.roundtrip(by_ip("10.1.0.10"))])
        assert res["k8s.pod.name"] == "late", "a deleted pod still resolves inside the grace period"
        await until(lambda: "cccccccc-0000-0000-0000-000000000003" not in cache.by_uid, timeout=15)
        [(res, _)] = records_by_resource([await h.roundtrip(by_ip("10.1.0.10"))])
        assert "k8s.pod.name" not in res
        assert h.value("tapio_k8sattributes_unassociated_items_total", reason="no_matching_pod") == 1
        kube.bookmark()


async def test_wait_for_metadata_fails_the_start_when_the_api_is_down(kube, tmp_path):
    kube.outage = True
    config = decode_dataclass(factory.config_class, base_config(kube, tmp_path, wait_for_metadata_timeout="1s"))
    send, recv = trio.open_memory_channel(1)
    component = factory.create(settings(Kind.PROCESSOR, "k8sattributes"), config, Ports(input=recv, output=RecordingConsumer()))
    async with trio.open_nursery() as n:
        with pytest.raises(RuntimeError, match="not loaded .* within 1s"):
            await n.start(component.run)


async def test_node_from_env_var_scopes_the_watch_and_must_be_set(kube, tmp_path, monkeypatch):
    kube.apply("pods", fk.pod("elsewhere", node="node-2", ip="10.2.0.1"))
    monkeypatch.setenv("K8S_NODE_NAME", "node-1")
    async with running_processor(factory, base_config(kube, tmp_path, filter={"node_from_env_var": "K8S_NODE_NAME"})) as h:
        assert "10.2.0.1" not in h.component.cache.by_ip and "10.1.0.5" in h.component.cache.by_ip
    watch = [r for r in kube.requests if r.watch and r.path == "/api/v1/pods"][-1]
    assert watch.query["fieldSelector"] == "spec.nodeName=node-1"
    monkeypatch.delenv("K8S_NODE_NAME")
    config = decode_dataclass(factory.config_class, base_config(kube, tmp_path, filter={"node_from_env_var": "K8S_NODE_NAME"}))
    component = factory.create(settings(Kind.PROCESSOR, "k8sattributes"), config, Ports(input=trio.open_memory_channel(1)[1], output=RecordingConsumer()))
    with pytest.raises(RuntimeError, match=r"\$K8S_NODE_NAME is not set"):
        await component.run()


async def test_passthrough_adds_only_the_client_ip_and_reads_no_api(tmp_path):
    async with running_processor(factory, {"passthrough": True}) as h:
        batch = Batch.from_bytes(Signal.LOGS, logs_request([({"service.name": "a"}, [{}]), ({"k8s.pod.ip": "10.9.9.9"}, [{}])]).SerializeToString())
        batch.client_address = "10.0.0.7"
        out = await h.roundtrip(batch)
    assert [attrs(rl.resource) for rl in out.requests[0].resource_logs] == [{"service.name": "a", "k8s.pod.ip": "10.0.0.7"}, {"k8s.pod.ip": "10.9.9.9"}]
    assert Signal.LOGS.request_class.FromString(out.raw[0]) == out.requests[0]


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        decode_dataclass(
            factory.config_class,
            {
                "extract": {"metadata": ["k8s.pod.name", "service.name", "k8s.bogus"], "labels": [{"key": "a", "key_regex": "b"}, {"key_regex": "(", "tag_name": "x"}]},
                "pod_association": [{"sources": [{"from": "resource_attribute", "name": "ip"}]}],
                "filter": {"labels": [{"key": "", "op": "exists"}], "fields": [{"key": "spec.nodeName", "op": "exists"}]},
                "context": "prod",
            },
        )
    text = str(err.value)
    for expected in ("extract.metadata[1]", "extract.metadata[2]", "extract.labels[0]", "extract.labels[1].key_regex", "pod_association[0].sources[0].name", "filter.labels[0].key", "filter.fields[0].op", "context"):
        assert expected in text, expected


# ---------------------------------------------------------------- the wire functions, fuzzed

_keys = st.sampled_from(["container.id", "k8s.pod.uid", "k8s.pod.ip", "process.pid", "other", "container.idx"])
_values = st.one_of(st.text(max_size=80), st.integers(min_value=-(2**63), max_value=2**63 - 1))
_records = st.lists(st.tuples(st.dictionaries(_keys, _values, max_size=5), st.text(max_size=40)), max_size=8)


@hsettings(max_examples=150, deadline=None)
@given(_records, st.text(max_size=300))
def test_find_attributes_matches_the_parsed_record(records, body_text):
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    for attributes, body in records:
        lr = sl.log_records.add()
        # a body that holds a serialized record with a container.id: never taken for an attribute
        lr.body.bytes_value = body.encode() + logs_request([({}, [{"container.id": body_text}])]).SerializeToString()
        lr.attributes.extend(kv(k, v) for k, v in attributes.items())
    raw = req.SerializeToString()
    wanted = tuple(_wire.key_prefix(k) for k in ("container.id", "k8s.pod.uid", "process.pid"))
    layout = _wire.ResourceLayout(raw, *_wire.resources(raw)[0][1:])
    items = [item for _, scope_items in layout.scopes for item in scope_items]
    assert len(items) == len(records)
    for (attributes, _), (_, ps, end) in zip(records, items):
        found = _wire.find_attributes(raw, ps, end, _wire.LOG_ATTRIBUTES_TAG, wanted)
        expect = {k.encode(): (v.encode() if isinstance(v, str) else None) for k, v in attributes.items() if k in ("container.id", "k8s.pod.uid", "process.pid")}
        assert found == expect


@hsettings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3), max_size=12), st.integers(min_value=1, max_value=3))
def test_regroup_keeps_every_item_once_in_order(groups, scopes):
    req = logs_request([({"host.name": "n"}, [{"i": i} for i in range(len(groups))])])
    # spread the records over several scopes
    sl = req.resource_logs[0].scope_logs[0]
    records = list(sl.log_records)
    del req.resource_logs[0].scope_logs[:]
    for s in range(scopes):
        part = req.resource_logs[0].scope_logs.add()
        part.scope.name = f"s{s}"
        part.log_records.extend(r for i, r in enumerate(records) if i % scopes == s)
    raw = req.SerializeToString()
    layout = _wire.ResourceLayout(raw, *_wire.resources(raw)[0][1:])
    order = [int(attrs(r)["i"]) for part in req.resource_logs[0].scope_logs for r in part.log_records]
    assigned = [groups[i] for i in order]
    extras = [b""] + [_wire.resource_attributes([("g", str(g))]) for g in range(1, 4)]
    payloads = _wire.regroup(raw, layout, assigned, extras)
    out = ExportLogsServiceRequest.FromString(b"".join(_wire.frame_resource(p) for p in payloads))
    seen: dict[int, list[int]] = {}
    for rl in out.resource_logs:
        g = int(attrs(rl.resource).get("g", 0))
        assert attrs(rl.resource)["host.name"] == "n"
        ids = [int(attrs(r)["i"]) for part in rl.scope_logs for r in part.log_records]
        seen.setdefault(g, []).extend(ids)
    assert sorted(i for ids in seen.values() for i in ids) == sorted(order)
    for g, ids in seen.items():
        assert ids == [i for i in order if groups[i] == g]


def test_wire_errors_on_truncated_input():
    raw = logs_request([({"a": "b"}, [{"container.id": CID}])]).SerializeToString()
    for cut in range(1, len(raw)):
        try:
            for _, ps, end in _wire.resources(raw[:cut]):
                layout = _wire.ResourceLayout(raw[:cut], ps, end)
                for _, items in layout.scopes:
                    for _, ips, ie in items:
                        _wire.find_attributes(raw[:cut], ips, ie, _wire.LOG_ATTRIBUTES_TAG, (_wire.key_prefix("container.id"),))
        except _wire.WireError:
            continue


async def test_owner_chains_name_statefulsets_daemonsets_jobs_and_cronjobs_fetching_only_jobs(kube, tmp_path):
    cron_uid = "cccccccc-0000-0000-0000-000000000009"
    job = kube.apply("jobs", fk.job("backup-28930", namespace="shop", cronjob=("backup", cron_uid)))
    owners = {
        "10.1.1.1": (fk.owner_ref("StatefulSet", "db", "dddddddd-0000-0000-0000-000000000001"), {"k8s.statefulset.name": "db"}),
        "10.1.1.2": (fk.owner_ref("DaemonSet", "agent", "dddddddd-0000-0000-0000-000000000002"), {"k8s.daemonset.name": "agent"}),
        "10.1.1.3": (fk.owner_ref("Job", "backup-28930", job["metadata"]["uid"], "batch/v1"), {"k8s.job.name": "backup-28930", "k8s.cronjob.name": "backup", "k8s.cronjob.uid": cron_uid}),
    }
    for i, (ip, (ref, _)) in enumerate(owners.items()):
        kube.apply("pods", fk.pod(f"owned-{i}", namespace="shop", ip=ip, owner=ref))
    metadata = ["k8s.pod.name", "k8s.statefulset.name", "k8s.daemonset.name", "k8s.job.name", "k8s.cronjob.name", "k8s.cronjob.uid", "k8s.deployment.name"]
    async with running_processor(factory, base_config(kube, tmp_path, extract={"metadata": metadata})) as h:
        for ip, (_, want) in owners.items():
            out = await h.roundtrip(Batch.of(Signal.LOGS, logs_request([({"k8s.pod.ip": ip}, [{}])])))
            [(res, _)] = records_by_resource([out])
            assert {k: v for k, v in res.items() if k in metadata and k != "k8s.pod.name"} == want, (ip, res)
        # StatefulSets and DaemonSets are the pod's own controller: only the Job (and the fixture's ReplicaSet) was fetched, once each; nothing listed or watched
        assert h.value("tapio_k8sattributes_owner_lookups_total", result="found") == 2
    for resource in ("jobs", "statefulsets", "daemonsets", "cronjobs"):
        assert kube.count(resource, watch=False) == 0 and kube.count(resource, watch=True) == 0
    assert [r.path for r in kube.requests if "/jobs/" in r.path or "/cronjobs" in r.path] == ["/apis/batch/v1/namespaces/shop/jobs/backup-28930"]


async def test_an_update_of_an_owners_only_pod_keeps_the_owner_without_fetching_it_again(kube, tmp_path):
    cron_uid = "cccccccc-0000-0000-0000-00000000000a"
    job = kube.apply("jobs", fk.job("report-1", namespace="shop", cronjob=("report", cron_uid)))
    ref = fk.owner_ref("Job", "report-1", job["metadata"]["uid"], "batch/v1")
    report = lambda ip, phase="Running": fk.pod("report-1-x", namespace="shop", uid="cccccccc-0000-0000-0000-00000000000b", ip=ip, owner=ref, phase=phase)  # noqa: E731
    kube.apply("pods", report("10.1.2.1"))
    metadata = ["k8s.pod.name", "k8s.job.name", "k8s.cronjob.name", "k8s.deployment.name"]
    async with running_processor(factory, base_config(kube, tmp_path, extract={"metadata": metadata})) as h:
        cache = h.component.cache
        for ip, phase in (("10.1.2.2", "Running"), ("10.1.2.3", "Succeeded")):  # the pod changes, as a Job's pod does until it ends
            kube.apply("pods", report(ip, phase))
            await until(lambda: ip in cache.by_ip)
            [(res, _)] = records_by_resource([await h.roundtrip(Batch.of(Signal.LOGS, logs_request([({"k8s.pod.ip": ip}, [{}])])))])
            assert res.get("k8s.cronjob.name") == "report" and res["k8s.job.name"] == "report-1", res
    job_gets = [r.path for r in kube.requests if r.path.endswith("/jobs/report-1")]
    assert job_gets == ["/apis/batch/v1/namespaces/shop/jobs/report-1"], "the Job was fetched again after its pod changed"
