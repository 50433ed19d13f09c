"""deploy/: the Kubernetes manifests against the API's schemas, the node agent's pipelines, least privilege.

The manifests are checked with kubernetes-validate (the Kubernetes OpenAPI
as JSON schemas, strict: an unknown field fails), offline: no API server
runs here. The DaemonSet's capability set is checked for real: tapio runs
the ConfigMap's kernel receivers as uid 0 holding exactly the capabilities
the manifest adds (setpriv limits the bounding set as a container runtime
does), and fails to start, naming the capability, without each of them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import trio
import yaml

from tapio.receivers.ebpf._loader import missing_capabilities
from tapio.testing import fake_kube as fk
from tapio.testing import prereq, process
from tapio.testing.fake_kubelet import as_bytes, open_fake_kubelet, pod_list, summary_document
from tapio.testing.process import TapioProcess, free_port, metric_sum, tapio_command
from tests.test_otlp_exporter_tls import certs  # noqa: F401  (the fixture: a CA and server certificates)

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


def test_without_the_pods_environment_the_pipelines_say_what_is_missing(tmp_path):
    path = tmp_path / "pipelines.yaml"
    path.write_text(kind("ConfigMap")["data"]["pipelines.yaml"])
    env = {k: v for k, v in os.environ.items() if k not in pod_env()}
    res = subprocess.run([*tapio_command(), "validate", "-c", str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and "OTLP_ENDPOINT" in res.stdout + res.stderr, res.stdout + res.stderr


def test_the_configmap_runs_every_node_agent_receiver():
    pipes = pipelines()["service"]["pipelines"]
    assert {"ebpf", "dns-xdp", "journald", "cni-log", "cri", "kubeapi"} <= set(pipes["logs"]["receivers"])
    assert "kubeletstats" in pipes["metrics"]["receivers"]
    assert all("k8sattributes" in p["processors"] for p in pipes.values() if p["receivers"] != ["correlate"])
    # and the incidents the node's events make together
    assert "correlate" in pipes["logs"]["exporters"] and pipes["traces/incidents"]["receivers"] == ["correlate"]


def test_the_containerd_socket_answers_through_a_read_only_mount(tmp_path):
    """cri connects to containerd's socket in /run/containerd, mounted read-only: connect(2) on a socket is no write to the file system."""
    prereq.command("unshare", "apt-get install util-linux")
    host = tmp_path / "run-containerd"
    host.mkdir()
    server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(host / "containerd.sock")], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        mount = container_mount(pipelines()["receivers"]["cri"]["endpoint"].removeprefix("unix://"))
        assert mount["readOnly"] is True
        target = tmp_path / "pod-view"
        target.mkdir()
        socket_in_pod = target / Path(pipelines()["receivers"]["cri"]["endpoint"]).name
        script = f"mount --bind {host} {target} && mount -o remount,bind,ro {target} && ! touch {target}/x 2>/dev/null && " \
                 f"{sys.executable} -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"{socket_in_pod}\"); s.sendall(b\"ping\"); print(s.recv(4).decode())'"
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and res.stdout.strip() == "ping", res.stdout + res.stderr
    finally:
        server.kill()
        server.wait(timeout=10)
        server.stdout.close()


_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.sendall(c.recv(4))
"""


def container_mount(path: str) -> dict:
    """The DaemonSet's volume mount that ``path`` is under."""
    mounts = container()["volumeMounts"]
    return next(m for m in sorted(mounts, key=lambda m: -len(m["mountPath"])) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"))


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
    runtime = text[text.rindex("\nFROM ") :]  # the image's own stage (the build stage before it only compiles)
    install = re.search(r"apt-get install[^\n]*\\\n(.*?)&&", runtime, flags=re.S).group(1)
    packages = set(install.replace("\\", " ").split())
    # the receivers' Debian packages are those scripts/setup.sh installs (and the suite runs against)
    assert {"python3-bpfcc", "python3-systemd"} <= packages
    assert packages - {"python3", "ca-certificates"} <= apt_packages_of_setup(), packages - apt_packages_of_setup()
    assert re.search(r"^USER 10001$", text, flags=re.M)
    assert "pip install" in text and "COPY tapio" in text and "COPY --from=build /opt/tapio /opt/tapio" in runtime
    assert "gcc" not in runtime, "the compiler stays in the build stage"


def test_the_dockerfile_copies_what_exists_and_starts_the_installed_command():
    """What can be checked without building: the COPY sources are in the repository and let through by .dockerignore, the
    entrypoint is the console script pyproject installs, and its default command is one `tapio run` accepts."""
    import tomllib

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*"
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert f"!{source}" in ignored or f"!{source}/" in ignored, f"COPY {source}: .dockerignore leaves it out of the build context"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, flags=re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, flags=re.M).group(1))
    assert entrypoint == ["tapio"] and "tapio" in scripts
    assert int(re.search(r"^USER (\d+)$", text, flags=re.M).group(1)) != 0
    # the default command parses: it gets as far as reading its (absent) config file
    res = subprocess.run([*tapio_command(), *cmd], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "/etc/tapio/pipelines.yaml" in res.stdout + res.stderr, res.stdout + res.stderr


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


def with_capabilities(caps: set[str]) -> list[str]:
    """setpriv keeping only ``caps`` in the bounding set: uid 0 then holds those alone, as in the pod."""
    from tests.test_e2e import require_ebpf

    require_ebpf()
    return process.with_capabilities(caps)


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


# ---------------------------------------------------------------- RBAC against what the components request

#: the ConfigMap's components that talk to the API server (kubeapi, k8sattributes) or to the kubelet, which
#: authorizes through the API server (kubeletstats); cri talks to containerd only
API_RECEIVERS, API_PROCESSORS = ("kubeapi", "kubeletstats"), ("k8sattributes",)


def granted(rules: list[dict]) -> set[tuple[str, str, str, str]]:
    """Every (verb, apiGroup, resource[/subresource], resourceName or "") a ClusterRole's rules allow, expanded."""
    return {
        (verb, group, resource, name)
        for rule in rules
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for name in rule.get("resourceNames") or [""]
    }


def allows(grants: set[tuple[str, str, str, str]], access: fk.Access) -> tuple[str, str, str, str] | None:
    """The grant that allows ``access`` (a resourceNames grant only for that name), or None."""
    resource = f"{access.resource}/{access.subresource}" if access.subresource else access.resource
    for name in ("", access.name) if access.name else ("",):
        if (access.verb, access.api_group, resource, name) in grants:
            return access.verb, access.api_group, resource, name
    return None


def seed(kube: fk.FakeKube) -> dict[str, str]:
    """A node's worth of objects: a Deployment's pod and a CronJob's pod on node-1 in a labelled namespace, one elsewhere."""
    system = kube.apply("namespaces", fk.namespace("kube-system"))
    kube.apply("namespaces", fk.namespace("shop", labels={"team": "payments"}))
    kube.apply("nodes", fk.node("node-1"))
    kube.apply("nodes", fk.node("node-2", ip="10.0.0.2"))
    rs = kube.apply("replicasets", fk.replicaset("web-5d8", namespace="shop", deployment=("web", "dep-uid-1")))
    job = kube.apply("jobs", fk.job("nightly-2912", namespace="shop", cronjob=("nightly", "cron-uid-1")))
    owner = fk.owner_ref("ReplicaSet", "web-5d8", rs["metadata"]["uid"])
    web = kube.apply("pods", fk.pod("web-5d8-a1", namespace="shop", owner=owner, labels={"app.kubernetes.io/name": "web"}, ip="10.1.0.7"))
    kube.apply("pods", fk.pod("nightly-2912-b2", namespace="shop", owner=fk.owner_ref("Job", "nightly-2912", job["metadata"]["uid"], "batch/v1")))
    kube.apply("pods", fk.pod("elsewhere", namespace="shop", node="node-2"))
    kube.apply("events", fk.event("web.1", namespace="shop", reason="Pulled", message="image pulled",
                                  involved={"kind": "Pod", "name": "web-5d8-a1", "namespace": "shop", "uid": web["metadata"]["uid"]}))
    return {"cluster_uid": system["metadata"]["uid"], "owner_uid": rs["metadata"]["uid"], "job_uid": job["metadata"]["uid"], "web_uid": web["metadata"]["uid"]}


def api_config(tmp_path: Path, kube: fk.FakeKube, kubelet_endpoint: str, port: int) -> Path:
    """The ConfigMap's API components as configured there, reaching the stand-ins instead of the cluster, into a file."""
    p = pipelines()
    kubeconfig = {"auth_type": "kubeConfig", "kube_config_path": str(kube.write_kubeconfig(tmp_path / "kubeconfig"))}
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(kube.token)
    (account / "ca.crt").write_text("")
    receivers = {"kubeapi": {**p["receivers"]["kubeapi"], **kubeconfig},
                 "kubeletstats": {**p["receivers"]["kubeletstats"], "endpoint": kubelet_endpoint, "service_account_dir": str(account), "initial_delay": "0s"}}
    processors = {"k8sattributes": {**p["processors"]["k8sattributes"], **kubeconfig}}
    # every API component of the ConfigMap is in (a second kubeapi/<name> would have to be added here)
    assert {k for k in p["receivers"] if k.partition("/")[0] in API_RECEIVERS} == set(receivers)
    assert {k for k in p["processors"] if k.partition("/")[0] in API_PROCESSORS} == set(processors)
    config = {
        "receivers": receivers,
        "processors": processors,
        "exporters": {"file": {"path": str(tmp_path / "out.jsonl")}},
        "service": {
            "telemetry": {"metrics": {"address": f"127.0.0.1:{port}"}},
            "pipelines": {
                "logs": {"receivers": ["kubeapi"], "processors": ["k8sattributes"], "exporters": ["file"]},
                "metrics": {"receivers": ["kubeletstats"], "processors": ["k8sattributes"], "exporters": ["file"]},
            },
        },
    }
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _strings(attributes: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"].get("stringValue", "") for a in attributes}


def exported_resources(path: Path) -> list[dict[str, str]]:
    """What the file exporter wrote: per log record its resource's and its own attributes (string values), per metrics resource its attributes."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        doc = json.loads(line)
        for group in doc.get("resourceLogs", []):
            resource = _strings(group.get("resource", {}).get("attributes", []))
            out += [{**resource, **_strings(r.get("attributes", [])), "_signal": "logs"} for s in group.get("scopeLogs", []) for r in s.get("logRecords", [])]
        for group in doc.get("resourceMetrics", []):
            out.append({**_strings(group.get("resource", {}).get("attributes", [])), "_signal": "metrics"})
    return out


async def test_the_clusterrole_grants_exactly_what_the_components_request(tmp_path, certs):  # noqa: F811
    """kubeapi, k8sattributes and kubeletstats, configured as in the ConfigMap, run against the stand-in API server and
    kubelet until each has done all it does (lists, watches that deliver changes, owner and cluster-uid GETs, a scrape);
    every request they made must be allowed by the ClusterRole, and every grant of the ClusterRole used by one."""
    with fk.FakeKube(token="agent-token") as kube:
        ids = seed(kube)
        docs = as_bytes(summary_document(pods=2, containers=1)), as_bytes(pod_list(pods=2, containers=1))
        async with open_fake_kubelet(*docs, cert_file=certs.server_pem, key_file=certs.server_key, token=kube.token) as kubelet:
            port = free_port()
            out = tmp_path / "out.jsonl"
            with TapioProcess([api_config(tmp_path, kube, kubelet.endpoint, port)], metrics_port=port, env={"K8S_NODE_NAME": "node-1"}) as t:

                async def until(predicate, what: str) -> None:
                    try:
                        await trio.to_thread.run_sync(t.wait_for, predicate, 60, what)
                    except AssertionError as exc:
                        raise AssertionError(f"{exc}\nexported resources: {exported_resources(out)}\nrequests: {kube.accesses()}") from None

                def exported(**attrs: str) -> bool:
                    return any(attrs.items() <= r.items() for r in exported_resources(out))

                await trio.to_thread.run_sync(t.wait_ready, 60)
                await until(lambda: metric_sum(t.metrics(), "tapio_k8sattributes_owner_lookups_total", result="found") >= 2,
                            "the ReplicaSet and Job GETs of the owner chains")
                await until(lambda: exported(_signal="metrics", **{"k8s.node.name": "node-1"}), "a kubeletstats scrape")
                # the watches deliver: a namespace relabelled, a new pod, a node going NotReady, a new event
                kube.apply("namespaces", fk.namespace("shop", labels={"team": "checkout"}))
                owner = fk.owner_ref("ReplicaSet", "web-5d8", ids["owner_uid"])
                kube.apply("pods", fk.pod("web-5d8-c3", namespace="shop", owner=owner, labels={"app.kubernetes.io/name": "web"}))
                kube.apply("pods", fk.pod("nightly-2912-b2", namespace="shop", phase="Succeeded", owner=fk.owner_ref("Job", "nightly-2912", ids["job_uid"], "batch/v1")))
                await until(lambda: exported(**{"k8s.pod.name": "web-5d8-c3", "k8s.deployment.name": "web", "k8s.namespace.labels.team": "checkout",
                                                "app": "web", "k8s.cluster.uid": ids["cluster_uid"]}),
                            "the new pod (pods watch) under its Deployment (ReplicaSet GET), with the namespace's new label (namespaces watch) "
                            "and the cluster uid (kube-system GET)")
                await until(lambda: exported(**{"k8s.pod.name": "nightly-2912-b2", "k8s.cronjob.name": "nightly"}), "the Job's pod under its CronJob")
                kube.apply("nodes", fk.node("node-1", ready="False"))
                kube.apply("events", fk.event("web.2", namespace="shop", reason="BackOff", message="restarting", type="Warning",
                                              involved={"kind": "Pod", "name": "web-5d8-a1", "namespace": "shop", "uid": ids["web_uid"]}))
                await until(lambda: exported(**{"k8s.node.name": "node-1", "k8s.node.condition.ready": "False"}), "node-1 NotReady (nodes watch)")
                await until(lambda: exported(**{"k8s.event.reason": "BackOff", "k8s.pod.name": "web-5d8-a1"}), "the new event (events watch)")
        api_accesses = kube.accesses()
        kubelet_accesses = kubelet.accesses

    grants = granted(kind("ClusterRole")["rules"])
    used: set[tuple[str, str, str, str]] = set()
    missing = []
    for access in sorted(api_accesses, key=repr):
        assert access.is_resource, f"a non-resource request ({access.path}): name it in the ClusterRole or stop making it"
        grant = allows(grants, access)
        missing += [] if grant else [access]
        used |= {grant} if grant else set()
    for tried in kubelet_accesses:
        # the kubelet tries the fine-grained subresource first, then nodes/proxy; the first one granted is what is used
        grant = next((g for g in map(lambda a: allows(grants, a), tried) if g), None)
        missing += [] if grant else [tried[0]]
        used |= {grant} if grant else set()
    assert not missing, f"requested but not granted by deploy/kubernetes/rbac.yaml: {missing}"
    assert grants - used == set(), f"granted but never requested: {sorted(grants - used)}"
    # and nothing the kubelet would also let through for exec: /pods is authorized as nodes/pods, not nodes/proxy
    assert not any(g[2] == "nodes/proxy" for g in grants)


#: the examples meant for the same DaemonSet (and so for its ClusterRole); sidecar.yaml runs in an application's pod
DAEMONSET_EXAMPLES = ["gateway.yaml", "jaeger.yaml", "prometheus.yaml", "tempo.yaml"]


def api_needs(config: dict) -> set[tuple[str, str]]:
    """What a pipelines file's API components will request, by the settings that decide it (decoded, defaults filled in)."""
    from tapio.config import decode_dataclass
    from tapio.processors.k8sattributes import factory as k8sattributes
    from tapio.receivers.kubeapi import factory as kubeapi
    from tapio.receivers.kubeletstats import factory as kubeletstats

    needs: set[tuple[str, str]] = set()
    for key, raw in {**config.get("receivers", {}), **config.get("processors", {})}.items():
        base = key.partition("/")[0]
        if base == "kubeapi":
            c = decode_dataclass(kubeapi.config_class, raw or {})
            needs |= {("watch", f"{o.name} in {','.join(o.namespaces) or 'all'}") for o in c.objects} | {("node filter", c.filter.node_from_env_var)}
        elif base == "k8sattributes":
            c = decode_dataclass(k8sattributes.config_class, raw or {})
            needs |= {("metadata", m) for m in c.extract.metadata} | {("node filter", c.filter.node_from_env_var), ("namespace", c.filter.namespace)}
            needs |= {("labels from", r.from_) for r in c.extract.labels} | {("annotations from", r.from_) for r in c.extract.annotations}
        elif base == "kubeletstats":
            c = decode_dataclass(kubeletstats.config_class, raw or {})
            needs |= {("kubelet", "/stats/summary")} | ({("kubelet", "/pods")} if c.utilization and {"pod", "container"} & set(c.metric_groups) else set())
    return needs


@pytest.mark.parametrize("name", DAEMONSET_EXAMPLES)
def test_the_examples_for_the_daemonset_ask_the_api_for_no_more_than_the_configmap(name):
    """The ClusterRole is checked against the ConfigMap's requests; an example that ran on the same DaemonSet and asked for more would be refused."""
    example = yaml.safe_load((ROOT / "deploy" / "examples" / name).read_text())
    assert api_needs(example) <= api_needs(pipelines()), api_needs(example) - api_needs(pipelines())
