"""deploy/: the Kubernetes manifests against the API's schemas, the node agent's pipelines, least privilege.

The manifests are checked with kubernetes-validate (the Kubernetes OpenAPI
as JSON schemas, strict: an unknown field fails), offline: no API server
runs here. The DaemonSet's capability set is checked for real: tapio runs
the ConfigMap's kernel receivers as uid 0 holding exactly the capabilities
the manifest adds (setpriv limits the bounding set as a container runtime
does), and fails to start, naming the capability, without each of them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tapio.receivers.ebpf._loader import missing_capabilities
from tapio.testing import prereq
from tapio.testing.process import TapioProcess, free_port, tapio_command

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
#: the oldest Kubernetes the manifests are meant for, and the newest the schemas know
VERSIONS = ["1.29.0", "1.37.0"]
#: capabilities a receiver may ask for; anything else (or privileged) is a finding
ALLOWED_CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE", "SYS_ADMIN"}


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


MANIFESTS = manifests()


def kind(name: str) -> dict:
    return next(doc for _, doc in MANIFESTS if doc["kind"] == name)


def container() -> dict:
    return kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def pod_env() -> dict[str, str]:
    """The environment the DaemonSet gives tapio (downward-API values filled in as a node would)."""
    env = {}
    for e in container()["env"]:
        env[e["name"]] = e.get("value") or {"spec.nodeName": "node-1"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def pipelines() -> dict:
    return yaml.safe_load(kind("ConfigMap")["data"]["pipelines.yaml"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_manifest_matches_the_kubernetes_schema(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_refuses_an_unknown_and_a_mistyped_field():
    daemonset = yaml.safe_load(yaml.safe_dump(kind("DaemonSet")))
    daemonset["spec"]["template"]["spec"]["hostPIDD"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostPIDD"):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)
    daemonset = yaml.safe_load(yaml.safe_dump(kind("DaemonSet")))
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)


def test_the_configmap_pipelines_validate_with_the_pods_environment(tmp_path):
    path = tmp_path / "pipelines.yaml"
    path.write_text(kind("ConfigMap")["data"]["pipelines.yaml"])
    res = subprocess.run([*tapio_command(), "validate", "-c", str(path)], capture_output=True, text=True, env={**os.environ, **pod_env()}, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr


def test_the_daemonset_runs_what_the_configmap_configures():
    spec = kind("DaemonSet")["spec"]["template"]["spec"]
    c = container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_mount = next(m for m in c["volumeMounts"] if "configMap" in volumes[m["name"]])
    assert volumes[config_mount["name"]]["configMap"]["name"] == kind("ConfigMap")["metadata"]["name"]
    assert f"{config_mount['mountPath']}/pipelines.yaml" in c["args"]
    assert spec["serviceAccountName"] == kind("ServiceAccount")["metadata"]["name"]
    assert kind("ClusterRoleBinding")["subjects"][0]["name"] == spec["serviceAccountName"]
    p = pipelines()
    assert p["receivers"]["kubeapi"]["filter"]["node_from_env_var"] == "K8S_NODE_NAME"
    assert p["processors"]["k8sattributes"]["filter"]["node_from_env_var"] == "K8S_NODE_NAME"
    env = {e["name"]: e for e in c["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # the probes and the metrics port are where the ConfigMap serves self-telemetry
    port = int(p["service"]["telemetry"]["metrics"]["address"].rpartition(":")[2])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert c["ports"][0]["containerPort"] == port
    # every host path the pipelines read is mounted, read-only; the storage file is on the writable state volume
    paths = [p["receivers"]["journald"]["directory"], p["receivers"]["cri"]["endpoint"].removeprefix("unix://"), "/sys/fs/cgroup", "/sys/kernel/tracing", "/var/log/calico/cni/cni.log"]
    for path in paths:
        mount = next((m for at, m in mounts.items() if path == at or path.startswith(at + "/")), None)
        assert mount is not None and mount.get("readOnly"), f"{path} is not mounted read-only"
    db = p["extensions"]["storage"]["path"]
    state = next(m for at, m in mounts.items() if db.startswith(at + "/"))
    assert not state.get("readOnly") and "hostPath" in volumes[state["name"]]


def test_the_daemonset_holds_least_privilege():
    spec = kind("DaemonSet")["spec"]["template"]["spec"]
    sc = container()["securityContext"]
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) <= ALLOWED_CAPABILITIES
    for m in container()["volumeMounts"]:
        volume = next(v for v in spec["volumes"] if v["name"] == m["name"])
        if "hostPath" in volume and m["mountPath"] != "/var/lib/tapio":
            assert m.get("readOnly"), f"host path {volume['hostPath']['path']} is mounted writable"
    assert container()["resources"]["limits"]["memory"] and container()["resources"]["requests"]["cpu"]


def test_rbac_grants_only_reads():
    for rule in kind("ClusterRole")["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
    rules = kind("ClusterRole")["rules"]
    assert {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]} in rules  # get only: no ReplicaSet watch


def apt_packages_of_setup() -> set[str]:
    text = (ROOT / "scripts" / "setup.sh").read_text()
    block = text[text.index("APT_PACKAGES=(") : text.index("\n)\n")]
    return {word for line in block.splitlines()[1:] for word in line.split("#")[0].split()}


def test_the_dockerfile_installs_debian_packages_the_suite_runs_with_and_drops_root():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm", text, flags=re.M)
    install = re.search(r"apt-get install[^\n]*\\\n(.*?)&&", text, flags=re.S).group(1)
    packages = set(install.replace("\\", " ").split())
    # the receivers' Debian packages are those scripts/setup.sh installs (and the suite runs against)
    assert {"python3-bpfcc", "python3-systemd"} <= packages
    assert packages - {"python3", "ca-certificates"} <= apt_packages_of_setup(), packages - apt_packages_of_setup()
    assert re.search(r"^USER 10001$", text, flags=re.M)
    assert "pip install" in text and "COPY tapio" in text


def test_missing_capabilities_reads_the_effective_set(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000000c000001000\n")  # BPF, PERFMON, NET_ADMIN
    assert missing_capabilities("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", status=str(status)) == []
    status.write_text("CapEff:\t0000008000000000\n")  # BPF only
    assert missing_capabilities("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", status=str(status)) == ["CAP_PERFMON", "CAP_NET_ADMIN"]
    status.write_text("CapEff:\t0000000000200000\n")  # SYS_ADMIN stands for BPF and PERFMON, not NET_ADMIN
    assert missing_capabilities("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", status=str(status)) == ["CAP_NET_ADMIN"]
    assert missing_capabilities("CAP_BPF", status=str(tmp_path / "absent")) == []


def kernel_config(tmp_path: Path, port: int) -> Path:
    """The ConfigMap's kernel receivers, as configured there, into a file exporter."""
    receivers = {name: pipelines()["receivers"][name] for name in ("ebpf", "dns-xdp")}
    receivers["dns-xdp"] = {**receivers["dns-xdp"], "interfaces": [*receivers["dns-xdp"]["interfaces"], "lo"]}
    config = {
        "receivers": receivers,
        "exporters": {"file": {"path": str(tmp_path / "out.jsonl")}},
        "service": {"telemetry": {"metrics": {"address": f"127.0.0.1:{port}"}}, "pipelines": {"logs": {"receivers": list(receivers), "exporters": ["file"]}}},
    }
    path = tmp_path / "kernel.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def require_setpriv_as_root() -> str:
    from tests.test_e2e import require_ebpf

    require_ebpf()
    return prereq.command("setpriv", "apt-get install util-linux")


def with_capabilities(caps: set[str]) -> list[str]:
    """setpriv keeping only ``caps`` in the bounding set: uid 0 then holds those alone, as in the pod."""
    return [require_setpriv_as_root(), "--bounding-set", "-all" + "".join(f",+{c.lower()}" for c in sorted(caps)), "--"]


def test_the_daemonsets_capabilities_are_enough_for_the_kernel_receivers(tmp_path):
    caps = set(container()["securityContext"]["capabilities"]["add"])
    port = free_port()
    config = kernel_config(tmp_path, port)
    with TapioProcess([config], metrics_port=port, wrap=with_capabilities(caps)) as t:
        t.wait_ready(timeout=120)
        out = tmp_path / "out.jsonl"
        marker = f"tapio-cap-check-{os.getpid()}"

        def exec_seen() -> bool:
            subprocess.run(["/bin/sh", "-c", f"/bin/echo {marker} >/dev/null"], check=True)
            return out.exists() and marker.encode() in out.read_bytes()

        t.wait_for(exec_seen, 30, "an exec event from the ebpf receiver")
        with open(f"/proc/{t.proc.pid}/status") as f:
            held = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
        assert held == sum(1 << {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}[c] for c in caps)


@pytest.mark.parametrize("dropped", ["BPF", "PERFMON", "NET_ADMIN"])
def test_without_one_of_the_capabilities_a_kernel_receiver_says_which(tmp_path, dropped):
    caps = set(container()["securityContext"]["capabilities"]["add"]) - {dropped}
    res = subprocess.run([*with_capabilities(caps), *tapio_command(), "run", "-c", str(kernel_config(tmp_path, free_port()))],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode != 0
    assert f"lacks CAP_{dropped}" in res.stderr, res.stderr
