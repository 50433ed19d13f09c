"""ebpf receiver → k8sattributes: kernel events of a process in a cgroup named like a containerd pod resolve to that pod.

The receiver names the container on the resource, so the processor finds
the pod there (no regrouping by record).

Needs root, bcc and kernel headers, and cgroup2 at /sys/fs/cgroup/unified
(CI=true fails without them, elsewhere the test skips and says why). The
pod exists only in the stand-in API server; the cgroup is real, named as the
kubelet's systemd driver names a containerd container's cgroup.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import trio

from tapio.component import ComponentID, Kind, Ports, Settings
from tapio.pdata import Batch, Signal
from tapio.telemetry import Telemetry
from tapio.testing import fake_kube as fk
from tapio.processors.k8sattributes import factory as k8sattributes

from .k8s_helpers import attrs, running_processor
from .test_ebpf_kernel import CGROUP2, _missing, make_settings, require


class _IntoProcessor:
    """The ebpf receiver's output: the processor's input channel (the receiver cannot wait: it hands on without waiting)."""

    signals = frozenset({Signal.LOGS})

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self._send = send

    async def send(self, batch: Batch) -> None:
        await self._send.send(batch)

    def send_nowait(self, batch: Batch) -> None:
        self._send.send_nowait(batch)


async def test_ebpf_events_in_a_containerd_pod_cgroup_resolve_to_the_pod(tmp_path):
    require(_missing())
    if not (CGROUP2 / "cgroup.procs").exists():
        require("cgroup2 mounted at /sys/fs/cgroup/unified")
    from tapio.receivers.ebpf import factory as ebpf
    from tapio.receivers.ebpf._config import Config, EventsConfig, FiltersConfig

    cid = uuid.uuid4().hex + uuid.uuid4().hex
    pod_uid = str(uuid.uuid4())
    top = CGROUP2 / f"tapio-test-{uuid.uuid4().hex[:8]}"
    leaf = top / f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope"
    leaf.mkdir(parents=True)
    marker = tmp_path / "in-the-pod"
    marker.write_text("x")
    try:
        with fk.FakeKube() as kube:
            kube.apply("pods", fk.pod("checkout-7d9f-x2x", namespace="shop", uid=pod_uid, ip="10.1.0.9", containers={"api": "containerd://" + cid}))
            config = {
                "auth_type": "kubeConfig",
                "kube_config_path": str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
                "wait_for_metadata": True,
                "extract": {"metadata": ["k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.node.name", "k8s.container.name"]},
            }
            ebpf_config = Config(events=EventsConfig(network=False, oom=False, signal=False), filters=FiltersConfig(path_prefixes=[str(tmp_path) + "/"]), flush_interval=0.01)
            async with running_processor(k8sattributes, config, capacity=256) as h:
                receiver = ebpf.create(make_settings(Telemetry()), ebpf_config, Ports(output=_IntoProcessor(h._send)))
                async with trio.open_nursery() as n:
                    await n.start(receiver.run)
                    script = f"echo $$ > {leaf}/cgroup.procs; exec /bin/cat {marker}"
                    await trio.run_process(["/bin/sh", "-c", script], capture_stdout=True)

                    def in_pod() -> list[tuple[dict, dict]]:
                        out = []
                        for b in h.sink.batches:
                            for req in b.requests:
                                for rl in req.resource_logs:
                                    for sl in rl.scope_logs:
                                        out += [(attrs(rl.resource), attrs(r)) for r in sl.log_records if attrs(r).get("container.id") == cid]
                        return out

                    with trio.fail_after(20):
                        await h.sink.wait_until(lambda: {"exec", "open", "exit"} <= {a["tapio.ebpf.event"] for _, a in in_pod()})
                    n.cancel_scope.cancel()
                host_misses = h.value("tapio_k8sattributes_unassociated_items_total", reason="host_process")
                regrouped = h.value("tapio_k8sattributes_regrouped_items_total")
    finally:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        top.rmdir()
    for resource, record in in_pod():
        assert resource["k8s.pod.name"] == "checkout-7d9f-x2x" and resource["k8s.namespace.name"] == "shop"
        assert resource["k8s.pod.uid"] == pod_uid and resource["k8s.container.name"] == "api"
        assert resource["host.name"]  # the receiver's own resource attributes stay
        assert record["k8s.pod.uid"] == pod_uid
    opens = [r for _, r in in_pod() if r["tapio.ebpf.event"] == "open"]
    assert [r["file.path"] for r in opens] == [str(marker)]
    assert host_misses >= 1, "the shell's own exec, before it entered the cgroup, is a host process"
    assert regrouped == 0, "the receiver puts each container's events under a resource of their own: nothing to regroup"
