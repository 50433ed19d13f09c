"""The correlate connector end to end: real sources in a real `tapio run`, incidents read back from its output file.

- ContainerOOM: a container of a real containerd 1.7 (tapio.testing.containerd,
  driven over CRI as the kubelet drives it) is OOM-killed by the kernel under
  a 32 MiB limit. The ebpf receiver sees the kernel pick the victim, the cri
  receiver sees the runtime report OOMKilled, and the kubeapi receiver sees
  the pod's status say so in the stand-in API server (tapio.testing.fake_kube:
  no kube-apiserver can run here; the status is what the kubelet would write
  for this container). One incident trace joins them by the pod's uid.
- NodeServiceFailure: a real systemd manager (tapio.testing.journald) runs a
  ``kubelet.service`` that fails; the journald receiver reads systemd's own
  messages about it from a real journal, and the stand-in API server marks
  the Node named after this host NotReady, then Ready again. One incident
  trace joins them by node name, and the recovery is appended to it.

Needs root, bcc and kernel headers, containerd (scripts/setup.sh), and
systemd; CI=true fails with what is missing, elsewhere the tests skip.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tapio import otlpjson
from tapio.pdata import Signal
from tapio.testing import fake_kube as fk
from tapio.testing.process import TapioProcess, free_port

from .test_e2e import require_ebpf

DEADLINE = 60


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def spans_in(path: Path) -> list:
    """Every span in a file exporter's OTLP/JSON traces file (complete lines only: tapio may be writing)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        req = otlpjson.decode(Signal.TRACES, line)
        out += [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    return out


def incident(path: Path, rule: str):
    """The root span of the incident of ``rule`` and the member spans of its trace, or None."""
    spans = spans_in(path)
    roots = [s for s in spans if s.name == rule and not s.parent_span_id]
    if not roots:
        return None
    (root,) = roots
    return root, [s for s in spans if s.trace_id == root.trace_id and s.parent_span_id == root.span_id]


def write_config(tmp_path: Path, receivers: str, pipeline_receivers: str, processors: str = "") -> Path:
    config = tmp_path / "pipelines.yaml"
    config.write_text(
        f"""
receivers:
{receivers}
processors:
  batch: {{timeout: 100ms}}
{processors}
exporters:
  file/incidents: {{path: {tmp_path / "incidents.jsonl"}, flush_interval: 0}}
  file/logs: {{path: {tmp_path / "logs.jsonl"}, flush_interval: 0}}
connectors:
  correlate: {{}}
service:
  telemetry: {{metrics: {{address: "127.0.0.1:{free_port()}"}}}}
  pipelines:
    logs/in: {{receivers: [{pipeline_receivers}], processors: [{"k8sattributes" if processors else ""}], exporters: [correlate]}}
    traces/incidents: {{receivers: [correlate], processors: [batch], exporters: [file/incidents]}}
    logs/out: {{receivers: [correlate], processors: [batch], exporters: [file/logs]}}
"""
    )
    return config


def metrics_port(config: Path) -> int:
    return int(config.read_text().split('address: "127.0.0.1:')[1].split('"')[0])


def test_a_container_oom_kill_is_one_incident_of_kernel_runtime_and_api(tmp_path):
    require_ebpf()
    from tapio.testing.containerd import Containerd

    with Containerd(tmp_path / "cri") as containerd, containerd.client() as cri, fk.FakeKube() as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        pod = cri.run_pod("hungry-6d5f", namespace="shop")
        config = write_config(
            tmp_path,
            receivers=f"""
  ebpf: {{events: {{file: false, network: false, signal: false}}, flush_interval: 10ms}}
  cri: {{endpoint: "{containerd.endpoint}"}}
  kubeapi: {{auth_type: kubeConfig, kube_config_path: "{kubeconfig}", objects: [{{name: pods}}]}}""",
            pipeline_receivers="ebpf, cri, kubeapi",
            processors=f"  k8sattributes: {{auth_type: kubeConfig, kube_config_path: \"{kubeconfig}\"}}",
        )
        out = tmp_path / "incidents.jsonl"
        with TapioProcess([config], metrics_port=metrics_port(config)) as tapio:
            tapio.wait_ready(DEADLINE)
            cid = cri.run_container(pod, "worker", "sleep 0.5; x=a; while true; do x=$x$x; done", memory_limit=32 << 20)
            kube.apply("pods", fk.pod("hungry-6d5f", namespace="shop", uid=pod.uid, containers={"worker": "containerd://" + cid}))
            status = cri.wait_exited(cid)
            assert status.reason == "OOMKilled"
            # what the kubelet writes into the pod's status for this container
            terminated = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "containerID": "containerd://" + cid,
                                         "startedAt": _now(), "finishedAt": _now()}}
            kube.apply("pods", fk.pod("hungry-6d5f", namespace="shop", uid=pod.uid, phase="Running",
                                      containers={"worker": "containerd://" + cid}, container_states={"worker": terminated}))
            tapio.wait_for(lambda: incident(out, "ContainerOOM") is not None, DEADLINE, "the ContainerOOM incident")
            found = incident(out, "ContainerOOM")
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    assert found is not None
    root, members = found
    a = _attrs(root.attributes)
    assert a["tapio.incident.rule"] == "ContainerOOM" and a["tapio.incident.severity"] == "error"
    assert a["tapio.incident.key"] == f"k8s.pod.uid={pod.uid}"
    assert root.status.code == root.status.STATUS_CODE_ERROR
    by_member: dict[str, list[dict]] = {}
    for s in members:
        m = _attrs(s.attributes)
        by_member.setdefault(m["tapio.incident.member"], []).append(m)
    kernel = by_member["kernel_oom_kill"]
    assert kernel and all(k["container.id"] == cid and k["tapio.ebpf.oom.anon_rss_kb"] > 0 for k in kernel)
    assert all(k["process.pid"] > 1 and f"pid {k['process.pid']}" in a["tapio.incident.summary"] for k in kernel[:1])
    oomkilled = by_member["container_oomkilled"]
    assert {m["tapio.event.name"] for m in oomkilled} == {"tapio.cri.container.stopped", "k8s.container.status"}, oomkilled
    assert all(m["k8s.container.status.reason"] == "OOMKilled" for m in oomkilled)
    assert [m["k8s.pod.name"] for m in oomkilled if m["tapio.event.name"] == "k8s.container.status"] == ["hungry-6d5f"]
    assert "of pod shop/hungry-6d5f was OOM-killed" in a["tapio.incident.summary"]
    # the kernel chose the victim before the runtime saw the container exit (the API's times are in seconds)
    def first(event: str) -> int:
        return min(s.start_time_unix_nano for s in members if _attrs(s.attributes)["tapio.event.name"] == event)

    assert first("tapio.ebpf.oom") <= first("tapio.cri.container.stopped")


@pytest.fixture
def systemd_manager():
    from tests.test_journald_receiver import _require

    from tapio.testing import prereq
    from tapio.testing.journald import Journald, UserManager

    _require()
    prereq.command("systemd-run", "run scripts/setup.sh (apt package systemd)")
    prereq.command("unshare", "apt package util-linux")
    with Journald() as j, UserManager(j) as m:
        yield j, m


def test_a_failed_kubelet_and_the_node_not_ready_are_one_incident_resolved_when_ready(tmp_path, systemd_manager):
    journal, manager = systemd_manager
    host = socket.gethostname()
    with fk.FakeKube() as kube:
        kube.apply("nodes", fk.node(host, ready="True"))
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        config = write_config(
            tmp_path,
            receivers=f"""
  journald: {{namespace: "{journal.name}", units: [kubelet.service]}}
  kubeapi: {{auth_type: kubeConfig, kube_config_path: "{kubeconfig}", objects: [{{name: nodes}}]}}""",
            pipeline_receivers="journald, kubeapi",
        )
        out = tmp_path / "incidents.jsonl"
        with TapioProcess([config], metrics_port=metrics_port(config)) as tapio:
            tapio.wait_ready(DEADLINE)
            manager.run("kubelet.service", "sh", "-c", "echo 'failed to run Kubelet: unable to load bootstrap kubeconfig'; exit 1")
            kube.apply("nodes", fk.node(host, ready="False"))
            tapio.wait_for(lambda: incident(out, "NodeServiceFailure") is not None, DEADLINE, "the NodeServiceFailure incident")
            kube.apply("nodes", fk.node(host, ready="True"))

            def resolved() -> bool:
                found = incident(out, "NodeServiceFailure")
                return found is not None and any(_attrs(s.attributes)["tapio.incident.role"] == "resolves" for s in found[1])

            tapio.wait_for(resolved, DEADLINE, "the Node's recovery appended to the incident")
            root, members = incident(out, "NodeServiceFailure")
    a = _attrs(root.attributes)
    assert a["tapio.incident.severity"] == "critical" and a["tapio.incident.key"] == f"k8s.node.name={host}"
    assert a["tapio.incident.summary"].startswith(f"kubelet.service failed on node {host}")
    roles = {}
    for s in members:
        m = _attrs(s.attributes)
        roles.setdefault(m["tapio.incident.member"], []).append(m)
    assert all(m["systemd.unit.name"] == "kubelet.service" and m["systemd.unit.state"] == "failed" for m in roles["service_failed"])
    assert all(m["host.name"] == host for m in roles["service_failed"])
    assert [m["k8s.node.condition.ready"] for m in roles["node_not_ready"]] == ["False"]
    assert [m["k8s.node.condition.ready"] for m in roles["node_ready"]] == ["True"]
