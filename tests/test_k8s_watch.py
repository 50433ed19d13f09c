"""tapio.k8s against the stand-in API server: credentials, list+watch, 410 and re-list, bookmarks, sharing one watch."""

from __future__ import annotations

import datetime
import logging
import os
import subprocess

import pytest
import yaml
import trio

from tapio import k8s
from tapio.k8s import _api
from tapio.telemetry import Telemetry
from tapio.testing import fake_kube as fk
from tapio.testing import prereq
from tapio.testing.process import free_port
from tapio.testing.wait import until

LOG = logging.getLogger("test.k8s")


@pytest.fixture
def kube():
    with fk.FakeKube(token="tok-1") as server:
        yield server


async def connect(kube: fk.FakeKube, tmp_path) -> k8s.Connection:
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    return await k8s.connect(k8s.APIConfig(auth_type="kubeConfig", kube_config_path=str(path)))


class State:
    """What a user of a watch knows, built only from its deliveries."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.log: list[tuple[str, str, bool]] = []
        self.synced = False
        self.changed = trio.Event()

    def apply(self, delivery: k8s.Delivery) -> None:
        for blob in delivery.snapshot:
            obj = k8s.decode_blob(blob)
            self.objects[obj["metadata"]["name"]] = obj
        for c in delivery.changes:
            name = c.obj["metadata"]["name"]
            self.log.append((c.type, name, c.listed))
            if c.type == "DELETED":
                self.objects.pop(name, None)
            else:
                self.objects[name] = c.obj
        self.synced = self.synced or delivery.synced
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    async def wait(self, condition, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not condition():
                await self.changed.wait()


async def follow(connection, spec, state: State, telemetry: Telemetry, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with k8s.REGISTRY.subscribe(connection, spec, telemetry=telemetry, logger=LOG) as sub:
        task_status.started(sub)
        async for delivery in sub:
            state.apply(delivery)


def names(kube: fk.FakeKube) -> set[str]:
    return {p["metadata"]["name"] for p in kube._list("pods", "", "", "")}


async def test_list_watch_outage_410_and_relist_report_the_gap(kube, tmp_path):
    for i in range(1200):  # more than two list pages
        kube.apply("pods", fk.pod(f"p{i}"))
    connection = await connect(kube, tmp_path)
    tel = Telemetry()
    state = State()
    async with trio.open_nursery() as n:
        await n.start(follow, connection, k8s.WatchSpec("pods"), state, tel)
        await state.wait(lambda: state.synced and len(state.objects) == 1200)
        assert kube.count("pods", watch=False) == 3  # pages of 500
        assert {listed for _, _, listed in state.log} == {True}
        await until(lambda: kube.open_watches("pods") == 1)
        await trio.to_thread.run_sync(kube.apply, "pods", fk.pod("live"))
        await state.wait(lambda: "live" in state.objects)
        assert state.log[-1] == ("ADDED", "live", False)
        # the API goes away, the watch is told its resourceVersion expired; changes happen meanwhile
        kube.outage = True
        kube.expire_watches()
        kube.delete("pods", "p7")
        kube.apply("pods", fk.pod("p8", phase="Failed"))
        kube.apply("pods", fk.pod("gap"))
        await until(lambda: tel.value("tapio_kube_errors_total", resource="pods", reason="http_503") >= 1)
        kube.outage = False
        await state.wait(lambda: "gap" in state.objects and "p7" not in state.objects)
        gap = [entry for entry in state.log if entry[2] and entry[1] in ("p7", "p8", "gap")][-3:]
        assert sorted(gap) == [("ADDED", "gap", True), ("DELETED", "p7", True), ("MODIFIED", "p8", True)]
        assert state.objects["p8"]["status"]["phase"] == "Failed"
        assert set(state.objects) == names(kube)
        assert tel.value("tapio_kube_relists_total", resource="pods", reason="expired") == 1
        assert tel.value("tapio_kube_objects", resource="pods") == len(names(kube))
        n.cancel_scope.cancel()


async def test_a_bookmark_moves_the_resume_point(kube, tmp_path):
    kube.apply("pods", fk.pod("a"))
    connection = await connect(kube, tmp_path)
    state = State()
    async with trio.open_nursery() as n:
        await n.start(follow, connection, k8s.WatchSpec("pods"), state, Telemetry())
        await state.wait(lambda: state.synced)
        await until(lambda: kube.open_watches("pods") == 1)
        kube.apply("nodes", fk.node("n1"))  # moves the server's resourceVersion, no pod changes
        rv = kube.bookmark()
        watch = next(iter(k8s.REGISTRY._entries.values()))
        await until(lambda: watch.resource_version == str(rv))
        kube.end_watches()  # the server times the watch out: it is re-opened from the bookmark
        await until(lambda: kube.count("pods", watch=True) >= 2)
        rewatch = [r for r in kube.requests if r.watch][-1]
        assert rewatch.query["resourceVersion"] == str(rv)
        assert rewatch.query["allowWatchBookmarks"] == "true"
        assert kube.count("pods", watch=False) == 1  # no re-list
        n.cancel_scope.cancel()


async def test_a_malformed_event_relists(kube, tmp_path):
    kube.apply("pods", fk.pod("a"))
    connection = await connect(kube, tmp_path)
    tel = Telemetry()
    state = State()
    async with trio.open_nursery() as n:
        await n.start(follow, connection, k8s.WatchSpec("pods"), state, tel)
        await state.wait(lambda: state.synced)
        await until(lambda: kube.open_watches("pods") == 1)
        kube.inject_line('{"type": "ADDED", "object": ')
        await until(lambda: tel.value("tapio_kube_relists_total", reason="broken_stream") >= 1)
        assert tel.value("tapio_bad_input_total", reason="kube_watch_event_malformed") == 1
        await trio.to_thread.run_sync(kube.apply, "pods", fk.pod("b"))
        await state.wait(lambda: "b" in state.objects)
        n.cancel_scope.cancel()


async def test_two_users_share_one_watch_and_the_second_drives_when_the_first_leaves(kube, tmp_path):
    kube.apply("pods", fk.pod("a"))
    connection = await connect(kube, tmp_path)
    again = await connect(kube, tmp_path)  # loaded separately, the same server and credentials
    spec = k8s.WatchSpec("pods", field_selector="spec.nodeName=node-1")
    first, second = State(), State()
    tel = Telemetry()
    async with trio.open_nursery() as n:
        first_scope = trio.CancelScope()

        async def first_user(task_status=trio.TASK_STATUS_IGNORED):
            with first_scope:
                await follow(connection, spec, first, tel, task_status=task_status)

        await n.start(first_user)
        await first.wait(lambda: first.synced)
        await n.start(follow, again, spec, second, tel)
        assert k8s.REGISTRY.users(connection, spec) == 2 and len(k8s.REGISTRY) == 1
        await second.wait(lambda: second.synced and set(second.objects) == {"a"})  # a snapshot of the store
        await trio.to_thread.run_sync(kube.apply, "pods", fk.pod("b"))
        await first.wait(lambda: "b" in first.objects)
        await second.wait(lambda: "b" in second.objects)
        assert kube.count("pods", watch=True) == 1 and kube.count("pods", watch=False) == 1
        # the driving user leaves; the other takes over from the same resourceVersion, without a re-list
        first_scope.cancel()
        await trio.to_thread.run_sync(kube.apply, "pods", fk.pod("c"))
        await second.wait(lambda: "c" in second.objects)
        assert k8s.REGISTRY.users(connection, spec) == 1
        assert kube.count("pods", watch=False) == 1 and kube.count("pods", watch=True) == 2
        n.cancel_scope.cancel()
    assert len(k8s.REGISTRY) == 0


async def test_different_selectors_are_different_watches(kube, tmp_path):
    connection = await connect(kube, tmp_path)
    a, b = State(), State()
    async with trio.open_nursery() as n:
        await n.start(follow, connection, k8s.WatchSpec("pods", field_selector="spec.nodeName=node-1"), a, Telemetry())
        await n.start(follow, connection, k8s.WatchSpec("pods", field_selector="spec.nodeName=node-2"), b, Telemetry())
        assert len(k8s.REGISTRY) == 2
        await trio.to_thread.run_sync(kube.apply, "pods", fk.pod("on-2", node="node-2"))
        await b.wait(lambda: "on-2" in b.objects)
        assert "on-2" not in a.objects
        n.cancel_scope.cancel()


async def test_a_missing_kubeconfig_or_cluster_is_named(tmp_path, monkeypatch):
    with pytest.raises(k8s.KubeConfigError, match="nope"):
        await k8s.connect(k8s.APIConfig(auth_type="kubeConfig", kube_config_path=str(tmp_path / "nope")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(k8s.KubeConfigError, match="needs to run in a pod"):
        await k8s.connect(k8s.APIConfig())
    assert "kube_config_path: only used with auth_type kubeConfig" in k8s.APIConfig(kube_config_path="x").api_problems()[0]


async def test_a_kubeconfig_context_other_than_the_current_one_is_used_when_named(kube, tmp_path):
    """Two contexts in one file: the current one points at no server, ``context: prod`` at the API server."""
    doc = yaml.safe_load(kube.write_kubeconfig(tmp_path / "kubeconfig", context="prod").read_text())
    doc["clusters"].append({"name": "dead", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}})
    doc["users"].append({"name": "dead", "user": {"token": "wrong"}})
    doc["contexts"].append({"name": "dead", "context": {"cluster": "dead", "user": "dead"}})
    doc["current-context"] = "dead"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    await trio.to_thread.run_sync(kube.apply, "pods", fk.pod("p1", node="node-1"))
    connection = await k8s.connect(k8s.APIConfig(auth_type="kubeConfig", kube_config_path=str(path), context="prod"))
    assert connection.host == kube.url.rstrip("/")
    async with connection.client() as client:
        pod = await k8s.get_object(connection, client, "pods", "p1", "default")
    assert pod is not None and pod["metadata"]["name"] == "p1"
    current = await k8s.connect(k8s.APIConfig(auth_type="kubeConfig", kube_config_path=str(path)))
    assert current.host != connection.host and current.identity != connection.identity
    with pytest.raises(k8s.KubeConfigError, match="context 'staging'"):
        await k8s.connect(k8s.APIConfig(auth_type="kubeConfig", kube_config_path=str(path), context="staging"))


@pytest.fixture
def tls_files(tmp_path):
    prereq.command("openssl", "it makes the test certificates: apt-get install openssl (scripts/setup.sh does)")
    run = lambda *a: subprocess.run(["openssl", *a], cwd=tmp_path, check=True, capture_output=True, timeout=60)  # noqa: E731
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=tapio test CA")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return tmp_path


async def test_service_account_over_https_with_a_rotated_token(tls_files, monkeypatch):
    """In a pod: the API address from the environment, the token and CA from the service account mount."""
    sa = tls_files / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("token-one")
    (sa / "ca.crt").write_bytes((tls_files / "ca.crt").read_bytes())
    with fk.FakeKube(token="token-one", tls=(str(tls_files / "server.crt"), str(tls_files / "server.key"))) as kube:
        kube.apply("pods", fk.pod("a"))
        port = kube.url.rsplit(":", 1)[1]
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
        monkeypatch.setattr(_api, "SERVICE_ACCOUNT_DIR", str(sa))
        connection = await k8s.connect(k8s.APIConfig(auth_type="serviceAccount"))
        assert connection.host == f"https://127.0.0.1:{port}"
        async with connection.client() as client:
            assert (await k8s.get_object(connection, client, "pods", "a", "default"))["metadata"]["name"] == "a"
            # the kubelet rotates the token file; the loader re-reads it (at most once a minute)
            (sa / "token").write_text("token-two")
            kube.token = "token-two"
            # age the loader's copy of the token instead of waiting the minute out
            for cell in connection._configuration.refresh_api_key_hook.__closure__ or ():
                loader = cell.cell_contents
                if hasattr(loader, "token_expires_at"):
                    loader.token_expires_at = datetime.datetime.now() - datetime.timedelta(seconds=1)
            assert (await k8s.get_object(connection, client, "pods", "a", "default")) is not None
        with pytest.raises(k8s.KubeApiError) as refused:
            plain = k8s.Connection(host=connection.host, verify=True, identity=("x",))  # system CAs: the test CA is unknown
            async with plain.client() as client:
                await k8s.get_object(plain, client, "pods", "a", "default")
        assert refused.value.status == 0 and "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert os.environ["KUBERNETES_SERVICE_PORT"] == port
