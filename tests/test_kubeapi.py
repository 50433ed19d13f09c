"""The kubeapi receiver against the stand-in API server; and kubeapi + k8sattributes in one `tapio run`, sharing one watch."""

from __future__ import annotations

import json
import textwrap

import pytest
import trio

from tapio.component import Kind, Ports
from tapio.config import ConfigError, decode_dataclass
from tapio.receivers.kubeapi import factory
from tapio.receivers.kubeapi._records import Translator, parse_time
from tapio.testing import fake_kube as fk
from tapio.testing.process import TapioProcess, free_port, metric_sum
from tapio.testing.sink import RecordingConsumer
from tapio.testing.wait import until

from .k8s_helpers import attrs, settings


@pytest.fixture
def kube():
    with fk.FakeKube(token="tok") as server:
        yield server


def config(kube: fk.FakeKube, tmp_path, **extra) -> dict:
    return {"auth_type": "kubeConfig", "kube_config_path": str(kube.write_kubeconfig(tmp_path / "kubeconfig")), **extra}


class Running:
    def __init__(self, sink: RecordingConsumer, component, st) -> None:
        self.sink = sink
        self.component = component
        self.settings = st

    def records(self, event_name: str | None = None) -> list[tuple[dict, object]]:
        out = []
        for b in self.sink.batches:
            for req in b.requests:
                for rl in req.resource_logs:
                    for sl in rl.scope_logs:
                        out.extend((attrs(r), r) for r in sl.log_records if event_name is None or r.event_name == event_name)
        return out

    async def wait_record(self, pick, timeout: float = 10):
        with trio.fail_after(timeout):
            while True:
                found = [(a, r) for a, r in self.records() if pick(a, r)]
                if found:
                    return found[-1]
                await self.sink.wait_for_batches(len(self.sink.batches) + 1)


async def start(nursery, kube, tmp_path, **extra) -> Running:
    cfg = decode_dataclass(factory.config_class, config(kube, tmp_path, **extra))
    sink = RecordingConsumer(ack=True)
    st = settings(Kind.RECEIVER, "kubeapi")
    component = factory.create(st, cfg, Ports(output=sink))
    await nursery.start(component.run)
    return Running(sink, component, st)


async def test_pod_and_container_lifecycle_records(kube, tmp_path):
    cid = "ab" * 32
    kube.apply("pods", fk.pod("existing"))
    async with trio.open_nursery() as n:
        r = await start(n, kube, tmp_path)
        await until(lambda: kube.open_watches("pods") == 1 and kube.open_watches("events") == 1)
        assert r.records() == [], "the first list only primes the receiver"
        owner = fk.owner_ref("ReplicaSet", "web-abc", "rs-uid")
        kube.apply("pods", fk.pod("web-1", uid="p-1", ip="10.1.0.3", owner=owner, phase="Pending", containers={"app": ""},
                                  container_states={"app": {"waiting": {"reason": "ContainerCreating"}}}))
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.container.status.reason") == "ContainerCreating")
        assert a["k8s.pod.uid"] == "p-1" and a["k8s.container.status.state"] == "waiting" and rec.severity_number == 9
        pod, body = await r.wait_record(lambda a, _: a.get("k8s.object.kind") == "Pod" and a.get("k8s.pod.name") == "web-1" and "k8s.pod.status.phase" in a)
        assert pod["k8s.pod.status.phase"] == "Pending" and pod["k8s.replicaset.name"] == "web-abc" and pod["tapio.kubeapi.change"] == "added"
        assert json.loads(body.body.string_value)["metadata"]["name"] == "web-1"
        # OOM-killed, restarted: terminated.reason, exit code, restart count, last state
        kube.apply("pods", fk.pod("web-1", ip="10.1.0.3", owner=owner, containers={"app": "containerd://" + cid}, restart_counts={"app": 1},
                                  container_states={"app": {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2026-01-02T03:04:05Z"}}}))
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.container.status.reason") == "OOMKilled")
        assert a["tapio.kubeapi.container.exit_code"] == 137 and a["k8s.container.restart_count"] == 1 and a["container.id"] == cid
        assert (a["k8s.object.kind"], a["k8s.object.name"], a["k8s.object.uid"], a["tapio.kubeapi.change"]) == ("Pod", "web-1", "p-1", "modified")
        assert a["k8s.container.status.state"] == "terminated" and a["k8s.container.name"] == "app" and rec.event_name == "k8s.container.status"
        assert rec.severity_number == 13 and rec.time_unix_nano == parse_time("2026-01-02T03:04:05Z")
        kube.apply("pods", fk.pod("web-1", ip="10.1.0.3", owner=owner, containers={"app": "containerd://" + cid}, restart_counts={"app": 3},
                                  container_states={"app": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}))
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.container.status.reason") == "CrashLoopBackOff")
        assert rec.severity_number == 13 and "back-off 40s" in rec.body.string_value
        before = len(r.records("k8s.container.status"))
        kube.apply("pods", fk.pod("web-1", ip="10.1.0.3", owner=owner, containers={"app": "containerd://" + cid}, restart_counts={"app": 3}, phase="Running",
                                  container_states={"app": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}))
        await r.wait_record(lambda a, _: a.get("k8s.pod.status.phase") == "Running")
        assert len(r.records("k8s.container.status")) == before, "an unchanged container state is not reported again"
        kube.delete("pods", "web-1")
        a, _ = await r.wait_record(lambda a, _: a.get("tapio.kubeapi.change") == "deleted")
        assert a["k8s.pod.uid"] == "p-1"
        n.cancel_scope.cancel()


async def test_nodes_report_condition_changes_not_heartbeats_and_events_since_start(kube, tmp_path):
    kube.apply("nodes", fk.node("node-1"))
    kube.apply("events", fk.event("old", reason="Pulled", message="long ago", involved={"kind": "Pod", "name": "x", "uid": "u"}) | {"lastTimestamp": "2020-01-01T00:00:00Z"})
    async with trio.open_nursery() as n:
        r = await start(n, kube, tmp_path)
        await until(lambda: kube.open_watches("nodes") == 1 and kube.open_watches("events") == 1)
        kube.apply("nodes", fk.node("node-1"))  # a heartbeat: same conditions
        kube.apply("nodes", fk.node("node-1", ready="False"))
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.object.kind") == "Node")
        assert a["k8s.node.condition.ready"] == "False" and rec.severity_number == 13
        assert len(r.records("k8s.node.change")) == 1
        kube.apply("events", fk.event("oom", reason="OOMKilling", type="Warning", count=2, message="Memory cgroup out of memory: Killed process 42",
                                      involved={"kind": "Pod", "name": "web-1", "namespace": "default", "uid": "p-1"}))
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.event.reason") == "OOMKilling")
        assert a["k8s.event.count"] == 2 and a["k8s.pod.uid"] == "p-1" and a["k8s.object.kind"] == "Pod" and a["k8s.event.type"] == "Warning"
        assert rec.body.string_value.startswith("Memory cgroup out of memory") and rec.severity_number == 13
        kube.apply("events", fk.event("sandbox", reason="FailedCreatePodSandBox", type="Warning", message='Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for sandbox "0123"',
                                      involved={"kind": "Pod", "name": "web-2", "namespace": "shop", "uid": "p-2"}))
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.event.reason") == "FailedCreatePodSandBox")
        assert (a["k8s.pod.name"], a["k8s.pod.uid"], a["k8s.namespace.name"], a["k8s.event.count"]) == ("web-2", "p-2", "shop", 1)
        assert a["k8s.event.source.component"] == "kubelet" and a["k8s.event.source.host"] == "node-1" and rec.event_name == "k8s.event"
        assert "failed to setup network" in rec.body.string_value and rec.severity_number == 13
        assert not [a for a, _ in r.records("k8s.event") if a["k8s.event.name"] == "old"]
        assert r.settings.telemetry.telemetry.value("tapio_kubeapi_skipped_total", reason="event_before_start") == 1
        # a re-list (410) repeats nothing already emitted
        count = len(r.records())
        kube.expire_watches()
        await until(lambda: r.settings.telemetry.telemetry.value("tapio_kube_relists_total", resource="events") >= 1 and kube.open_watches("events") == 1)
        kube.apply("events", fk.event("new", reason="Started", message="started", involved={"kind": "Node", "name": "node-1"}))
        await r.wait_record(lambda a, _: a.get("k8s.event.name") == "new")
        assert [a["k8s.event.name"] for a, _ in r.records()[count:]] == ["new"]
        n.cancel_scope.cancel()


async def test_node_filter_selects_on_the_server_and_filters_events(kube, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_NODE", "node-1")
    kube.apply("nodes", fk.node("node-1"))
    kube.apply("nodes", fk.node("node-2"))
    async with trio.open_nursery() as n:
        r = await start(n, kube, tmp_path, filter={"node_from_env_var": "MY_NODE"}, initial_state=True,
                        objects=[{"name": "pods"}, {"name": "nodes"}, {"name": "events"}, {"name": "deployments", "namespaces": ["shop"]}])
        await until(lambda: kube.open_watches() == 4)
        watches = {r.path: r.query.get("fieldSelector", "") for r in kube.requests if r.watch}
        assert watches["/api/v1/pods"] == "spec.nodeName=node-1" and watches["/api/v1/nodes"] == "metadata.name=node-1"
        assert watches["/apis/apps/v1/namespaces/shop/deployments"] == ""
        assert [a["k8s.node.name"] for a, _ in r.records("k8s.node.change")] == ["node-1"]  # initial_state
        kube.apply("pods", fk.pod("mine", uid="mine-uid", node="node-1"))
        kube.apply("pods", fk.pod("theirs", uid="theirs-uid", node="node-2"))
        await r.wait_record(lambda a, _: a.get("k8s.pod.name") == "mine")
        for name, uid, host in (("theirs", "theirs-uid", "node-2"), ("mine", "mine-uid", "node-1")):
            kube.apply("events", fk.event(f"ev-{name}", reason="Killing", message=name, host=host, involved={"kind": "Pod", "name": name, "uid": uid}))
        kube.apply("deployments", {"metadata": {"name": "web", "namespace": "shop", "generation": 2}, "spec": {}, "status": {"replicas": 3, "readyReplicas": 1, "conditions": [{"type": "Available", "status": "False"}]}})
        a, rec = await r.wait_record(lambda a, _: a.get("k8s.object.kind") == "Deployment")
        assert a["k8s.deployment.name"] == "web" and a["tapio.kubeapi.status.readyReplicas"] == 1 and rec.severity_number == 13
        await r.wait_record(lambda a, _: a.get("k8s.event.name") == "ev-mine")
        assert not [a for a, _ in r.records("k8s.event") if a["k8s.event.name"] == "ev-theirs"]
        assert not [a for a, _ in r.records("k8s.pod.change") if a["k8s.pod.name"] == "theirs"]
        n.cancel_scope.cancel()


def test_translator_is_pure_and_bounded():
    t = Translator(include_object=False)
    pod = fk.pod("a", uid="u1", containers={"app": "containerd://" + "1" * 64})
    first = t.translate("pods", "ADDED", pod, listed=True, emit=False)
    assert first == [] and "u1" in t._containers
    again = t.translate("pods", "MODIFIED", pod)
    assert [r.event_name for r in again] == ["k8s.pod.change"]  # the container did not change
    assert again[0].body.startswith("pod default/a modified")
    t.translate("pods", "DELETED", pod)
    assert "u1" not in t._containers
    assert parse_time("2024-05-01T10:00:00.5Z") == 1714557600_500_000_000 and parse_time("garbage") == 0


def test_config_problems():
    with pytest.raises(ConfigError) as err:
        decode_dataclass(factory.config_class, {"objects": [{"name": "nodes", "namespaces": ["x"]}, {"name": "pods", "label_selector": "app=web,"}, {"name": "pods", "label_selector": "app=web,"}, {"name": "pods", "namespaces": ["Bad_NS"]}], "filter": {"node_from_env_var": "1BAD"}})
    text = str(err.value)
    for expected in ("objects[0].namespaces: nodes are not namespaced", "objects[1].label_selector", "objects[2]: pods with the same selectors is listed twice", "objects[3].namespaces: 'Bad_NS'", "filter.node_from_env_var"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match=r"objects\[0\].name: expected one of .*got 'secrets'"):
        decode_dataclass(factory.config_class, {"objects": [{"name": "secrets"}]})


def test_tapio_run_with_kubeapi_and_k8sattributes_shares_one_watch(kube, tmp_path):
    """A real `tapio run` through a kubeconfig: kubeapi records of a pod come out under that pod's resource; one pod watch serves both."""
    kube.apply("pods", fk.pod("web-1", uid="p-1", namespace="shop", ip="10.1.0.3"))
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    out = tmp_path / "logs.jsonl"
    metrics = free_port()
    cfg = tmp_path / "tapio.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        receivers:
          kubeapi:
            auth_type: kubeConfig
            kube_config_path: {kubeconfig}
            filter: {{node_from_env_var: K8S_NODE_NAME}}
            objects: [{{name: pods}}]
        processors:
          k8sattributes:
            auth_type: kubeConfig
            kube_config_path: {kubeconfig}
            filter: {{node_from_env_var: K8S_NODE_NAME}}
            wait_for_metadata: true
        exporters:
          file: {{path: {out}, flush_interval: 0s}}
        service:
          telemetry: {{metrics: {{address: "127.0.0.1:{metrics}"}}}}
          pipelines:
            logs: {{receivers: [kubeapi], processors: [k8sattributes], exporters: [file]}}
        """))
    with TapioProcess([cfg], metrics_port=metrics, env={"K8S_NODE_NAME": "node-1"}) as t:
        t.wait_ready()
        t.wait_for(lambda: kube.open_watches("pods") == 1, 10, "the pod watch")
        kube.apply("pods", fk.pod("web-1", namespace="shop", ip="10.1.0.3", phase="Failed"))

        def written() -> list[dict]:
            if not out.exists():
                return []
            return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

        t.wait_for(lambda: any(r for r in written()), 10, "a record in the file")
        assert kube.count("pods", watch=True) == 1 and kube.count("pods", watch=False) == 1
        assert metric_sum(t.metrics(), "tapio_kube_watches_total", resource="pods") == 1
        t.signal()
        assert t.wait_exit() == 0
    rl = written()[0]["resourceLogs"][0]
    resource = {a["key"]: a["value"].get("stringValue") for a in rl["resource"]["attributes"]}
    assert resource["k8s.pod.name"] == "web-1" and resource["k8s.namespace.name"] == "shop" and resource["k8s.pod.uid"] == "p-1"
    record = {a["key"]: a["value"] for a in rl["scopeLogs"][0]["logRecords"][0]["attributes"]}
    assert record["k8s.pod.status.phase"]["stringValue"] == "Failed"
