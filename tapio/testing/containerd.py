"""A real containerd for tests: a plain process with its own root, state, socket and CNI network.

What `Containerd` keeps:
- Nothing is written outside its base directory except what containerd and
  runc cannot be told to put elsewhere: the shim sockets under
  ``/run/containerd/s/``, the CNI bridge (its own name, `bridge`), and the
  pods' cgroups (``/kubepods/burstable/pod<uid>`` in each hierarchy, as the
  kubelet's cgroupfs driver lays them out). `Containerd.close` removes all of
  it, also after a crashed test, and only what this instance made.
- The images come from ``/bin/busybox`` (busybox-static), built here as OCI
  image-layout tars (`build_image`) and imported: no registry is reached.
- containerd 1.7 is needed for the CRI event stream (GetContainerEvents);
  ``scripts/setup.sh`` unpacks it from Debian trixie into `CONTAINERD_HOME`,
  and Debian 12's own 1.6 (which answers GetContainerEvents UNIMPLEMENTED)
  into `CONTAINERD_16_HOME`; ``Containerd(base, home=...)`` picks one.

`CriClient` drives it over the CRI API with grpcio (blocking calls with
deadlines, for test code outside trio or in a worker thread), the way the
kubelet does: pod sandboxes with the kubelet's labels and cgroup parent,
busybox containers with a shell script and an optional memory limit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tapio.receivers.cri._proto import api_pb2 as pb
from tapio.receivers.cri._proto import api_pb2_grpc as pb_grpc
from tapio.testing import prereq

__all__ = ["CONTAINERD_16_HOME", "CONTAINERD_HOME", "Containerd", "CriClient", "Pod", "build_image", "require_containerd"]

CONTAINERD_HOME = Path(os.environ.get("TAPIO_CONTAINERD_HOME", "/opt/tapio/containerd-1.7"))
#: Debian 12's containerd 1.6, unpacked by scripts/setup.sh: CRI without the event stream
CONTAINERD_16_HOME = Path(os.environ.get("TAPIO_CONTAINERD_16_HOME", "/opt/tapio/containerd-1.6"))
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
BUSYBOX = "/bin/busybox"
PAUSE_IMAGE = "localhost/pause:1"
BUSYBOX_IMAGE = "localhost/busybox:1"
#: how long containerd may take to answer on its socket after it was started
START_TIMEOUT = 20.0
#: deadline of every CRI call the tests make
CALL_TIMEOUT = 30.0
_random = random.SystemRandom()


def require_containerd(home: Path = CONTAINERD_HOME) -> Path:
    """The binary directory of the containerd unpacked in ``home``, or `prereq.missing` naming what to install."""
    how = "run scripts/setup.sh (containerd 1.7 from Debian trixie and 1.6 from bookworm, runc, containernetworking-plugins, busybox-static)"
    for path, what in (
        (home / "usr/bin/containerd", f"containerd in {home}"),
        (Path(RUNC), "runc"),
        (Path(CNI_BIN) / "bridge", "the CNI plugins"),
        (Path(BUSYBOX), "busybox-static"),
    ):
        if not path.exists():
            prereq.missing(what, how)
    if os.geteuid() != 0:
        prereq.missing("root", "containerd needs root to create namespaces and cgroups")
    return home / "usr/bin"


def build_image(out: Path, name: str, cmd: list[str]) -> Path:
    """An OCI image-layout tar named ``name`` with one layer: /bin/busybox and a link per applet.

    Deterministic (mtime 0, sorted), so the same busybox gives the same digest.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "var", "root", "usr", "usr/bin", "sbin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        data = Path(BUSYBOX).read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        t.addfile(info, io.BytesIO(data))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(info)
        for path, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            body = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(body), 0o644
            t.addfile(info, io.BytesIO(body))
    layer_bytes = layer.getvalue()

    def digest(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_bytes)]},
    }, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer_bytes), "size": len(layer_bytes)}],
    }, separators=(",", ":")).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest), "size": len(manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
    }]}).encode()
    with tarfile.open(out, "w") as t:
        for path, body in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)] + [
            ("blobs/sha256/" + digest(b)[7:], b) for b in (layer_bytes, config, manifest)
        ]:
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(body), 0o644
            t.addfile(info, io.BytesIO(body))
    return out


class Containerd:
    """One containerd process and its CNI network, under ``base``.

    `start` may be called again after `kill` (a runtime restart: running
    containers survive in their shims and are found again). `close` ends
    it all and removes what it made.
    """

    def __init__(self, base: Path, home: Path = CONTAINERD_HOME) -> None:
        self.bin = require_containerd(home)
        self.base = Path(base)
        self.socket = self.base / "containerd.sock"
        self.endpoint = f"unix://{self.socket}"
        tag = f"{_random.randrange(1 << 24):06x}"
        #: the CNI bridge (at most 15 characters) and the pods' subnet, both this instance's own
        self.bridge = f"tcri{tag}"
        self.subnet = f"10.{_random.randrange(200, 250)}.{_random.randrange(256)}.0/24"
        self.log = self.base / "containerd.log"
        self.process: subprocess.Popen | None = None
        #: pod uids whose cgroups this instance's pods made
        self.pod_uids: set[str] = set()

    def __enter__(self) -> "Containerd":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_config(self) -> None:
        base = self.base
        for d in ("net.d", "podlogs", "cni-ipam"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "config.toml").write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # this VM's root lacks CAP_SYS_RESOURCE: the pause container's default oom_score_adj
  # of -998 makes runc fail, so clamp to the caller's own
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{base}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{base}/net.d"
    max_conf_num = 1
""")
        conflist = {
            "cniVersion": "1.0.0",
            "name": "tapio-test",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": f"{base}/cni-ipam"}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        tmp = base / "net.d" / ".tmp"
        tmp.write_text(json.dumps(conflist))
        tmp.rename(base / "net.d" / "10-tapio.conflist")  # atomic: containerd watches the directory

    def _ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ctr"), "-a", str(self.socket), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        """Start containerd (again) and import the images; raises RuntimeError with its log when it does not come up."""
        fresh = not (self.base / "config.toml").exists()
        self.base.mkdir(parents=True, exist_ok=True)
        if fresh:
            self._write_config()
        env = dict(os.environ, PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "containerd"), "--config", str(self.base / "config.toml")],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while self._ctr("version").returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not come up; its log ends:\n{self._log_tail()}")
            time.sleep(0.05)
        if fresh:
            images = self.base / "images"
            images.mkdir(exist_ok=True)
            for name, cmd in ((PAUSE_IMAGE, ["sleep", "2147483647"]), (BUSYBOX_IMAGE, ["sh"])):
                tar = build_image(images / (name.split("/")[1].replace(":", "-") + ".tar"), name, cmd)
                done = self._ctr("images", "import", str(tar))
                if done.returncode != 0:
                    raise RuntimeError(f"importing {name} failed: {done.stderr}")

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """Stop containerd abruptly (SIGKILL); containers keep running in their shims."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> "CriClient":
        return CriClient(self)

    def close(self) -> None:
        """Remove every pod, stop containerd and its shims, and remove what this instance made."""
        if self.process is not None and self.process.poll() is None:
            try:
                with self.client() as cri:
                    cri.remove_all()
            except grpc.RpcError:
                pass
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        # shims outlive containerd by design; ours name our socket on their command line
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        prefix = str(self.base) + "/"
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4]
                if point.startswith(prefix):
                    mounts.append(point)
        for point in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            for uid in self.pod_uids:
                pod = hierarchy / "kubepods" / "burstable" / f"pod{uid}"
                if pod.is_dir():
                    for sub in sorted(pod.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                        if sub.is_dir():
                            _rmdir(sub)
                    _rmdir(pod)
        shutil.rmtree(self.base, ignore_errors=True)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


@dataclass
class Pod:
    id: str
    uid: str
    name: str
    namespace: str
    config: pb.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


class CriClient:
    """Blocking CRI calls against a `Containerd` (each with a deadline), the way the kubelet makes them."""

    def __init__(self, containerd: Containerd) -> None:
        self._containerd = containerd
        self.channel = grpc.insecure_channel(containerd.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT)
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)

    def __enter__(self) -> "CriClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def run_pod(self, name: str, namespace: str = "default", uid: str | None = None) -> Pod:
        """A pod sandbox with the kubelet's labels and cgroup parent (``/kubepods/burstable/pod<uid>``)."""
        uid = uid or str(uuid.uuid4())
        self._containerd.pod_uids.add(uid)
        logs = self._containerd.base / "podlogs" / uid
        logs.mkdir(parents=True, exist_ok=True)
        labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.uid": uid, "app": name}
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            hostname=name, log_directory=str(logs), labels=labels,
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/kubepods/burstable/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER)),
            ),
        )
        pod_id = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=CALL_TIMEOUT).pod_sandbox_id
        return Pod(pod_id, uid, name, namespace, config)

    def create_container(self, pod: Pod, name: str, script: str, *, memory_limit: int = 0, attempt: int = 0) -> str:
        """A busybox container running ``sh -c script`` (created, not started), labelled as the kubelet labels it."""
        labels = {
            "io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid, "io.kubernetes.container.name": name,
        }
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt), image=pb.ImageSpec(image=BUSYBOX_IMAGE),
            command=["/bin/sh"], args=["-c", script], log_path=f"{name}_{attempt}.log", labels=labels,
        )
        if memory_limit:
            config.linux.resources.memory_limit_in_bytes = memory_limit
        cid = self.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=CALL_TIMEOUT
        ).container_id
        pod.containers.append(cid)
        return cid

    def start_container(self, cid: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=CALL_TIMEOUT)

    def run_container(self, pod: Pod, name: str, script: str, *, memory_limit: int = 0) -> str:
        cid = self.create_container(pod, name, script, memory_limit=memory_limit)
        self.start_container(cid)
        return cid

    def status(self, cid: str) -> pb.ContainerStatus:
        return self.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=CALL_TIMEOUT).status

    def wait_exited(self, cid: str, timeout: float = 30.0) -> pb.ContainerStatus:
        """The container's status once it exited; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(cid)
            if status.state == pb.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {cid[:12]} still {pb.ContainerState.Name(status.state)} after {timeout}s")
            time.sleep(0.05)

    def stop_container(self, cid: str, timeout: int = 0) -> None:
        self.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=timeout), timeout=CALL_TIMEOUT)

    def remove_container(self, cid: str) -> None:
        self.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=CALL_TIMEOUT)

    def stop_pod(self, pod: Pod) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=CALL_TIMEOUT)

    def remove_pod(self, pod: Pod) -> None:
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=CALL_TIMEOUT)

    def remove_all(self) -> None:
        """Stop and remove every pod sandbox (and so its containers)."""
        for sandbox in self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=CALL_TIMEOUT).items:
            self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=CALL_TIMEOUT)
            self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=CALL_TIMEOUT)
