"""The cri receiver against a real containerd 1.7 over its CRI socket (tapio.testing.containerd).

Pods and busybox containers are made through the CRI API as the kubelet
makes them; one is OOM-killed by the kernel under a 32 MiB limit. Runtime
restarts kill the real containerd process; receiver restarts keep their
checkpoints in a real storage file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grpc
import pytest
import trio

from tapio.component import ComponentID, Kind, Ports, Settings, StorageRef
from tapio.decode import decode_dataclass
from tapio.receivers.cri import factory
from tapio.receivers.cri._proto import api_pb2 as pb
from tapio.storage import Storage
from tapio.telemetry import Telemetry
from tapio.testing.containerd import Containerd
from tapio.testing.sink import RecordingConsumer

DEADLINE = 60
OOM_SCRIPT = "sleep 0.5; x=a; while true; do x=$x$x; done"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    with Containerd(tmp_path_factory.mktemp("cri")) as c:
        yield c


@pytest.fixture
def cri(containerd):
    with containerd.client() as client:
        yield client


def make(endpoint: str, storage: Storage | None = None, sink: RecordingConsumer | None = None, **overrides):
    config = {"endpoint": endpoint, "reconnect": {"initial_interval": "100ms", "max_interval": "500ms"}, **overrides}
    extensions = {}
    if storage is not None:
        config["storage"] = "storage"
        extensions[ComponentID("storage")] = storage
    telemetry = Telemetry()
    settings = Settings(
        id=ComponentID("cri"), kind=Kind.RECEIVER, telemetry=telemetry.for_component("receiver", "cri"),
        logger=logging.getLogger("test.cri"), extensions=extensions, shutdown_grace=2.0,
    )
    sink = sink or RecordingConsumer(ack=True)
    receiver = factory.create(settings, decode_dataclass(factory.config_class, config), Ports(output=sink))
    return receiver, sink, telemetry


def attrs(rec) -> dict:
    out = {}
    for kv in rec.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


def records(sink, **want) -> list:
    """Every record whose attributes include ``want`` (``event`` matches the event name)."""
    event = want.pop("event", None)
    found = []
    for req in sink.requests():
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    a = attrs(rec)
                    if (event is None or rec.event_name == event) and all(a.get(k) == v for k, v in want.items()):
                        found.append(rec)
    return found


def stages_of(sink, key: str, value: str) -> list[str]:
    return [r.event_name for r in records(sink, **{key: value})]


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_lifecycle_exit_codes_and_the_oom_kill(containerd, cri):
    receiver, sink, telemetry = make(containerd.endpoint)
    async with trio.open_nursery() as n:
        await n.start(receiver.run)
        with trio.fail_after(DEADLINE):
            await receiver.listed.wait()
            pod = await in_thread(cri.run_pod, "web", "shop")
            exit3 = await in_thread(cri.run_container, pod, "exit3", "sleep 0.3; exit 3")
            oomer = await in_thread(cri.run_container, pod, "oomer", OOM_SCRIPT, memory_limit=32 << 20)
            done = await in_thread(cri.run_container, pod, "done", "true")
            await sink.wait_until(lambda: all(
                records(sink, event="tapio.cri.container.stopped", **{"container.id": c}) for c in (exit3, oomer, done)
            ))
            await in_thread(cri.stop_pod, pod)
            await in_thread(cri.remove_pod, pod)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.pod_sandbox.deleted", **{"k8s.pod.uid": pod.uid}))
        n.cancel_scope.cancel()

    (oom,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": oomer})
    a = attrs(oom)
    assert a["k8s.container.status.reason"] == "OOMKilled" and a["tapio.cri.container.exit_code"] == 137
    assert oom.severity_text == "WARN" and "OOMKilled" in oom.body.string_value
    assert oom.time_unix_nano == a["tapio.cri.container.finished_time_unix_nano"] > a["tapio.cri.container.started_time_unix_nano"]
    assert a["container.name"] == a["k8s.container.name"] == "oomer"
    assert a["container.image.name"] == "localhost/busybox" and a["container.image.tags"] == ["1"]
    assert a["container.image.id"].startswith("sha256:")
    assert (a["k8s.pod.uid"], a["k8s.pod.name"], a["k8s.namespace.name"]) == (pod.uid, "web", "shop")
    assert a["container.runtime.name"] == "containerd" and a["container.runtime.version"].startswith("1.7")
    assert a["tapio.cri.source"] == "event" and a["tapio.cri.pod_sandbox.id"] == pod.id
    assert a["k8s.container.status.state"] == "terminated"

    (failed,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": exit3})
    assert (attrs(failed)["tapio.cri.container.exit_code"], attrs(failed)["k8s.container.status.reason"]) == (3, "Error")
    (completed,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": done})
    assert (attrs(completed)["tapio.cri.container.exit_code"], attrs(completed)["k8s.container.status.reason"]) == (0, "Completed")
    assert completed.severity_text == "INFO"

    # every stage once, in order, for each container and the sandbox
    stages = ["created", "started", "stopped", "deleted"]
    for cid in (exit3, oomer, done):
        assert stages_of(sink, "container.id", cid) == [f"tapio.cri.container.{s}" for s in stages]
    sandbox = [r.event_name for r in records(sink, **{"tapio.cri.pod_sandbox.id": pod.id}) if r.event_name.startswith("tapio.cri.pod_sandbox")]
    assert sandbox == [f"tapio.cri.pod_sandbox.{s}" for s in stages]
    (started,) = records(sink, event="tapio.cri.pod_sandbox.started", **{"k8s.pod.uid": pod.uid})
    assert attrs(started)["k8s.pod.ip"].startswith(containerd.subnet.rsplit(".", 2)[0])
    assert telemetry.value("tapio_cri_events_total", type="container_stopped") >= 4


def _pid_of(cri, cid: str) -> int:
    info = cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True), timeout=30).info
    return json.loads(info["info"])["pid"]


async def test_a_runtime_restart_is_followed_and_what_happened_meanwhile_is_listed(containerd, cri):
    receiver, sink, telemetry = make(containerd.endpoint)
    async with trio.open_nursery() as n:
        await n.start(receiver.run)
        with trio.fail_after(DEADLINE):
            await receiver.listed.wait()
            pod = await in_thread(cri.run_pod, "batch")
            # it exits while containerd is down: only the list after reconnecting can tell
            waiter = await in_thread(cri.create_container, pod, "waiter", "sleep 300")
            await in_thread(cri.start_container, waiter)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.container.started", **{"container.id": waiter}))
            pid = await in_thread(_pid_of, cri, waiter)
            containerd.kill()
            os.kill(pid, 9)
            while Path(f"/proc/{pid}").exists():
                await trio.sleep(0.05)
            await in_thread(containerd.start)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.container.stopped", **{"container.id": waiter}))
            # and the stream is followed again after the reconnect
            after = await in_thread(cri.run_container, pod, "after", "exit 0")
            await sink.wait_until(lambda: records(sink, event="tapio.cri.container.stopped", **{"container.id": after}))
        n.cancel_scope.cancel()
    (stopped,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": waiter})
    a = attrs(stopped)
    # containerd was down when the process died: on recovery it records the exit as unknown (255), as the kubelet then sees it
    assert a["tapio.cri.source"] == "list"
    assert (a["tapio.cri.container.exit_code"], a["k8s.container.status.reason"]) == (255, "Unknown")
    assert a["k8s.pod.uid"] == pod.uid
    assert attrs(records(sink, event="tapio.cri.container.stopped", **{"container.id": after})[0])["tapio.cri.source"] == "event"
    assert telemetry.value("tapio_cri_connection_failures_total") >= 1
    assert stages_of(sink, "container.id", waiter).count("tapio.cri.container.stopped") == 1
    await in_thread(cri.stop_pod, pod)
    await in_thread(cri.remove_pod, pod)


async def test_a_receiver_restart_with_storage_reports_only_what_changed_while_it_was_down(containerd, cri, tmp_path):
    storage = Storage.open(tmp_path / "tapio.db")
    try:
        pod = await in_thread(cri.run_pod, "keep")
        steady = await in_thread(cri.run_container, pod, "steady", "sleep 300")
        doomed = await in_thread(cri.run_pod, "doomed")
        receiver, sink, _ = make(containerd.endpoint, storage)
        async with trio.open_nursery() as n:
            await n.start(receiver.run)
            with trio.fail_after(DEADLINE):
                await receiver.listed.wait()
                await sink.wait_until(lambda: records(sink, **{"container.id": steady}))
            n.cancel_scope.cancel()
        assert records(sink, event="tapio.cri.container.started", **{"container.id": steady, "tapio.cri.source": "list"})
        assert records(sink, event="tapio.cri.pod_sandbox.started", **{"k8s.pod.uid": doomed.uid})

        # while tapio is down: one container exits, one is created, a pod goes away
        quits = await in_thread(cri.run_container, pod, "quits", "exit 5")
        await in_thread(cri.wait_exited, quits)
        await in_thread(cri.stop_pod, doomed)
        await in_thread(cri.remove_pod, doomed)

        receiver, sink, _ = make(containerd.endpoint, storage)
        async with trio.open_nursery() as n:
            await n.start(receiver.run)
            with trio.fail_after(DEADLINE):
                await receiver.listed.wait()
            n.cancel_scope.cancel()
        ours = {pod.uid, doomed.uid}
        got = sorted((r.event_name, attrs(r).get("container.id") or attrs(r)["tapio.cri.pod_sandbox.id"])
                     for r in records(sink) if attrs(r).get("k8s.pod.uid") in ours or attrs(r).get("tapio.cri.pod_sandbox.id") == doomed.id)
        # quits was created, started and stopped meanwhile: the list shows it stopped, its status dates the rest
        assert got == sorted([(f"tapio.cri.container.{s}", quits) for s in ("created", "started", "stopped")] + [("tapio.cri.pod_sandbox.deleted", doomed.id)])
        (stopped,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": quits})
        assert attrs(stopped)["tapio.cri.container.exit_code"] == 5 and attrs(stopped)["tapio.cri.source"] == "list"
        status = await in_thread(cri.status, quits)
        for stage, when in (("created", status.created_at), ("started", status.started_at)):
            (rec,) = records(sink, event=f"tapio.cri.container.{stage}", **{"container.id": quits})
            assert attrs(rec)["tapio.cri.inferred"] is True and rec.time_unix_nano == when > 0
        assert not records(sink, **{"container.id": steady})
        saved = storage.checkpoints("cri").items()
        assert saved["c/" + quits] == b"stopped" and "s/" + doomed.id not in saved
        await in_thread(cri.stop_pod, pod)
        await in_thread(cri.remove_pod, pod)
    finally:
        storage.close()


async def test_existing_containers_are_reported_once_at_start_unless_report_existing_is_off(containerd, cri):
    pod = await in_thread(cri.run_pod, "existing")
    cid = await in_thread(cri.run_container, pod, "sleeper", "sleep 300")
    for report_existing in (True, False):
        receiver, sink, _ = make(containerd.endpoint, report_existing=report_existing)
        async with trio.open_nursery() as n:
            await n.start(receiver.run)
            with trio.fail_after(DEADLINE):
                await receiver.listed.wait()
                await in_thread(cri.stop_container, cid) if not report_existing else None
                if not report_existing:
                    await sink.wait_until(lambda: records(sink, **{"container.id": cid}))
            n.cancel_scope.cancel()
        if report_existing:
            assert stages_of(sink, "container.id", cid) == ["tapio.cri.container.started"]
            assert records(sink, event="tapio.cri.pod_sandbox.started", **{"k8s.pod.uid": pod.uid})
        else:  # only the change after start
            assert stages_of(sink, "container.id", cid) == ["tapio.cri.container.stopped"]
    await in_thread(cri.stop_pod, pod)
    await in_thread(cri.remove_pod, pod)


async def _a_polled_pod_through_its_life(receiver, sink, cri, name: str, script: str):
    """A pod with one container (running ``script``) through its life under the running receiver; its (pod, container id).

    The removal waits until the stop was reported: a stop no list saw before
    the removal is not reported (nothing dates it then).
    """
    async with trio.open_nursery() as n:
        await n.start(receiver.run)
        with trio.fail_after(DEADLINE):
            await receiver.listed.wait()
            pod = await in_thread(cri.run_pod, name, "legacy")
            cid = await in_thread(cri.run_container, pod, "quick", script)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.container.stopped", **{"container.id": cid}))
            await in_thread(cri.stop_pod, pod)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.pod_sandbox.stopped", **{"tapio.cri.pod_sandbox.id": pod.id}))
            await in_thread(cri.remove_pod, pod)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.pod_sandbox.deleted", **{"tapio.cri.pod_sandbox.id": pod.id}))
        n.cancel_scope.cancel()
    return pod, cid


async def test_without_the_event_stream_the_runtime_is_listed_every_poll_interval(containerd, cri):
    receiver, sink, telemetry = make(containerd.endpoint, event_stream=False, poll_interval="200ms")
    _, cid = await _a_polled_pod_through_its_life(receiver, sink, cri, "polled", "exit 7")
    (stopped,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": cid})
    assert attrs(stopped)["tapio.cri.container.exit_code"] == 7 and attrs(stopped)["tapio.cri.source"] == "list"
    assert telemetry.value("tapio_cri_events_total") == 0
    assert stages_of(sink, "container.id", cid)[-1] == "tapio.cri.container.deleted"


async def test_containerd_1_6_has_no_event_stream_and_is_listed_every_poll_interval(tmp_path):
    """Debian 12's own containerd (1.6.20) answers GetContainerEvents UNIMPLEMENTED: the receiver falls back to listing."""
    from tapio.testing.containerd import CONTAINERD_16_HOME

    with Containerd(tmp_path / "containerd", home=CONTAINERD_16_HOME) as runtime, runtime.client() as cri:
        receiver, sink, telemetry = make(runtime.endpoint, poll_interval="200ms")
        pod, cid = await _a_polled_pod_through_its_life(receiver, sink, cri, "old", "exit 3")
    assert telemetry.value("tapio_cri_connection_failures_total", reason="UNIMPLEMENTED") == 1
    assert telemetry.value("tapio_cri_events_total") == 0 and telemetry.value("tapio_cri_lists_total") >= 3
    (stopped,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": cid})
    a = attrs(stopped)
    assert (a["tapio.cri.container.exit_code"], a["k8s.container.status.reason"], a["tapio.cri.source"]) == (3, "Error", "list")
    assert a["container.runtime.version"].startswith("1.6") and a["k8s.pod.uid"] == pod.uid
    # every stage once, in order; what passed between two lists is inferred from the runtime's times
    stages = ["created", "started", "stopped", "deleted"]
    assert stages_of(sink, "container.id", cid) == [f"tapio.cri.container.{s}" for s in stages]
    sandbox = [r.event_name for r in records(sink, **{"tapio.cri.pod_sandbox.id": pod.id}) if r.event_name.startswith("tapio.cri.pod_sandbox")]
    assert sandbox == [f"tapio.cri.pod_sandbox.{s}" for s in stages]
    (created,) = records(sink, event="tapio.cri.pod_sandbox.created", **{"tapio.cri.pod_sandbox.id": pod.id})
    assert attrs(created)["tapio.cri.inferred"] is True and created.time_unix_nano > 0


async def test_an_unreachable_runtime_does_not_stop_the_receiver(tmp_path):
    receiver, sink, telemetry = make(f"unix://{tmp_path}/nothing.sock")
    async with trio.open_nursery() as n:
        await n.start(receiver.run)
        with trio.fail_after(DEADLINE):
            while telemetry.value("tapio_cri_connection_failures_total", reason="UNAVAILABLE") < 2:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert sink.item_count == 0


async def test_the_oom_kill_names_the_same_container_in_the_ebpf_receiver(containerd, cri):
    """The kernel's OOM event (ebpf receiver) and the runtime's OOMKilled (cri receiver) carry the same container.id."""
    import importlib.util

    from tapio.receivers.ebpf import factory as ebpf_factory
    from tapio.testing import prereq

    if importlib.util.find_spec("bcc") is None or not Path(f"/lib/modules/{os.uname().release}/build/include").is_dir():
        prereq.missing("bcc and kernel headers", "run scripts/setup.sh")
    receiver, sink, _ = make(containerd.endpoint)
    kernel_sink = RecordingConsumer(ack=True)
    ebpf_config = decode_dataclass(ebpf_factory.config_class, {
        "events": {"process": False, "file": False, "network": False, "signal": False, "oom": True}, "flush_interval": "10ms",
    })
    ebpf_settings = Settings(id=ComponentID("ebpf"), kind=Kind.RECEIVER, telemetry=Telemetry().for_component("receiver", "ebpf"),
                             logger=logging.getLogger("test.ebpf"))
    ebpf = ebpf_factory.create(ebpf_settings, ebpf_config, Ports(output=kernel_sink))
    async with trio.open_nursery() as n:
        await n.start(ebpf.run)
        await n.start(receiver.run)
        with trio.fail_after(DEADLINE):
            await receiver.listed.wait()
            pod = await in_thread(cri.run_pod, "hungry")
            oomer = await in_thread(cri.run_container, pod, "oomer", OOM_SCRIPT, memory_limit=32 << 20)
            await sink.wait_until(lambda: records(sink, event="tapio.cri.container.stopped", **{"container.id": oomer}))
            await kernel_sink.wait_until(lambda: records(kernel_sink, **{"tapio.ebpf.event": "oom", "container.id": oomer}))
        n.cancel_scope.cancel()
    (kernel,) = records(kernel_sink, **{"tapio.ebpf.event": "oom", "container.id": oomer})
    (runtime,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": oomer})
    assert attrs(kernel)["k8s.pod.uid"] == attrs(runtime)["k8s.pod.uid"] == pod.uid
    assert attrs(runtime)["k8s.container.status.reason"] == "OOMKilled"
    # the kernel marks the victim before the runtime sees its exit
    assert kernel.time_unix_nano <= runtime.time_unix_nano
    await in_thread(cri.stop_pod, pod)
    await in_thread(cri.remove_pod, pod)


async def test_events_taken_by_another_subscriber_are_found_by_the_resync_list(containerd, cri):
    """containerd 1.7 gives each event to one subscriber: a second client of the stream takes some from the receiver."""
    import threading

    receiver, sink, telemetry = make(containerd.endpoint, resync_interval="300ms")
    other = cri.runtime.GetContainerEvents(pb.GetEventsRequest())
    taken = []
    def read() -> None:
        try:
            for e in other:
                taken.append(e.container_id)
        except grpc.RpcError:
            pass  # cancelled below

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        async with trio.open_nursery() as n:
            await n.start(receiver.run)
            with trio.fail_after(DEADLINE):
                await receiver.listed.wait()
                pod = await in_thread(cri.run_pod, "shared")
                cids = [await in_thread(cri.run_container, pod, f"c{i}", f"exit {i}") for i in range(6)]
                await sink.wait_until(lambda: all(records(sink, event="tapio.cri.container.stopped", **{"container.id": c}) for c in cids))
            n.cancel_scope.cancel()
    finally:
        other.cancel()
        reader.join(timeout=5)
    assert taken, "the other subscriber got no events: containerd would broadcast, and this test shows nothing"
    if set(taken) & set(cids):  # it took events of ours: what they said came from a list, or was proven by a later event
        found = telemetry.value("tapio_cri_records_total", kind="container", source="list")
        assert found + telemetry.value("tapio_cri_inferred_records_total", kind="container") >= 1
    for i, c in enumerate(cids):
        (stopped,) = records(sink, event="tapio.cri.container.stopped", **{"container.id": c})
        assert attrs(stopped)["tapio.cri.container.exit_code"] == i
    await in_thread(cri.stop_pod, pod)
    await in_thread(cri.remove_pod, pod)


async def test_refused_batches_are_offered_again_and_nothing_is_lost(containerd, cri):
    from tapio.component import Refused

    class Refusing(RecordingConsumer):
        refusals = 2

        async def send(self, batch):
            if self.refusals:
                self.refusals -= 1
                batch.done(False)  # as the runtime does for a refused batch
                raise Refused("over the memory limit")
            await super().send(batch)

    receiver, sink, telemetry = make(containerd.endpoint, sink=Refusing(ack=True))
    async with trio.open_nursery() as n:
        await n.start(receiver.run)
        with trio.fail_after(DEADLINE):
            pod = await in_thread(cri.run_pod, "refused")
            cid = await in_thread(cri.run_container, pod, "app", "exit 2")
            await sink.wait_until(lambda: records(sink, event="tapio.cri.container.stopped", **{"container.id": cid}))
        n.cancel_scope.cancel()
    assert telemetry.value("tapio_cri_refused_total") == 2
    assert stages_of(sink, "container.id", cid) == [f"tapio.cri.container.{s}" for s in ("created", "started", "stopped")]
    await in_thread(cri.stop_pod, pod)
    await in_thread(cri.remove_pod, pod)


async def _lists(telemetry, n: int) -> None:
    while telemetry.value("tapio_cri_lists_total") < n:
        await trio.sleep(0.02)


async def test_a_stage_whose_event_a_gone_subscriber_took_is_reported_inferred(tmp_path):
    """containerd 1.7 loses the next event after a subscriber goes away, and the receiver reports the stage it proves anyway.

    When a stream is cancelled, containerd's handler for it keeps waiting on
    the shared event queue, takes the next event and fails to send it: each
    tapio restart costs the node one event. Here tapio restarts twice (with
    storage, as a DaemonSet rollout does); the first time a container's
    started event is lost, the second time a pod sandbox's created event.
    Its own containerd, so no earlier test's stream is waiting there.
    """
    storage = Storage.open(tmp_path / "tapio.db")
    try:
        with Containerd(tmp_path / "containerd") as runtime, runtime.client() as cri:
            # tapio #1 follows the stream until it saw the container created, then goes away
            first, sink, _ = make(runtime.endpoint, storage, resync_interval="0s")
            async with trio.open_nursery() as n:
                await n.start(first.run)
                with trio.fail_after(DEADLINE):
                    await first.listed.wait()
                    pod = await in_thread(cri.run_pod, "upgraded")
                    cid = await in_thread(cri.create_container, pod, "app", "exit 4")
                    await sink.wait_until(lambda: records(sink, event="tapio.cri.container.created", **{"container.id": cid}))
                n.cancel_scope.cancel()

            # tapio #2: once its lists are done only events tell; the container's started event goes to #1's stream
            second, sink2, telemetry2 = make(runtime.endpoint, storage, resync_interval="0s")
            async with trio.open_nursery() as n:
                await n.start(second.run)
                with trio.fail_after(DEADLINE):
                    await _lists(telemetry2, 2)  # at connect and to settle; no resync
                    await in_thread(cri.start_container, cid)
                    await sink2.wait_until(lambda: records(sink2, event="tapio.cri.container.stopped", **{"container.id": cid}))
                n.cancel_scope.cancel()
            assert telemetry2.value("tapio_cri_events_total", type="container_started") == 0, (
                "the started event reached the receiver: this containerd does not lose it, and this test shows nothing"
            )
            status = await in_thread(cri.status, cid)
            (started,) = records(sink2, event="tapio.cri.container.started", **{"container.id": cid})
            a = attrs(started)
            assert a["tapio.cri.inferred"] is True and a["tapio.cri.source"] == "event"
            assert started.time_unix_nano == status.started_at > 0 and a["k8s.pod.uid"] == pod.uid
            assert stages_of(sink2, "container.id", cid) == ["tapio.cri.container.started", "tapio.cri.container.stopped"]
            (stopped,) = records(sink2, event="tapio.cri.container.stopped", **{"container.id": cid})
            assert attrs(stopped)["tapio.cri.container.exit_code"] == 4 and "tapio.cri.inferred" not in attrs(stopped)
            assert telemetry2.value("tapio_cri_inferred_records_total", kind="container", stage="started") == 1

            # tapio #3: a new pod's created event goes to #2's stream
            third, sink3, telemetry3 = make(runtime.endpoint, storage, resync_interval="0s")
            async with trio.open_nursery() as n:
                await n.start(third.run)
                with trio.fail_after(DEADLINE):
                    await _lists(telemetry3, 2)
                    later = await in_thread(cri.run_pod, "later")
                    created_at = (await in_thread(cri.runtime.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id=later.id), timeout=30)).status.created_at
                    await in_thread(cri.stop_pod, later)
                    await in_thread(cri.remove_pod, later)
                    await sink3.wait_until(lambda: records(sink3, event="tapio.cri.pod_sandbox.deleted", **{"tapio.cri.pod_sandbox.id": later.id}))
                n.cancel_scope.cancel()
            assert telemetry3.value("tapio_cri_events_total", type="container_created") == 0
            got = [(r.event_name, attrs(r).get("tapio.cri.inferred", False)) for r in records(sink3, **{"tapio.cri.pod_sandbox.id": later.id})]
            assert got == [("tapio.cri.pod_sandbox.created", True)] + [(f"tapio.cri.pod_sandbox.{s}", False) for s in ("started", "stopped", "deleted")]
            (created,) = records(sink3, event="tapio.cri.pod_sandbox.created", **{"tapio.cri.pod_sandbox.id": later.id})
            assert created.time_unix_nano == created_at and attrs(created)["k8s.pod.name"] == "later"
            await in_thread(cri.stop_pod, pod)
            await in_thread(cri.remove_pod, pod)
    finally:
        storage.close()
