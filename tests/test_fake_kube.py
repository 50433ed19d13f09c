"""The stand-in API server (tapio.testing.fake_kube) is faithful: the real `kubernetes` client uses it as it would a cluster.

The client is synchronous (urllib3); these tests call it directly, the fake
serving from its own thread.
"""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tapio.testing import fake_kube as fk


@pytest.fixture
def kube():
    with fk.FakeKube(token="s3cret") as server:
        yield server


def api(kube: fk.FakeKube, tmp_path, token: str | None = None) -> client.ApiClient:
    path = kube.write_kubeconfig(tmp_path / "kubeconfig", token=token)
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    return client.ApiClient(cfg)


def test_list_get_and_models(kube, tmp_path):
    cid = "containerd://" + "ab" * 32
    kube.apply("pods", fk.pod("web-1", namespace="shop", ip="10.1.0.7", containers={"app": cid}, labels={"app": "web"}))
    kube.apply("nodes", fk.node("node-1"))
    kube.apply("replicasets", fk.replicaset("web-abc", namespace="shop", deployment=("web", "dep-uid")))
    kube.apply("events", fk.event("e1", namespace="shop", reason="OOMKilling", message="out of memory", involved={"kind": "Pod", "name": "web-1", "namespace": "shop"}))
    core = client.CoreV1Api(api(kube, tmp_path))
    pods = core.list_pod_for_all_namespaces()
    assert [p.metadata.name for p in pods.items] == ["web-1"]
    assert int(pods.metadata.resource_version) == kube.resource_version
    pod = core.read_namespaced_pod("web-1", "shop")
    assert pod.status.container_statuses[0].container_id == cid and pod.status.pod_ip == "10.1.0.7"
    assert core.list_node().items[0].status.conditions[1].type == "Ready"
    assert core.list_namespaced_event("shop").items[0].involved_object.name == "web-1"
    rs = client.AppsV1Api(api(kube, tmp_path)).read_namespaced_replica_set("web-abc", "shop")
    assert rs.metadata.owner_references[0].kind == "Deployment"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("nope", "shop")
    assert missing.value.status == 404


def test_a_wrong_token_is_unauthorized(kube, tmp_path):
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(api(kube, tmp_path, token="wrong")).list_pod_for_all_namespaces()
    assert denied.value.status == 401


def test_selectors_and_paging(kube, tmp_path):
    for i in range(7):
        kube.apply("pods", fk.pod(f"p{i}", node=f"node-{i % 2}", labels={"app": "web" if i < 4 else "db", "tier": str(i % 3)}))
    core = client.CoreV1Api(api(kube, tmp_path))
    names = lambda r: sorted(p.metadata.name for p in r.items)  # noqa: E731
    assert names(core.list_pod_for_all_namespaces(label_selector="app=web")) == ["p0", "p1", "p2", "p3"]
    assert names(core.list_pod_for_all_namespaces(label_selector="app=web,tier!=0")) == ["p1", "p2"]
    assert names(core.list_pod_for_all_namespaces(label_selector="tier in (1,2),app")) == ["p1", "p2", "p4", "p5"]
    assert names(core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1")) == ["p1", "p3", "p5"]
    first = core.list_pod_for_all_namespaces(limit=3)
    assert len(first.items) == 3 and first.metadata._continue
    second = core.list_pod_for_all_namespaces(limit=3, _continue=first.metadata._continue)
    third = core.list_pod_for_all_namespaces(limit=3, _continue=second.metadata._continue)
    assert not third.metadata._continue
    assert names(first) + names(second) + names(third) == [f"p{i}" for i in range(7)]


def test_watch_from_a_resource_version_with_bookmarks_then_410(kube, tmp_path):
    kube.apply("pods", fk.pod("a", node="node-1"))
    core = client.CoreV1Api(api(kube, tmp_path))
    listed = core.list_pod_for_all_namespaces()

    def changes() -> None:
        time.sleep(0.2)
        kube.apply("pods", fk.pod("b", node="node-1"))
        kube.apply("pods", fk.pod("c", node="node-2"))  # outside the field selector
        kube.apply("pods", fk.pod("a", node="node-1", phase="Failed"))
        kube.bookmark()
        kube.delete("pods", "b")
        kube.expire_watches()

    threading.Thread(target=changes, daemon=True).start()
    seen = []
    with pytest.raises(ApiException) as expired:
        for ev in watch.Watch().stream(
            core.list_pod_for_all_namespaces,
            resource_version=listed.metadata.resource_version,
            allow_watch_bookmarks=True,
            field_selector="spec.nodeName=node-1",
            timeout_seconds=10,
        ):
            obj = ev["object"]
            seen.append((ev["type"], obj["metadata"]["resourceVersion"] if ev["type"] == "BOOKMARK" else obj.metadata.name))
    assert expired.value.status == 410
    assert [t for t, _ in seen] == ["ADDED", "MODIFIED", "BOOKMARK", "DELETED"]
    assert seen[0][1] == "b" and seen[1][1] == "a" and seen[3][1] == "b"
    # a watch from before the compaction is refused the same way
    with pytest.raises(ApiException) as again:
        list(watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=listed.metadata.resource_version, timeout_seconds=5))
    assert again.value.status == 410


def test_a_label_change_moves_an_object_out_of_a_selected_watch(kube, tmp_path):
    kube.apply("pods", fk.pod("a", labels={"app": "web"}))
    core = client.CoreV1Api(api(kube, tmp_path))
    rv = core.list_pod_for_all_namespaces(label_selector="app=web").metadata.resource_version

    def relabel() -> None:
        time.sleep(0.2)
        kube.apply("pods", fk.pod("a", labels={"app": "db"}))
        kube.apply("pods", fk.pod("a", labels={"app": "web"}))
        kube.end_watches()

    threading.Thread(target=relabel, daemon=True).start()
    types = [ev["type"] for ev in watch.Watch().stream(core.list_pod_for_all_namespaces, label_selector="app=web", resource_version=rv, timeout_seconds=10)]
    assert types == ["DELETED", "ADDED"]


def test_requests_are_recorded_as_what_they_ask_the_authorizer_for(kube, tmp_path):
    kube.apply("namespaces", fk.namespace("kube-system"))
    kube.apply("replicasets", fk.replicaset("web-abc", namespace="shop"))
    c = api(kube, tmp_path, token="s3cret")
    core, apps = client.CoreV1Api(c), client.AppsV1Api(c)
    core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1")
    core.read_namespace("kube-system")
    apps.read_namespaced_replica_set("web-abc", "shop")
    for _ in watch.Watch().stream(core.list_namespaced_event, "shop", timeout_seconds=1):
        pass
    with pytest.raises(ApiException) as refused:  # nothing here writes: recorded, then refused
        core.create_namespaced_config_map("shop", {"metadata": {"name": "x"}, "data": {}})
    assert refused.value.status == 405
    with pytest.raises(ApiException):
        core.delete_collection_namespaced_pod("shop")
    assert kube.accesses() == {
        fk.Access("list", "", "pods"),
        fk.Access("get", "", "namespaces", namespace="kube-system", name="kube-system"),
        fk.Access("get", "apps", "replicasets", namespace="shop", name="web-abc"),
        fk.Access("watch", "", "events", namespace="shop"),
        fk.Access("create", "", "configmaps", namespace="shop"),
        fk.Access("deletecollection", "", "pods", namespace="shop"),
    }
    assert fk.access_of("GET", "/api/v1/namespaces/shop/pods/web-1/log", {}) == fk.Access("get", "", "pods", "log", "shop", "web-1")
    assert fk.access_of("GET", "/version", {}) == fk.Access("get", path="/version") and not fk.access_of("GET", "/apis", {}).is_resource
