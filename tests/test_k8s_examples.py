"""The Kubernetes example pipelines in deploy/examples/ pass `tapio validate`, with the environment their pods give them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tapio.testing.process import tapio_command

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
ENV = {
    "node-agent.yaml": {"K8S_NODE_NAME": "node-1", "OTLP_ENDPOINT": "otel-gateway.observability:4317"},
    "sidecar.yaml": {"POD_NAME": "checkout-7d9f-x2x", "POD_NAMESPACE": "shop", "OTLP_ENDPOINT": "otel-gateway.observability:4317"},
    "tempo.yaml": {"K8S_NODE_NAME": "node-1"},
    "gateway.yaml": {"K8S_NODE_NAME": "node-1"},
    "jaeger.yaml": {"K8S_NODE_NAME": "node-1"},
    "prometheus.yaml": {"K8S_NODE_NAME": "node-1"},
}


@pytest.mark.parametrize("name", sorted(ENV))
def test_example_validates(name):
    env = {**os.environ, **ENV[name]}
    res = subprocess.run([*tapio_command(), "validate", "-c", str(EXAMPLES / name)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr


def test_the_daemonset_gives_the_node_name_the_pipelines_read():
    docs = list(yaml.safe_load_all((EXAMPLES / "node-agent-daemonset.yaml").read_text()))
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    env = {e["name"]: e for e in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    pipelines = (EXAMPLES / "node-agent.yaml").read_text()
    assert pipelines.count("node_from_env_var: K8S_NODE_NAME") == 2
    rules = next(d for d in docs if d["kind"] == "ClusterRole")["rules"]
    assert {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]} in rules  # get only: no ReplicaSet watch


def test_the_daemonset_gives_cri_its_socket_and_kubeletstats_its_permissions():
    docs = list(yaml.safe_load_all((EXAMPLES / "node-agent-daemonset.yaml").read_text()))
    pipelines = yaml.safe_load((EXAMPLES / "node-agent.yaml").read_text())
    assert "cri" in pipelines["service"]["pipelines"]["logs"]["receivers"]
    assert pipelines["service"]["pipelines"]["metrics"]["receivers"] == ["kubeletstats"]
    socket = pipelines["receivers"]["cri"]["endpoint"].removeprefix("unix://")
    pod = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert any(host_paths.get(name) == socket and path == socket for name, path in mounts.items())
    rules = next(d for d in docs if d["kind"] == "ClusterRole")["rules"]
    assert any(set(r["resources"]) >= {"nodes/stats", "nodes/proxy"} and "get" in r["verbs"] for r in rules)


def test_without_its_environment_the_node_agent_says_what_is_missing():
    env = {k: v for k, v in os.environ.items() if k not in ENV["node-agent.yaml"]}
    res = subprocess.run([*tapio_command(), "validate", "-c", str(EXAMPLES / "node-agent.yaml")], capture_output=True, text=True, env=env, timeout=60)
    assert "OTLP_ENDPOINT" in res.stdout + res.stderr
