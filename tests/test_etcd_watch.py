"""The etcd-watch receiver against real etcd 3.4 members on loopback (started per test, killed after).

Writes go through etcd's own API (`tapio.testing.etcd.EtcdAdmin`), the
receiver runs in this process and hands its batches to a recording
consumer, which reports them delivered (or not) as an exporter would.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Refused, Settings
from tapio.config import decode_dataclass
from tapio.pdata import Batch, Signal
from tapio.receivers.etcd_watch import factory
from tapio.receivers.etcd_watch._component import CHECKPOINT_KEY
from tapio.storage import Storage
from tapio.telemetry import Telemetry
from tapio.testing.etcd import EtcdAdmin, EtcdMember, ServerTLS, etcd_cluster, etcd_member, k8s_object
from tapio.testing.otlpsink import Reply, open_otlp_sink
from tapio.testing.process import TapioProcess, free_port
from tapio.testing.sink import RecordingConsumer

from .test_otlp_exporter_tls import Certs, _openssl, certs  # noqa: F401 - the certs fixture

#: generous: each wait ends as soon as its condition holds
DEADLINE = 20


@dataclass
class Record:
    attrs: dict[str, Any]
    body: Any
    event_name: str

    @property
    def op(self) -> str:
        return self.attrs["tapio.etcd.operation"]

    @property
    def key(self) -> str:
        return self.attrs.get("tapio.etcd.key", "")

    @property
    def revision(self) -> int:
        return self.attrs["tapio.etcd.revision"]


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def records(sink: RecordingConsumer) -> list[Record]:
    out = []
    for req in sink.requests():
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    out.append(Record({a.key: _value(a.value) for a in lr.attributes}, _value(lr.body), lr.event_name))
    return out


def changes(sink: RecordingConsumer) -> list[Record]:
    return [r for r in records(sink) if r.op in ("PUT", "DELETE") and not r.attrs.get("tapio.etcd.resync")]


class Running:
    def __init__(self, receiver, sink: RecordingConsumer, telemetry: Telemetry) -> None:
        self.receiver, self.sink, self.telemetry = receiver, sink, telemetry

    def metric(self, name: str, **labels: str) -> float:
        return self.telemetry.value(name, **labels)

    async def wait(self, condition, what: str = "the records") -> None:
        with trio.fail_after(DEADLINE):
            await self.sink.wait_until(condition)

    async def wait_changes(self, n: int) -> list[Record]:
        await self.wait(lambda: len(changes(self.sink)) >= n)
        return changes(self.sink)

    async def wait_until(self, condition) -> None:
        """For conditions no recorded batch signals (metrics, checkpoints): checked every 10 ms."""
        with trio.fail_after(DEADLINE):
            while not condition():
                await trio.sleep(0.01)

    def watch(self, prefix: str = "/registry/"):
        return self.receiver.watches[prefix]


@asynccontextmanager
async def running(config: dict[str, Any], *, storage: Storage | None = None, sink: RecordingConsumer | None = None) -> AsyncIterator[Running]:
    cfg = decode_dataclass(factory.config_class, {"reconnect": {"initial_interval": "20ms", "max_interval": "200ms"}, **config})
    assert cfg.validate() == []
    telemetry = Telemetry()
    settings = Settings(
        id=ComponentID("etcd-watch"),
        kind=Kind.RECEIVER,
        telemetry=telemetry.for_component("receiver", "etcd-watch"),
        logger=logging.getLogger("tapio.receiver.etcd-watch"),
        extensions={ComponentID("storage"): storage} if storage is not None else {},
        shutdown_grace=2.0,
    )
    sink = sink if sink is not None else RecordingConsumer(ack=True)
    receiver = factory.create(settings, cfg, Ports(output=sink))
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        yield Running(receiver, sink, telemetry)
        nursery.cancel_scope.cancel()


@pytest.fixture
def etcd(tmp_path):
    with etcd_member(tmp_path) as member:
        yield member


@pytest.fixture
def admin(etcd):
    a = EtcdAdmin(etcd.url)
    yield a
    a.close()


@pytest.fixture
def storage(tmp_path):
    s = Storage.open(tmp_path / "tapio.db", synchronous="normal")
    yield s
    s.close()


def saved_revision(storage: Storage, prefix: str = "/registry/") -> int | None:
    raw = storage.checkpoints("etcd-watch").get(CHECKPOINT_KEY.format(prefix=prefix))
    return None if raw is None else json.loads(raw)["revision"]


POD_A = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "shop", "uid": "uid-a"}, "spec": {"nodeName": "n1"}})


# ---------------------------------------------------------------- events


async def test_puts_and_deletes_arrive_with_their_revisions_and_previous_values(etcd, admin):
    async with running({"endpoints": [etcd.url]}) as r:
        await r.wait_until(lambda: r.watch().next_revision is not None)
        r1 = admin.put("/registry/pods/shop/a", POD_A)
        admin.put("/elsewhere/x", "not watched")
        updated = POD_A.replace('"n1"', '"n2"')
        r2 = admin.put("/registry/pods/shop/a", updated)
        r3 = admin.delete("/registry/pods/shop/a")
        got = await r.wait_changes(3)
    assert [(c.op, c.revision) for c in got] == [("PUT", r1), ("PUT", r2), ("DELETE", r3)]
    first, second, deleted = got
    assert first.attrs["tapio.etcd.value"] == POD_A.encode() and "tapio.etcd.prev_value" not in first.attrs
    assert first.attrs["tapio.etcd.create_revision"] == r1 and first.attrs["tapio.etcd.version"] == 1
    assert first.body == json.loads(POD_A)
    assert second.attrs["tapio.etcd.prev_value"] == POD_A.encode() and second.attrs["tapio.etcd.prev_revision"] == r1
    assert second.body["spec"]["nodeName"] == "n2"
    # a delete carries the deleted object, from its previous value
    assert deleted.body["spec"]["nodeName"] == "n2" and deleted.attrs["tapio.etcd.prev_revision"] == r2
    assert deleted.attrs["tapio.etcd.prev_value"] == updated.encode() and "tapio.etcd.value" not in deleted.attrs
    for c in got:
        assert (c.attrs["k8s.resource"], c.attrs["k8s.namespace.name"], c.attrs["k8s.object.name"]) == ("pods", "shop", "a")
        assert (c.attrs["k8s.object.kind"], c.attrs["k8s.object.uid"]) == ("Pod", "uid-a")
        assert c.attrs["tapio.etcd.key"] == "/registry/pods/shop/a" and c.attrs["tapio.etcd.value.encoding"] == "json"
    assert deleted.event_name == "tapio.etcd.delete" and first.event_name == "tapio.etcd.put"
    assert r.metric("tapio_etcd_watch_events_total", operation="PUT") == 2
    assert r.metric("tapio_etcd_watch_events_total", operation="DELETE") == 1


async def test_a_kubernetes_protobuf_value_decodes(etcd, admin):
    value = k8s_object("apps/v1", "Deployment", name="web", namespace="shop", uid="dep-uid", labels={"app": "web", "tier": "front"})
    async with running({"endpoints": [etcd.url], "start_revision": 1}) as r:
        rev = admin.put("/registry/deployments/shop/web", value)
        [got] = await r.wait_changes(1)
    assert got.revision == rev and got.attrs["tapio.etcd.value.encoding"] == "kubernetes-protobuf"
    assert got.body["kind"] == "Deployment" and got.body["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert (got.attrs["k8s.object.api_version"], got.attrs["k8s.object.kind"], got.attrs["k8s.object.uid"]) == ("apps/v1", "Deployment", "dep-uid")
    assert got.attrs["tapio.etcd.value"] == value  # the raw value is kept
    assert r.metric("tapio_etcd_watch_values_total", encoding="kubernetes-protobuf") == 1


async def test_a_value_that_is_not_what_it_claims_is_counted_and_kept_raw(etcd, admin, caplog):
    async with running({"endpoints": [etcd.url], "start_revision": 1}) as r:
        admin.put("/registry/configmaps/shop/broken", b"k8s\x00\x0a\xff")
        admin.put("/registry/example.com/widgets/shop/cut", '{"apiVersion": "example.com/v1", "kind":')
        admin.put("/registry/configmaps/shop/fine", "{}")
        got = await r.wait_changes(3)
    broken, cut, fine = got
    assert broken.attrs["tapio.etcd.value"] == b"k8s\x00\x0a\xff" and broken.body == b"k8s\x00\x0a\xff"
    assert cut.attrs["tapio.etcd.value"].startswith(b'{"apiVersion"') and cut.body.startswith('{"apiVersion"')
    assert cut.attrs["k8s.resource"] == "widgets.example.com" and fine.body == {}
    assert r.metric("tapio_bad_input_total", reason="value_invalid_protobuf") == 1
    assert r.metric("tapio_bad_input_total", reason="value_invalid_json") == 1
    # the first of each reason is a warning naming the key
    assert "/registry/configmaps/shop/broken" in caplog.text and "/registry/example.com/widgets/shop/cut" in caplog.text


async def test_starts_now_without_a_checkpoint_or_from_start_revision(etcd, admin):
    before = admin.put("/registry/leases/ns/l", "1")
    async with running({"endpoints": [etcd.url]}) as r:
        await r.wait_until(lambda: r.watch().next_revision is not None)
        after = admin.put("/registry/leases/ns/l", "2")
        assert [c.revision for c in await r.wait_changes(1)] == [after]
    async with running({"endpoints": [etcd.url], "start_revision": before}) as r:
        assert [c.revision for c in await r.wait_changes(2)] == [before, after]


async def test_several_prefixes_are_watched_each_with_its_checkpoint(etcd, admin, storage):
    async with running({"endpoints": [etcd.url], "prefixes": ["/registry/pods/", "/registry/minions/"], "storage": "storage"}, storage=storage) as r:
        await r.wait_until(lambda: all(w.next_revision is not None for w in r.receiver.watches.values()))
        p = admin.put("/registry/pods/ns/p", "{}")
        n = admin.put("/registry/minions/node-1", "{}")
        admin.put("/registry/secrets/ns/s", "{}")
        got = await r.wait_changes(2)
        await r.wait_until(lambda: saved_revision(storage, "/registry/minions/") == n)
    assert sorted((c.attrs["k8s.resource"], c.revision) for c in got) == [("nodes", n), ("pods", p)]
    assert saved_revision(storage, "/registry/pods/") >= p


# ---------------------------------------------------------------- disconnects


async def test_etcd_restarted_mid_watch_loses_and_repeats_nothing(etcd, admin):
    async with running({"endpoints": [etcd.url]}) as r:
        await r.wait_until(lambda: r.watch().next_revision is not None)
        revs = [admin.put(f"/registry/pods/ns/p{i}", "{}") for i in range(5)]
        await r.wait_changes(5)
        etcd.kill()
        await r.wait_until(lambda: r.metric("tapio_etcd_watch_reconnects_total", reason="unavailable") >= 1)
        etcd.start()
        revs += [admin.put(f"/registry/pods/ns/q{i}", "{}") for i in range(5)]
        got = await r.wait_changes(10)
    assert [c.revision for c in got] == revs


async def test_failover_between_two_endpoints_of_a_cluster(tmp_path):
    with etcd_cluster(tmp_path, 3) as (m0, m1, m2), EtcdAdmin(m0.url) as a0, EtcdAdmin(m2.url) as a2:
        async with running({"endpoints": [m0.url, m1.url]}) as r:
            await r.wait_until(lambda: r.watch().next_revision is not None)
            revs = [a0.put(f"/registry/pods/ns/p{i}", "{}") for i in range(3)]
            await r.wait_changes(3)
            m0.kill()
            # once the two left have a leader (m0 may have been it), written through the member tapio does not watch
            await trio.to_thread.run_sync(m2.wait_healthy)
            revs += [a2.put(f"/registry/pods/ns/q{i}", "{}") for i in range(3)]
            got = await r.wait_changes(6)
            assert r.receiver.watches["/registry/"].client.endpoint == m1.url
            assert r.metric("tapio_etcd_watch_failovers_total") >= 1
    assert [c.revision for c in got] == revs


async def test_no_etcd_at_start_is_waited_for(tmp_path):
    member = EtcdMember(tmp_path / "late")
    try:
        async with running({"endpoints": [member.url]}) as r:
            await r.wait_until(lambda: r.metric("tapio_etcd_watch_reconnects_total", reason="unavailable") >= 2)
            member.start()
            await r.wait_until(lambda: r.watch().next_revision is not None)
            with EtcdAdmin(member.url) as admin:
                rev = admin.put("/registry/pods/ns/p", "{}")
            assert [c.revision for c in await r.wait_changes(1)] == [rev]
    finally:
        member.kill()


# ---------------------------------------------------------------- checkpoints and compaction


async def test_checkpoint_resumes_where_delivery_ended(etcd, admin, storage):
    cfg = {"endpoints": [etcd.url], "storage": "storage"}
    async with running(cfg, storage=storage) as r:
        await r.wait_until(lambda: r.watch().next_revision is not None)
        first = [admin.put(f"/registry/pods/ns/p{i}", "{}") for i in range(3)]
        await r.wait_changes(3)
        await r.wait_until(lambda: saved_revision(storage) == first[-1])
    missed = [admin.put(f"/registry/pods/ns/q{i}", "{}") for i in range(3)]  # while tapio is down
    async with running(cfg, storage=storage) as r:
        got = await r.wait_changes(3)
        assert [c.revision for c in got] == missed


async def test_not_delivered_batches_stop_the_checkpoint_and_replay_after_restart(etcd, admin, storage):
    cfg = {"endpoints": [etcd.url], "storage": "storage"}
    sink = RecordingConsumer()  # reports nothing by itself: the test plays the exporter
    async with running(cfg, storage=storage, sink=sink) as r:
        await r.wait_until(lambda: saved_revision(storage) is not None)  # the start revision, written once passed
        start = saved_revision(storage)
        ok = admin.put("/registry/pods/ns/ok", "{}")
        await r.wait_changes(1)
        sink.batches[-1].done(True)
        await r.wait_until(lambda: saved_revision(storage) == ok)
        failed = admin.put("/registry/pods/ns/failed", "{}")
        await r.wait_changes(2)
        sink.batches[-1].done(False)  # the exporter gave up on it
        later = [admin.put(f"/registry/pods/ns/later{i}", "{}") for i in range(3)]
        await r.wait_changes(5)
        for b in sink.batches[2:]:
            b.done(True)
        await r.wait_until(lambda: r.metric("tapio_etcd_watch_undelivered_batches_total") == 1)
        assert r.watch().progress.delivered == ok and saved_revision(storage) == ok
    assert start < ok
    assert saved_revision(storage) == ok  # not even the shutdown moved it
    async with running(cfg, storage=storage) as r:
        got = await r.wait_changes(4)
        assert [c.revision for c in got] == [failed, *later]


async def test_batches_delivered_out_of_order_checkpoint_only_the_delivered_run(etcd, admin, storage):
    sink = RecordingConsumer()
    async with running({"endpoints": [etcd.url], "storage": "storage"}, storage=storage, sink=sink) as r:
        await r.wait_until(lambda: saved_revision(storage) is not None)  # the start revision, written once passed
        revs = []
        for i in range(3):
            revs.append(admin.put(f"/registry/pods/ns/p{i}", "{}"))
            await r.wait_changes(i + 1)
        base = saved_revision(storage)
        sink.batches[2].done(True)
        sink.batches[1].done(True)
        await trio.sleep(0.1)  # give a wrong checkpoint write the chance to happen
        assert saved_revision(storage) == base < revs[0]
        sink.batches[0].done(True)
        await r.wait_until(lambda: saved_revision(storage) == revs[2])


async def test_a_refused_batch_is_offered_again(etcd, admin):
    class Refusing(RecordingConsumer):
        def __init__(self) -> None:
            super().__init__(ack=True)
            self.refusals = 2

        async def send(self, batch: Batch) -> None:
            if self.refusals:
                self.refusals -= 1
                batch.done(False)  # as the memory limiter does before raising
                raise Refused("over the limit")
            await super().send(batch)

    async with running({"endpoints": [etcd.url], "start_revision": 1}, sink=Refusing()) as r:
        rev = admin.put("/registry/pods/ns/p", "{}")
        assert [c.revision for c in await r.wait_changes(1)] == [rev]
        assert r.metric("tapio_etcd_watch_refused_total") == 2
        await r.wait_until(lambda: r.watch().progress.delivered == rev)
        assert r.watch().progress.stuck_at is None


async def test_compaction_past_the_checkpoint_resyncs_and_watching_goes_on(etcd, admin, storage):
    cfg = {"endpoints": [etcd.url], "storage": "storage", "relist_page_size": 2}
    async with running(cfg, storage=storage) as r:
        await r.wait_until(lambda: r.watch().next_revision is not None)
        first = [admin.put(f"/registry/pods/ns/p{i}", "v1") for i in range(3)]
        await r.wait_changes(3)
        await r.wait_until(lambda: saved_revision(storage) == first[-1])
    checkpoint = saved_revision(storage)
    # while tapio is down: p0 changes, p1 goes, p3 and p4 come; then everything before now is compacted
    p0 = admin.put("/registry/pods/ns/p0", "v2")
    admin.delete("/registry/pods/ns/p1")
    p3 = admin.put("/registry/pods/ns/p3", "v1")
    now = admin.put("/registry/pods/ns/p4", "v1")
    admin.compact(now)
    async with running(cfg, storage=storage) as r:
        await r.wait(lambda: sum(1 for x in records(r.sink) if x.attrs.get("tapio.etcd.resync")) >= 4)
        after = admin.put("/registry/pods/ns/p5", "v1")
        await r.wait(lambda: any(x.op == "PUT" and x.revision == after for x in records(r.sink)))
        await r.wait_until(lambda: saved_revision(storage) == after)
        got = records(r.sink)
        assert r.metric("tapio_etcd_watch_resyncs_total", reason="compacted") == 1
        assert r.metric("tapio_etcd_watch_relisted_keys_total") == 4
    marker, *listed, live = got
    assert marker.op == "RESYNC" and marker.event_name == "tapio.etcd.resync"
    assert marker.attrs["tapio.etcd.resync.reason"] == "compacted"
    assert marker.attrs["tapio.etcd.resync.from_revision"] == checkpoint + 1
    assert marker.attrs["tapio.etcd.compact_revision"] == now and marker.revision == now
    # the prefix as it is now, each key once, with its current value
    assert sorted((x.key, x.body, x.revision) for x in listed) == [
        ("/registry/pods/ns/p0", "v2", p0), ("/registry/pods/ns/p2", "v1", first[2]),
        ("/registry/pods/ns/p3", "v1", p3), ("/registry/pods/ns/p4", "v1", now),
    ]
    assert all(x.attrs["tapio.etcd.resync"] is True for x in listed)
    assert live.revision == after and "tapio.etcd.resync" not in live.attrs


async def test_compaction_with_relisting_off_reports_only_the_marker(etcd, admin):
    admin.put("/registry/pods/ns/p0", "v1")
    now = admin.put("/registry/pods/ns/p1", "v1")
    admin.compact(now)
    async with running({"endpoints": [etcd.url], "start_revision": 1, "relist_on_compaction": False}) as r:
        await r.wait(lambda: len(records(r.sink)) >= 1)
        after = admin.put("/registry/pods/ns/p2", "v1")
        await r.wait_changes(1)
        marker, live = records(r.sink)
    assert marker.op == "RESYNC" and marker.attrs["tapio.etcd.resync.relist"] is False and marker.revision == now
    assert live.revision == after


async def test_a_checkpoint_of_another_cluster_resyncs(etcd, admin, storage):
    storage.checkpoints("etcd-watch").put(CHECKPOINT_KEY.format(prefix="/registry/"), b'{"revision": 1, "cluster_id": "1234"}')
    admin.put("/registry/pods/ns/p", "{}")
    async with running({"endpoints": [etcd.url], "storage": "storage"}, storage=storage) as r:
        await r.wait(lambda: len(records(r.sink)) >= 2)
        marker, listed = records(r.sink)
        assert marker.attrs["tapio.etcd.resync.reason"] == "cluster_changed" and listed.key == "/registry/pods/ns/p"
        await r.wait_until(lambda: saved_revision(storage) == marker.revision)
        raw = json.loads(storage.checkpoints("etcd-watch").get(CHECKPOINT_KEY.format(prefix="/registry/")))
        assert raw["cluster_id"] != "1234"


async def test_a_checkpoint_ahead_of_the_cluster_resyncs(etcd, admin, storage):
    admin.put("/registry/pods/ns/p", "{}")
    probe = await _cluster_id(etcd)
    storage.checkpoints("etcd-watch").put(CHECKPOINT_KEY.format(prefix="/registry/"), json.dumps({"revision": 10**6, "cluster_id": probe}).encode())
    async with running({"endpoints": [etcd.url], "storage": "storage"}, storage=storage) as r:
        await r.wait(lambda: len(records(r.sink)) >= 2)
        assert records(r.sink)[0].attrs["tapio.etcd.resync.reason"] == "ahead_of_cluster"
        # the checkpoint goes back to the cluster's present
        await r.wait_until(lambda: saved_revision(storage) == admin.revision())


async def _cluster_id(etcd) -> str:
    with EtcdAdmin(etcd.url) as admin:
        return f"{int(admin.call('/v3/kv/range', {'key': 'AA==', 'count_only': True})['header']['cluster_id']):x}"


# ---------------------------------------------------------------- security


@pytest.fixture(scope="module")
def member_cert(certs: Certs) -> tuple[str, str]:
    """A member certificate from the test CA for both server and client use.

    With --client-cert-auth, etcd 3.4's JSON gateway dials the member's own
    gRPC port presenting the member's certificate, which must then pass as a
    client certificate too (a serverAuth-only one gets the gateway's
    connection reset).
    """
    d = Path(certs.ca_pem).parent
    (d / "member.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *ec, "-keyout", "member.key", "-out", "member.csr", "-subj", "/CN=tapio test etcd member", cwd=d)
    _openssl("x509", "-req", "-in", "member.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "member.pem", "-days", "2", "-extfile", "member.ext", cwd=d)
    return str(d / "member.pem"), str(d / "member.key")


async def test_tls_and_mutual_tls(tmp_path, certs: Certs, member_cert):
    tls = ServerTLS(*member_cert, client_ca_file=certs.ca_pem)
    admin_tls = {"ca_file": certs.ca_pem, "cert": (certs.client_pem, certs.client_key)}
    with etcd_member(tmp_path, tls=tls, admin_tls=admin_tls) as member, EtcdAdmin(member.url, **admin_tls) as admin:
        assert member.url.startswith("https://")
        client_tls = {"ca_file": certs.ca_pem, "cert_file": certs.client_pem, "key_file": certs.client_key}
        async with running({"endpoints": [member.url], "tls": client_tls}) as r:
            await r.wait_until(lambda: r.watch().next_revision is not None)
            rev = admin.put("/registry/pods/ns/p", "{}")
            assert [c.revision for c in await r.wait_changes(1)] == [rev]
        # no client certificate, or a CA that did not sign the server's: the handshake fails, nothing arrives
        for bad in ({"ca_file": certs.ca_pem}, {**client_tls, "ca_file": certs.other_pem}):
            async with running({"endpoints": [member.url], "tls": bad, "start_revision": 1}) as r:
                await r.wait_until(lambda: r.metric("tapio_etcd_watch_reconnects_total", reason="unavailable") >= 2)
                assert records(r.sink) == []


async def test_user_and_password(etcd, admin, caplog):
    caplog.set_level(logging.DEBUG, logger="tapio")
    admin.enable_auth("root-secret", user="tapio", password="s3cr3t-pw", read_prefix="/registry/")
    async with running({"endpoints": [etcd.url], "username": "tapio", "password": "s3cr3t-pw", "start_revision": 1}) as r:
        rev = admin.put("/registry/pods/ns/p", "{}")
        await r.wait(lambda: any(c.revision == rev for c in changes(r.sink)))
    async with running({"endpoints": [etcd.url], "username": "tapio", "password": "wrong-pw", "start_revision": 1}) as r:
        await r.wait_until(lambda: r.metric("tapio_etcd_watch_reconnects_total", reason="auth") >= 2)
        assert records(r.sink) == []
    # without credentials etcd refuses the watch
    async with running({"endpoints": [etcd.url], "start_revision": 1}) as r:
        await r.wait_until(lambda: r.metric("tapio_etcd_watch_reconnects_total", reason="auth") >= 1)
    assert "authentication failed" in caplog.text
    assert "s3cr3t-pw" not in caplog.text and "wrong-pw" not in caplog.text
    cfg = decode_dataclass(factory.config_class, {"username": "tapio", "password": "s3cr3t-pw"})
    assert "s3cr3t-pw" not in repr(cfg)


async def test_an_expired_token_is_renewed(etcd, admin):
    admin.enable_auth("root-secret", user="tapio", password="pw", read_prefix="/registry/")
    async with running({"endpoints": [etcd.url], "username": "tapio", "password": "pw"}) as r:
        await r.wait_until(lambda: r.watch().next_revision is not None)
        client = r.watch().client
        client._tokens[etcd.url] = "expired.1"  # as after the member's token TTL
        etcd.kill()
        etcd.start(admin)
        rev = admin.put("/registry/pods/ns/p", "{}")
        assert [c.revision for c in await r.wait_changes(1)] == [rev]
        assert client._tokens[etcd.url] != "expired.1"


def test_config_problems_are_reported_together():
    cfg = decode_dataclass(factory.config_class, {
        "endpoints": ["etcd:2379", "http://a:2379", "http://a:2379"], "prefixes": ["/registry/", "/registry/pods/"],
        "username": "u", "start_revision": -1, "tls": {"cert_file": "/nonexistent.pem"}, "max_events_per_batch": 0,
    }, validate=False)
    problems = cfg.validate()
    assert any(p.startswith("endpoints[0]:") for p in problems)
    assert any(p.startswith("endpoints: lists the same URL twice") for p in problems)
    assert any(p.startswith("prefixes[1]:") and "overlaps" in p for p in problems)
    assert any(p.startswith("password:") for p in problems)
    assert any(p.startswith("start_revision:") for p in problems)
    assert any(p.startswith("tls.cert_file:") and "does not exist" in p for p in problems)
    assert any(p.startswith("tls.key_file:") for p in problems)
    assert any(p.startswith("max_events_per_batch:") for p in problems)


async def test_unreadable_tls_files_at_start_fail_it_naming_the_file(tmp_path, certs: Certs):
    import shutil

    gone = tmp_path / "ca.pem"
    shutil.copy(certs.ca_pem, gone)
    cfg = decode_dataclass(factory.config_class, {"endpoints": ["https://127.0.0.1:1"], "tls": {"ca_file": str(gone)}})
    assert cfg.validate() == []
    gone.unlink()
    settings = Settings(id=ComponentID("etcd-watch"), kind=Kind.RECEIVER, telemetry=Telemetry().for_component("receiver", "etcd-watch"),
                        logger=logging.getLogger("tapio.receiver.etcd-watch"))
    receiver = factory.create(settings, cfg, Ports(output=RecordingConsumer()))
    with pytest.raises(OSError, match="tls.ca_file"):
        await receiver.run()


def test_signals():
    assert factory.signals == frozenset({Signal.LOGS})


# ---------------------------------------------------------------- crash: tapio run SIGKILLed under a put storm

CRASH_PIPELINE = """
extensions:
  storage:
    path: {db}
    synchronous: normal
receivers:
  etcd-watch:
    endpoints: [{etcd}]
    storage: storage
    start_revision: 1          # the first run replays from the start: no put is written before the watch
    max_events_per_batch: {batch}
exporters:
  otlp:
    endpoint: {sink}
    tls:
      insecure: true
    retry_on_failure:
      initial_interval: 10ms
      max_interval: 100ms
    sending_queue:
      enabled: false           # one batch in flight at a time
service:
  extensions: [storage]
  telemetry:
    metrics:
      address: 127.0.0.1:{metrics_port}
  pipelines:
    logs:
      receivers: [etcd-watch]
      exporters: [otlp]
"""
#: events per batch in the crash test
CRASH_BATCH = 10


def sink_revisions(sink) -> list[list[int]]:
    """The revisions each request the sink accepted carried, in arrival order."""
    out = []
    for req in sink.requests(Signal.LOGS):
        out.append([
            next(a.value.int_value for a in lr.attributes if a.key == "tapio.etcd.revision")
            for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records
        ])
    return out


class PutStorm:
    """Puts keys from a thread, as fast as etcd takes them, until stopped; ``revisions`` are the writes' revisions."""

    def __init__(self, admin: EtcdAdmin) -> None:
        self.admin, self.revisions, self._stop = admin, [], threading.Event()
        self.stopped = trio.Event()

    async def run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._put)
        finally:
            self.stopped.set()

    def _put(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.revisions.append(self.admin.put(f"/registry/configmaps/storm/c{i % 50}", json.dumps({"n": i})))
            i += 1

    def stop(self) -> None:
        self._stop.set()


async def test_sigkill_of_tapio_run_mid_storm_resumes_from_the_checkpoint(etcd, admin, tmp_path):
    async with open_otlp_sink(http_server=False) as sink:
        sink.default = Reply(delay=0.005)  # a batch stays in flight for a while: the kill can land during one
        config = tmp_path / "pipelines.yaml"
        mport = free_port()
        config.write_text(CRASH_PIPELINE.format(db=tmp_path / "tapio.db", etcd=etcd.url, batch=CRASH_BATCH, sink=sink.grpc_endpoint, metrics_port=mport))
        storm = PutStorm(admin)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(storm.run)
            try:
                with TapioProcess([config], metrics_port=mport) as tapio:
                    with trio.fail_after(DEADLINE):
                        await sink.wait_for_items(300)
                    tapio.signal(signal.SIGKILL)
                    tapio.wait_exit(10)
                before_kill = sink_revisions(sink)
                with trio.fail_after(DEADLINE):
                    while len(storm.revisions) < sum(map(len, before_kill)) + 200:  # written while tapio is down
                        await trio.sleep(0.01)
                with TapioProcess([config], metrics_port=mport) as tapio:
                    with trio.fail_after(DEADLINE):
                        # past what was written while it was down, into the live watch
                        await sink.wait_until(lambda: sink.items() >= sum(map(len, before_kill)) + 400)
                    storm.stop()
                    await storm.stopped.wait()
                    wanted = set(storm.revisions)
                    with trio.fail_after(DEADLINE):
                        await sink.wait_until(lambda: wanted <= {r for req in sink_revisions(sink) for r in req})
            finally:
                storm.stop()
    got = [r for req in sink_revisions(sink) for r in req]
    first_run = [r for req in before_kill for r in req]
    second_run = got[len(first_run):]
    repeated = sorted(set(first_run) & set(second_run))
    # nothing lost, each run in order, and the second run starts at the checkpoint: the repeats are the first run's tail
    assert set(got) == set(storm.revisions)
    assert first_run == sorted(first_run) and second_run == sorted(second_run)
    assert repeated == [r for r in first_run if r >= second_run[0]]
    repeated_batches = [req for req in before_kill if set(req) & set(repeated)]
    print(f"etcd-watch SIGKILL: {len(first_run)} records before the kill, {len(repeated)} repeated after it, "
          f"in {len(repeated_batches)} batches")
    # at most the batch in flight at the kill and the one delivered just before, whose checkpoint write the kill may cut off
    assert len(repeated_batches) <= 2
