"""The example pipelines in deploy/examples/ pass `tapio validate`, with the environment their pods give them.

The node agent's own pipelines (the ConfigMap in deploy/kubernetes/) and its
DaemonSet are checked in tests/test_deploy.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tapio.testing.process import tapio_command

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
ENV = {
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


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(ENV)
